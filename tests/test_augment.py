"""stages.augment: per-image random affine copies with the configured ranges and sane geometry."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages.augment import augment, augmented_split, random_affine, warp
from stages.params import AugmentParams
from tests.synthetic import make_split

CFG = AugmentParams(copies=1, rotation_deg=15.0, translate=0.1, scale_min=0.8, scale_max=1.2, seed=0)
IDENTITY = dataclasses.replace(CFG, rotation_deg=0.0, translate=0.0, scale_min=1.0, scale_max=1.0)
CPU = torch.device("cpu")


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = make_split(20, np.random.default_rng(0))
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64))


def decompose(theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(angle in radians, scale, shift [n, 2]) of the forward map s R(a) p + t, from the inverse
    matrices [n, 2, 3] that random_affine returns (R(-a) / s, -R(-a) t / s)."""
    inverse, offset = theta[:, :, :2].double(), theta[:, :, 2:].double()
    scale = inverse.det().rsqrt()
    angle = torch.atan2(inverse[:, 0, 1], inverse[:, 0, 0])
    shift = -(torch.linalg.inv(inverse) @ offset).squeeze(-1)
    return angle, scale, shift


def center_of_mass(images: torch.Tensor) -> torch.Tensor:
    """[N, 2] (row, col) intensity centres of [N, H, W] images."""
    weights = images.double()
    rows = torch.arange(images.shape[1], dtype=torch.float64)
    cols = torch.arange(images.shape[2], dtype=torch.float64)
    total = weights.sum((1, 2))
    return torch.stack([(weights.sum(2) * rows).sum(1) / total, (weights.sum(1) * cols).sum(1) / total], 1)


@pytest.mark.parametrize("copies", [1, 3])
def test_shapes_and_labels(data, copies):
    """Output is the originals then `copies` copies: [(copies+1) N, 28, 28] uint8, labels repeated."""
    images, labels = data
    out_images, out_labels = augment(images, labels, dataclasses.replace(CFG, copies=copies), generator())
    n = len(images)
    assert out_images.shape == (n * (copies + 1), 28, 28) and out_images.dtype == torch.uint8
    assert torch.equal(out_images[:n], images)
    assert torch.equal(out_labels, labels.repeat(copies + 1))
    assert not torch.equal(out_images[n:2 * n], images)


def test_zero_copies_pass_through(data):
    """copies 0 returns the train split unchanged."""
    images, labels = data
    out_images, out_labels = augment(images, labels, dataclasses.replace(CFG, copies=0), generator())
    assert torch.equal(out_images, images) and torch.equal(out_labels, labels)


def test_zero_ranges_are_the_identity(data):
    """No rotation, no shift and scale 1 reproduce each image (up to rounding)."""
    images, labels = data
    out_images, _ = augment(images, labels, IDENTITY, generator())
    diff = (out_images[len(images):].int() - images.int()).abs()
    assert diff.max() <= 1


def test_parameters_within_ranges():
    """Recovered angle, scale and shift stay in range, use most of it, and form a scaled rotation."""
    theta = random_affine(4000, CFG, generator(), CPU)
    assert theta.shape == (4000, 2, 3)
    torch.testing.assert_close(theta[:, 0, 0], theta[:, 1, 1])
    torch.testing.assert_close(theta[:, 0, 1], -theta[:, 1, 0])
    angle, scale, shift = decompose(theta)
    bound = math.radians(CFG.rotation_deg)
    eps = 1e-5
    assert angle.abs().max() <= bound + eps and angle.abs().max() > 0.95 * bound
    assert angle.min() < -0.9 * bound and angle.max() > 0.9 * bound  # both directions
    assert scale.min() >= CFG.scale_min - eps and scale.max() <= CFG.scale_max + eps
    assert scale.min() < CFG.scale_min + 0.02 and scale.max() > CFG.scale_max - 0.02
    limit = 2 * CFG.translate  # in affine_grid units: the image side is 2
    assert shift.abs().max() <= limit + eps and shift.abs().max() > 0.95 * limit


def test_parameters_differ_per_image():
    """Each image of one batch gets its own transform (not one draw for the whole batch)."""
    angle, scale, shift = decompose(random_affine(64, CFG, generator(), CPU))
    assert len(torch.unique(angle)) == 64
    assert len(torch.unique(scale)) == 64
    assert len(torch.unique(shift[:, 0])) == 64 and len(torch.unique(shift[:, 1])) == 64
    assert not torch.allclose(shift[:, 0], shift[:, 1])


def test_seeded(data):
    """The same seed gives identical output; another seed different output."""
    images, labels = data
    first, _ = augment(images, labels, CFG, generator(0))
    again, _ = augment(images, labels, CFG, generator(0))
    other, _ = augment(images, labels, CFG, generator(1))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)


def test_quarter_turn_matches_rot90(data):
    """The matrix random_affine builds for a = 90 degrees (R(-a), no shift) turns an image like rot90."""
    images = data[0][:4]
    theta = torch.tensor([[[0.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]]).expand(len(images), 2, 3)
    turned = warp(images, theta).int()
    errors = {k: (turned - torch.rot90(images, k, dims=(1, 2)).int()).abs().max().item() for k in (1, -1)}
    assert min(errors.values()) <= 1, errors
    assert max(errors.values()) > 50, "an asymmetric image must tell the two directions apart"


def test_translation_moves_center_of_mass():
    """A pure shift moves a central blob by shift * side / 2 pixels per axis (x = columns)."""
    images = torch.zeros(32, 28, 28, dtype=torch.uint8)
    images[:, 11:17, 11:17] = 200
    cfg = dataclasses.replace(IDENTITY, translate=0.1)
    out, _ = augment(images, torch.zeros(32, dtype=torch.int64), cfg, generator(3))
    _, _, shift = decompose(random_affine(32, cfg, generator(3), CPU))  # the draws augment made
    moved = center_of_mass(out[32:]) - center_of_mass(images)
    expected = torch.stack([shift[:, 1], shift[:, 0]], 1) * 28 / 2  # (rows, cols) in pixels
    assert (moved - expected).abs().max() < 0.25, (moved, expected)
    assert expected.abs().max() <= 0.1 * 28 + 1e-4 and expected.abs().max() > 0.8 * 0.1 * 28


def test_augmented_split_records_its_views_and_is_reproducible(data):
    """The stage's output: the train mapping with originals then `copies` views, `views` = copies,
    the same bytes for the same seed and independently drawn views (view 1 differs from view 2)."""
    images, labels = data
    split = {"images": images, "labels": labels, "classes": list("0123456789"), "mean": 0.1, "std": 0.3}
    cfg = dataclasses.replace(CFG, copies=3)
    out = augmented_split(split, cfg)
    n = len(images)
    assert out["views"] == 3 and out["classes"] == split["classes"] and out["mean"] == 0.1
    assert out["images"].shape == (4 * n, 28, 28) and torch.equal(out["images"][:n], images)
    assert not torch.equal(out["images"][n:2 * n], out["images"][2 * n:3 * n])
    assert torch.equal(augmented_split(split, cfg)["images"], out["images"])
    assert augmented_split(split, dataclasses.replace(CFG, copies=0))["views"] == 0
