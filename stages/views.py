"""Random views of images: the transforms the augment stage stores and train draws on the fly.

Each view draws its own rotation, translation and scale *per image* (torchvision's v2.RandomAffine
draws one transform per call, i.e. one for a whole batch). The warp is one batched affine_grid +
grid_sample over a chunk of images, on whatever device the images are on.

With elastic_alpha > 0 the same warp also displaces every pixel by a smooth random field (elastic
distortions, Simard et al. 2003), drawn per image.

Then, each only when its param is on (off, it draws no random numbers, so the output is the same
bytes as without it): a shift by whole pixels (zero-pad and crop back), a horizontal flip, and
random erasing (a black square). Each is a batched function of a chunk [N, H, W] uint8, drawing
per-image values from the caller's seeded generator.

A module of its own, so that an edit to the augment stage's I/O does not re-run train, which
imports only these (augment.on_the_fly).
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

from stages.params import AugmentParams


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


def gaussian_matrix(size: int, sigma: float, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """[size, size] matrix M such that x @ M blurs each row of x [..., size] with a Gaussian of `sigma`
    pixels, edges mirrored (a kernel of +-3 sigma, cut to the side). As a matrix product the blur of a
    whole chunk is one GEMM: 27x faster than conv2d with a 1 x 25 kernel on 1 channel (8,192 fields
    [2, 28, 28], sigma 4, one thread: 0.19 s against 5.1 s)."""
    radius = min(math.ceil(3 * sigma), size - 1)
    taps = torch.arange(-radius, radius + 1, device=device)
    kernel = torch.exp(-0.5 * (taps.to(dtype) / sigma) ** 2)
    kernel = kernel / kernel.sum()  # [2 radius + 1]
    out = torch.arange(size, device=device)[:, None]  # [size, 1]: output pixel j
    src = (out + taps).abs()  # [size, taps]: pixel j + t, mirrored at 0 ...
    src = torch.where(src > size - 1, 2 * (size - 1) - src, src)  # ... and at size - 1
    matrix = torch.zeros(size, size, dtype=dtype, device=device)
    matrix.index_put_((src, out.expand_as(src)), kernel.expand_as(src), accumulate=True)  # M[src, j] += k[t]
    return matrix


def gaussian_smooth(field: torch.Tensor, sigma: float) -> torch.Tensor:
    """Blurs each [H, W] plane of field [..., H, W] with a Gaussian of `sigma` pixels, separably, edges
    mirrored. (torchvision's gaussian_blur does the same with a convolution, but torchvision is not a
    dependency of the stages; see gaussian_matrix for why a matrix product.)"""
    h, w = field.shape[-2:]
    along_w = field @ gaussian_matrix(w, sigma, field.dtype, field.device)
    return gaussian_matrix(h, sigma, field.dtype, field.device).T @ along_w


def elastic_displacement(n: int, height: int, width: int, alpha: float, sigma: float,
                         generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """[n, H, W, 2] per-pixel (x, y) displacements in affine_grid's units (an image side is 2):
    U(-1, 1) per pixel and axis, Gaussian-smoothed by `sigma` pixels, times `alpha` pixels (Simard et
    al. 2003's convention; torchvision's ElasticTransform scales the same field to alpha / 2 pixels).
    On 28 x 28 images sigma 4 with alpha 34 (Simard's values) moves a pixel by 2.1 pixels on average
    (99th percentile 5.6), alpha 20 by 1.3 (3.3)."""
    noise = 2 * torch.rand(n, 2, height, width, generator=generator, device=device) - 1  # [n, (x, y), H, W]
    pixels = alpha * gaussian_smooth(noise, sigma)
    to_grid = torch.tensor([2 / width, 2 / height], dtype=pixels.dtype, device=device)  # grid units per pixel
    return pixels.permute(0, 2, 3, 1) * to_grid


def warp(images: torch.Tensor, theta: torch.Tensor, displacement: torch.Tensor | None = None) -> torch.Tensor:
    """Applies theta [N, 2, 3] and then, if given, displacement [N, H, W, 2] (added to the sampling
    grid) to uint8 images [N, H, W]; bilinear, black outside; returns uint8."""
    x = images.unsqueeze(1).float()  # [N, 1, H, W]
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)  # [N, H, W, 2]: source of each output pixel
    if displacement is not None:
        grid = grid + displacement
    warped = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    return warped.squeeze(1).round().clamp_(0, 255).to(torch.uint8)


def pad_crop(images: torch.Tensor, pad: int, generator: torch.Generator) -> torch.Tensor:
    """Shifts each image [N, H, W] by its own (dy, dx), each uniform in {-pad, ..., pad} pixels, filling
    with 0: zero-pad by `pad` on every side, then crop an H x W window at a random offset."""
    n, h, w = images.shape
    padded = F.pad(images, (pad, pad, pad, pad))  # [N, H+2p, W+2p]
    offset = torch.randint(0, 2 * pad + 1, (n, 2), generator=generator, device=images.device)
    rows = offset[:, :1] + torch.arange(h, device=images.device)  # [N, H]: source row of each output row
    cols = offset[:, 1:] + torch.arange(w, device=images.device)  # [N, W]
    index = torch.arange(n, device=images.device)[:, None, None]
    return padded[index, rows[:, :, None], cols[:, None, :]]


def random_flip(images: torch.Tensor, probability: float, generator: torch.Generator) -> torch.Tensor:
    """Mirrors each image [N, H, W] left-right with the given probability."""
    flip = torch.rand(len(images), generator=generator, device=images.device) < probability  # [N]
    return torch.where(flip[:, None, None], images.flip(-1), images)


def random_erase(images: torch.Tensor, probability: float, area_min: float, area_max: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Blacks out, with the given probability, one square per image [N, H, W]: its area is
    U(area_min, area_max) of the image's (side rounded to whole pixels, at least 1), placed uniformly
    where it lies wholly inside the image."""
    n, h, w = images.shape
    device = images.device
    erase = torch.rand(n, generator=generator, device=device) < probability  # [N]
    area = area_min + (area_max - area_min) * torch.rand(n, generator=generator, device=device)
    side = (area * h * w).sqrt().round().clamp(1, min(h, w)).long()  # [N] pixels
    top = (torch.rand(n, generator=generator, device=device) * (h - side + 1)).long()  # in [0, H - side]
    left = (torch.rand(n, generator=generator, device=device) * (w - side + 1)).long()
    rows = torch.arange(h, device=device)[None, :, None]  # [1, H, 1]
    cols = torch.arange(w, device=device)[None, None, :]  # [1, 1, W]
    inside = ((rows >= top[:, None, None]) & (rows < (top + side)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + side)[:, None, None]))  # [N, H, W]
    return images.masked_fill(inside & erase[:, None, None], 0)


