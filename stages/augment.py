"""Stage augment: the train split plus `copies` randomly transformed copies of it.

The output is train.pt's mapping with images [(copies + 1) N, H, W] uint8: the N originals, then
view 1, ..., view `copies`, N images each, in the originals' order; labels [(copies + 1) N] to
match; and `views` = copies. train.fresh_views trains each epoch on the originals and one view (see
stages.train.epoch_rows), else on all of them.

Each copy draws its own rotation, translation and scale *per image* (torchvision's v2.RandomAffine
draws one transform per call, i.e. one for a whole batch). The warp is one batched affine_grid +
grid_sample over a chunk of images, on whatever device the images are on.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from stages import params as params_mod
from stages.common import Progress, load_tensors, log, run_main, save_tensors
from stages.params import AugmentParams

STAGE = "augment"
CHUNK = 8192  # images warped at once: ~8192*28*28*2 floats of grid, about 50 MB


def random_affine(n: int, cfg: AugmentParams, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, 2, 3] affine_grid matrices for per-image rotation, scale and shift.

    The forward transform maps a source point p to s * R(a) p + t (coordinates in [-1, 1], so a
    shift of `translate` image sides is 2 * translate). affine_grid wants the inverse, output -> source:
    p = R(-a) (q - t) / s.
    """
    def uniform(low: float, high: float, *shape: int) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, *shape, generator=generator, device=device)

    angle = uniform(-math.radians(cfg.rotation_deg), math.radians(cfg.rotation_deg))
    scale = uniform(cfg.scale_min, cfg.scale_max)
    shift = uniform(-2 * cfg.translate, 2 * cfg.translate, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    inverse = torch.stack([torch.stack([cos, sin], -1), torch.stack([-sin, cos], -1)], -2)  # R(-a)/s: [n,2,2]
    offset = -(inverse @ shift.unsqueeze(-1))  # [n, 2, 1]
    return torch.cat([inverse, offset], dim=-1)


def warp(images: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    """Applies theta [N, 2, 3] to uint8 images [N, H, W]; bilinear, black outside; returns uint8."""
    x = images.unsqueeze(1).float()  # [N, 1, H, W]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.squeeze(1).round().clamp_(0, 255).to(torch.uint8)


def augment(images: torch.Tensor, labels: torch.Tensor, cfg: AugmentParams,
            generator: torch.Generator, progress: Progress | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns the originals followed by cfg.copies transformed copies: [(copies+1) N, H, W], labels to match."""
    out = [images]
    for _ in range(cfg.copies):
        for start in range(0, len(images), CHUNK):
            chunk = images[start:start + CHUNK]
            out.append(warp(chunk, random_affine(len(chunk), cfg, generator, images.device)))
            if progress:
                progress.update(len(chunk))
    return torch.cat(out), labels.repeat(cfg.copies + 1)


def augmented_split(data: dict, cfg: AugmentParams, progress: Progress | None = None) -> dict:
    """The augment stage's output for the train split `data`: its mapping with the views appended
    (see the module docstring), drawn from a generator seeded with cfg.seed."""
    generator = torch.Generator().manual_seed(cfg.seed)
    images, labels = augment(data["images"], data["labels"], cfg, generator, progress)
    return {**data, "images": images, "labels": labels, "views": cfg.copies}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("train_in", type=Path)
    parser.add_argument("train_out", type=Path)
    args = parser.parse_args(argv)
    cfg = params_mod.load().augment
    data = load_tensors(args.train_in, required=("images", "labels"))
    progress = Progress(STAGE, "images transformed", cfg.copies * len(data["labels"]))
    out = augmented_split(data, cfg, progress)
    log(STAGE, f"{len(data['labels']):,} originals + {cfg.copies} copies = {len(out['labels']):,} train images")
    save_tensors(args.train_out, out)


if __name__ == "__main__":
    run_main(STAGE, main)
