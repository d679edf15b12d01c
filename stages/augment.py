"""Stage augment: the train split plus `copies` randomly transformed copies of it.

The output is train.pt's mapping with images [(copies + 1) N, H, W] uint8: the N originals, then
view 1, ..., view `copies`, N images each, in the originals' order; labels [(copies + 1) N] to
match; and `views` = copies. train.fresh_views trains each epoch on the originals and one view (see
stages.train.epoch_rows), else on all of them.

Each view is stages.views.transform of the originals, drawn per image from a generator seeded
with augment.seed: an affine warp (elastic distortions with it when on), then the pixel shift,
flip and erasing that are switched on.

With on_the_fly: true nothing is stored: the output is the originals with `views` = 0 and
`on_the_fly` = this section's params, and train draws the views batch by batch with
stages.views.view_drawer (the same transform, on the training device). A change of any augment
param still changes this output, so DVC re-runs train whenever the views it would draw change (and
also for a param that does not change them here, such as `copies` or an unused elastic_sigma).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

import torch

from stages import params as params_mod
from stages.common import Progress, load_tensors, log, run_main, save_tensors
from stages.params import AugmentParams
from stages.views import transform

STAGE = "augment"
CHUNK = 8192  # images warped at once: ~8192*28*28*2 floats of grid, about 50 MB


def augment(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentParams,
            generator: torch.Generator, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the originals followed by cfg.copies transformed copies: [(copies+1) N, H, W], labels to match."""
    n = len(images)
    # Filled in place, chunk by chunk: the output is the only copy of the views (a list of chunks
    # joined by torch.cat would hold them twice: 4.4 GB at 50 copies of MNIST's 55,000).
    out = images.new_empty((cfg.copies + 1) * n, *images.shape[1:])
    out[:n] = images
    for copy in range(1, cfg.copies + 1):
        for start in range(0, n, CHUNK):
            chunk = images[start:start + CHUNK]
            out[copy * n + start:copy * n + start + len(chunk)] = transform(chunk, cfg, generator)
            if progress:
                progress.update(len(chunk))
    return out, labels.repeat(cfg.copies + 1)


def augmented_split(data: dict, cfg: AugmentParams, progress: Progress | None = None) -> dict:
    """The augment stage's output for the train split `data`: its mapping with the views appended
    (see the module docstring), drawn from a generator seeded with cfg.seed; with cfg.on_the_fly,
    the split itself and the params train draws its views with."""
    if cfg.on_the_fly:  # copies is 0 (params checks it): nothing to draw here
        return {**data, "views": 0, "on_the_fly": dataclasses.asdict(cfg)}
    generator = torch.Generator().manual_seed(cfg.seed)
    images, labels = augment(data["images"], data["labels"], cfg, generator, progress)
    return {**data, "images": images, "labels": labels, "views": cfg.copies}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog=f"stages/run {STAGE}", description=__doc__.splitlines()[0])
    parser.add_argument("train_in", type=Path)
    parser.add_argument("train_out", type=Path)
    args = parser.parse_args(argv)
    cfg = params_mod.load().augment
    data = load_tensors(args.train_in, required=("images", "labels"))
    progress = Progress(STAGE, "images transformed", cfg.copies * len(data["labels"]))
    out = augmented_split(data, cfg, progress)
    progress.close(summary=False)  # the log line below is the summary; on a terminal, a line of its own
    save_tensors(args.train_out, out)  # before the summary: a failed write must not follow a line of success
    if cfg.on_the_fly:
        log(STAGE, f"{len(data['labels']):,} train images; train draws a fresh view of each every epoch (on_the_fly)")
    else:
        log(STAGE, f"{len(data['labels']):,} originals + {cfg.copies} copies = {len(out['labels']):,} train images")


if __name__ == "__main__":
    run_main(STAGE, main)