def transform(images: torch.Tensor, cfg: AugmentParams, generator: torch.Generator) -> torch.Tensor:
    """One random transformed view of each image of a chunk [N, H, W] uint8, on the chunk's device:
    affine warp (with the elastic field when on), then (those switched on) pixel shift, flip, erasing.
    An empty chunk (a batch with no view to draw) comes back as it is, drawing nothing."""
    n, h, w = images.shape
    if n == 0:  # affine_grid refuses a size of 0
        return images.clone()
    theta = random_affine(n, cfg, generator, images.device)
    displacement = None
    if cfg.elastic_alpha > 0:
        displacement = elastic_displacement(n, h, w, cfg.elastic_alpha, cfg.elastic_sigma, generator, images.device)
    out = warp(images, theta, displacement)
    if cfg.pad > 0:
        out = pad_crop(out, cfg.pad, generator)
    if cfg.flip > 0:
        out = random_flip(out, cfg.flip, generator)
    if cfg.erase > 0:
        out = random_erase(out, cfg.erase, cfg.erase_area_min, cfg.erase_area_max, generator)
    return out


def view_drawer(recipe: dict, epoch: int, device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """on_the_fly: the function that draws, in training epoch `epoch` (from 1), one view of each image
    of a batch [B, H, W] uint8 on `device`, with the transform of `recipe` (the `on_the_fly` entry of
    this stage's output). Its generator lives on `device` and is seeded by the recipe's seed and the
    epoch alone, so a run resumed at an epoch draws what the unbroken run drew."""
    cfg = AugmentParams(**recipe)
    # train.epochs <= 1000 < 1024: a distinct seed per (seed, epoch), within manual_seed's 64 bits.
    generator = torch.Generator(device=device).manual_seed((cfg.seed * 1024 + epoch) % 2**63)
    return lambda images: transform(images, cfg, generator)
