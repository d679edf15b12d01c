"""predict on real MNIST digits saved the ways phones and image tools save them, and its peak memory.

    MNIST_MIRROR=../shared/data/mnist python -m benchmarks.predict_check [--model M] [--digits N]
    MNIST_MIRROR=/usr/share/datasets/fashion-mnist python -m benchmarks.predict_check \
        --dataset fashion-mnist --model fashion.pt --skip-memory
    python -m benchmarks.predict_check --quick     # tiny synthetic digits, seconds: a smoke test

1. Accuracy per format. Trains the `fast` preset with the train stage's fit() on MNIST's official
   training images (the last 5,000 as val: a plain slice, not the preprocess stage's stratified
   split), unless --model names a model file; then saves each of the first N test digits, scaled
   4x to 112x112 and dark on white, in every format of tests/test_predict_formats.FORMATS (the
   formats the tests check for invariance), classifies
   every file through predict's own decoding, framed as the model file says, and prints a
   markdown table. The first row is the model on the raw 28x28 test images, the ceiling for the
   rest. --dataset fashion-mnist does the same with its test images and a model of it (--model:
   `make exp PRESET=fashion` trains one), products in place of digits.
2. Peak resident memory of a fresh process running predict's main() on: one 28x28 PNG (the
   floor: the model and the output), a 24 MP JPEG, a 24 MP PNG, and 1,000 12 MP phone JPEGs
   (hard links to 10 distinct files: the same decoding work, a hundredth of the disk). Measured
   after the imports (torch alone is ~0.75-0.95 GB resident here, the same whatever the images),
   so the figures show what the images add.

Writes only into a temporary directory. Peak memory does not depend on the machine's load;
nothing here is timed. `--quick` runs both parts on benchmarks.presets' tiny synthetic MNIST, with
the floor's row alone in the memory table, so that the test suite keeps the script working.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.presets import QUICK_VAL, positive_int, preset_params, write_quick_mirror
from stages import predict
from stages.common import PipelineError, run_main
from stages.datasets import load_table
from stages.models import load_model, save_model
from stages.preprocess import pixel_stats, read_split
from stages.runtime import cpu_model, resolve_device
from stages.train import fit
from tests.test_predict_formats import FORMATS, SCALE

VAL = 5000  # the last 5,000 training images score each epoch (a plain slice; preprocess draws a stratified split)


def official_split(raw_dir: Path, split: str, dataset: str = "mnist") -> tuple[np.ndarray, np.ndarray]:
    return read_split(raw_dir, load_table()[dataset], split)


def train_fast_model(raw_dir: Path, path: Path, val_size: int = VAL) -> None:
    """The `fast` preset's model, trained by fit() on the official training images, the last
    `val_size` of them scoring each epoch."""
    images, labels = official_split(raw_dir, "train")
    images, labels = torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))
    classes = list(load_table()["mnist"].classes)
    mean, std = pixel_stats(images[:-val_size])
    train = {"images": images[:-val_size], "labels": labels[:-val_size], "classes": classes, "mean": mean, "std": std}
    val = {"images": images[-val_size:], "labels": labels[-val_size:], "classes": classes}
    model, config, _ = fit(preset_params("fast").train, train, val, resolve_device("cpu"))
    save_model(path, model.cpu(), config, classes)


def format_accuracy(model_path: Path, raw_dir: Path, digits: int, work: Path,
                    dataset: str = "mnist") -> tuple[int, list[tuple[str, int]]]:
    """(images used, [(format, images classified right)]) for the raw images and each of FORMATS,
    on the first `digits` test images of `dataset` (all of them when it holds fewer)."""
    model, meta = load_model(model_path)
    if tuple(meta["classes"]) != load_table()[dataset].classes:
        raise PipelineError(f"{model_path}: a model of the classes {', '.join(meta['classes'])}, not {dataset}'s "
                            "(--dataset names the one it was trained on)")
    images, labels = official_split(raw_dir, "test", dataset)
    images, labels = images[:digits], labels[:digits]
    index, _ = predict.classify(model, images.copy())  # a copy: parsed IDX arrays are read-only views
    rows = [("raw 28x28 (IDX, no conversion)", int((index == labels).sum()))]
    for name, (write, _, _) in FORMATS.items():
        right = 0
        for i, (image, label) in enumerate(zip(images, labels)):
            directory = work / name / str(i)
            directory.mkdir(parents=True)
            ink = np.asarray(Image.fromarray(image).resize((28 * SCALE, 28 * SCALE), Image.BICUBIC))
            [sample] = predict.load_samples(write(ink, directory), 28, meta["framing"])
            right += int(predict.classify(model, sample.image[None])[0][0] == label)
        rows.append((name, right))
    return len(images), rows


# Run in a fresh process: imports predict (torch is most of a process's memory), then resets the
# kernel's peak-RSS mark (writing 5 to /proc/self/clear_refs, Linux 4.0+) so that the peak read
# afterwards is the one reached while predict.main worked on the files, model loading included.
_MEASURE = """
import contextlib, os, re, sys
import stages.predict as predict
def kib(key):
    return int(re.search(key + r":\\s+(\\d+)", open("/proc/self/status").read()).group(1))
start = kib("VmRSS")
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
status = 0
try:
    with open(os.devnull, "w") as out, contextlib.redirect_stdout(out):
        predict.main(sys.argv[1:])
except SystemExit as exc:
    status = exc.code if isinstance(exc.code, int) else 1
