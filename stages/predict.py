"""Classify image files with the trained model: `python -m stages.predict PATH... [--json]`.

PNG/JPEG files of any size, dark-on-light or light-on-dark, are converted the way MNIST digits were
made: grey, inverted when the background is light, the digit scaled to fit a 20x20 box and placed
in the 28x28 image so that its centre of mass is at the centre. IDX files (plain or .gz) already
hold MNIST-format images and are classified as they are, one result per image.

Only the model file is read (no params.yaml), and it runs on the CPU unless told otherwise. A file
that cannot be read gets a one-line error and the others are still classified; the exit status is
1 if any file failed.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from stages.common import PipelineError, log, run_main
from stages.idx import IdxFormatError, parse_idx, read_bytes
from stages.models import load_model

STAGE = "predict"
DEFAULT_MODEL = Path("models/model.pt")
FIT_BOX = 20  # MNIST: each digit was scaled to fit 20x20, then centred by mass in 28x28
INK_THRESHOLD = 0.1  # of the brightest value: fainter pixels don't define the digit's bounding box


def is_light_background(gray: np.ndarray) -> bool:
    """True when the image's border (where a centred digit isn't) is brighter than mid-grey."""
    border = np.concatenate([gray[0], gray[-1], gray[:, 0], gray[:, -1]])
    return float(np.median(border)) > 127


def to_mnist(gray: np.ndarray, size: int = 28) -> np.ndarray:
    """uint8 [size, size] MNIST-style digit from a greyscale image [H, W] with values 0..255."""
    ink = gray.astype(np.float64)
    if is_light_background(ink):
        ink = 255 - ink
    ink -= np.median(ink)  # background to ~0, whatever its grey level
    ink = np.clip(ink, 0, None)
    if ink.max() <= 0:
        return np.zeros((size, size), np.uint8)  # a blank image stays blank
    rows, cols = np.nonzero(ink > INK_THRESHOLD * ink.max())
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    ink = ink * (255 / ink.max())
    box = FIT_BOX * size // 28
    scale = box / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    resized = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize((width, height), Image.LANCZOS))
    resized = np.clip(resized, 0, 255)
    # Place the box so its centre of mass lands on the image centre, clipped to stay inside.
    total = resized.sum()
    com_row = (resized.sum(axis=1) @ np.arange(height)) / total
    com_col = (resized.sum(axis=0) @ np.arange(width)) / total
    top = int(np.clip(round((size - 1) / 2 - com_row), 0, size - height))
    left = int(np.clip(round((size - 1) / 2 - com_col), 0, size - width))
    out = np.zeros((size, size), np.float64)
    out[top:top + height, left:left + width] = resized
    return np.round(out).astype(np.uint8)


def load_images(path: Path, size: int) -> list[tuple[str, np.ndarray]]:
    """(name, uint8 [size, size]) for each image in the file; raises PipelineError if unreadable."""
    if not path.is_file():
        raise PipelineError(f"{path}: no such file")
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"))
        return [(str(path), to_mnist(gray, size))]
    except UnidentifiedImageError:
        pass  # not an image format Pillow knows: try IDX
    except OSError as exc:
        raise PipelineError(f"{path}: damaged image ({exc})") from None
    try:
        array = parse_idx(read_bytes(path), str(path))
    except IdxFormatError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise PipelineError(f"{path}: neither an image Pillow can read (PNG, JPEG, ...) "
                            f"nor an IDX file ({reason})") from None
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (size, size):
        raise PipelineError(f"{path}: IDX images must be [N, {size}, {size}] or [{size}, {size}], found {array.shape}")
    return [(f"{path}[{i}]", image) for i, image in enumerate(array)]


@torch.no_grad()
def classify(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index [N], its probability [N]) for uint8 images [N, H, W]."""
    device = next(model.parameters()).device
    probabilities = torch.softmax(model(torch.from_numpy(images).to(device)).float(), dim=1)
    best, index = probabilities.max(dim=1)
    return index.cpu().numpy(), best.cpu().numpy()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Classify PNG/JPEG/IDX files with the trained model.")
    parser.add_argument("paths", nargs="+", type=Path)
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--device", default="cpu", help="torch device to run on (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print a JSON list instead of text lines")
    args = parser.parse_args(argv)
    model, meta = load_model(args.model, args.device)
    classes, size = meta["classes"], meta["config"]["image_size"]
    results, failed = [], 0
    for path in args.paths:
        try:
            named = load_images(path, size)
        except PipelineError as exc:
            log(STAGE, f"error: {exc}")
            failed += 1
            continue
        index, probability = classify(model, np.stack([image for _, image in named]))
        results += [{"file": name, "class": int(k), "label": classes[int(k)], "probability": round(float(p), 6)}
                    for (name, _), k, p in zip(named, index, probability)]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            print(f"{r['file']}: {r['label']} ({100 * r['probability']:.1f}%)")
    if failed:
        sys.exit(1)


def cli() -> None:
    """Console-script entry point (`mnist-predict`)."""
    run_main(STAGE, main)


if __name__ == "__main__":
    cli()