print(start, kib("VmHWM"), status)
"""


def peak_rss_mib(model_path: Path, files: list[Path]) -> tuple[float, float]:
    """(resident MiB once predict is imported, peak resident MiB while it classifies `files`),
    of a fresh process. Raises when predict refused a file: its peak would be that of work not done."""
    command = [sys.executable, "-c", _MEASURE, "--model", str(model_path), *map(str, files)]
    out = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    figures = out.stdout.split()[-3:]
    if out.returncode != 0 or len(figures) != 3 or figures[2] != "0":
        said = out.stderr.strip().splitlines()
        raise PipelineError(f"predict failed on {files[0]}{f' and {len(files) - 1:,} more' if len(files) > 1 else ''}, "
                            f"so no memory figure: {said[-1] if said else f'exit status {out.returncode}'}")
    start, peak = map(int, figures[:2])
    return start / 1024, peak / 1024


def photo(size: tuple[int, int], seed: int) -> Image.Image:
    """An RGB 'photo' of `size`: a dark digit-like stroke on noisy paper (noise keeps the
    compressed files realistically large)."""
    rng = np.random.default_rng(seed)
    width, height = size
    pixels = rng.integers(200, 240, (height, width, 3), dtype=np.uint8)
    pixels[height // 4:3 * height // 4, width // 2 - width // 40:width // 2 + width // 40] = 20
    return Image.fromarray(pixels)


def memory_figures(model_path: Path, work: Path, quick: bool = False) -> list[tuple[str, tuple[float, float]]]:
    tiny = work / "tiny.png"
    Image.new("L", (28, 28)).save(tiny)
    floor = ("one 28x28 PNG (the floor: Python, torch, the model)", peak_rss_mib(model_path, [tiny]))
    if quick:
        return [floor]
    jpeg24, png24 = work / "24mp.jpg", work / "24mp.png"
    big = photo((6000, 4000), 0)
    big.save(jpeg24, quality=90)
    big.save(png24)
    distinct = []
    for seed in range(10):
        distinct.append(work / f"phone{seed}.jpg")
        photo((4032, 3024), seed).save(distinct[-1], quality=90)
    batch = []
    for i in range(1000):
        batch.append(work / f"batch{i:04}.jpg")
        os.link(distinct[i % 10], batch[-1])
    return [floor,
            ("one 24 MP JPEG (6000x4000, RGB)", peak_rss_mib(model_path, [jpeg24])),
            ("one 24 MP PNG (6000x4000, RGB)", peak_rss_mib(model_path, [png24])),
            ("1,000 12 MP JPEGs (4032x3024, RGB) in one run", peak_rss_mib(model_path, batch))]


# Test images saved in each format. --quick's few keep the smoke test to seconds (100 took 2 minutes).
DIGITS, QUICK_DIGITS = 100, 5


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.predict_check", description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--model", type=Path, help="model file to use instead of training the fast preset")
    parser.add_argument("--digits", type=positive_int,
                        help=f"test images per format (the first N of the test set; default {DIGITS}, "
                             f"with --quick {QUICK_DIGITS})")
    parser.add_argument("--dataset", default="mnist", choices=sorted(load_table()),
                        help="whose test images (MNIST_MIRROR holds its files); another than mnist needs --model")
    parser.add_argument("--save-model", type=Path, help="keep the trained model at this path")
    parser.add_argument("--skip-memory", action="store_true", help="only the accuracy table")
    parser.add_argument("--quick", action="store_true",
                        help="tiny synthetic digits instead of MNIST_MIRROR, the memory floor only: a smoke test")
    args = parser.parse_args(argv)
    if args.model is not None and args.save_model is not None:
        parser.error("--save-model keeps the model this check trains; with --model nothing is trained")
    if args.digits is None:
        args.digits = QUICK_DIGITS if args.quick else DIGITS
    mirror = os.environ.get("MNIST_MIRROR")
    if not mirror and not args.quick:
        raise PipelineError(f"set MNIST_MIRROR to a directory holding {args.dataset}'s four IDX files (.gz or plain)")
    if args.dataset != "mnist" and (args.model is None or args.quick):
        raise PipelineError(f"--dataset {args.dataset} needs a model of it (--model; `make exp PRESET=fashion` "
                            "trains one) and real files (no --quick): only MNIST's fast preset is trained here")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.quick:
            mirror = write_quick_mirror(work / "mirror")
        model_path = args.model or args.save_model or work / "model.pt"
        if args.model is None:
            train_fast_model(Path(mirror), model_path, QUICK_VAL if args.quick else VAL)
        print(f"machine: {cpu_model()}, {os.cpu_count()} CPUs; Pillow {Image.__version__}, torch {torch.__version__}")
        if args.quick:
            trained = " and a model trained on them for seconds" if args.model is None else ""
            print(f"--quick: a smoke test on synthetic digits{trained}: the numbers below say only that "
                  "every part ran")
        used, rows = format_accuracy(model_path, Path(mirror), args.digits, work / "formats", args.dataset)
        print(f"\n| format | right of {used} |\n|---|---:|")
        for name, right in rows:
            print(f"| {name} | {right} |", flush=True)
        if not args.skip_memory:
            print("\n| input | resident after imports (MiB) | peak while classifying (MiB) | added (MiB) |\n"
                  "|---|---:|---:|---:|")
            for name, (start, peak) in memory_figures(model_path, work, args.quick):
                print(f"| {name} | {start:.0f} | {peak:.0f} | {peak - start:.0f} |", flush=True)


if __name__ == "__main__":
    run_main("predict_check", main)
