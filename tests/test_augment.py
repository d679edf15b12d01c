"""stages.augment and stages.views: per-image random affine copies with the configured ranges and sane geometry, and
the optional pixel shift, flip and erasing."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from stages import augment as augment_mod
from stages.augment import augment, augmented_split
from stages.views import (elastic_displacement, gaussian_smooth, pad_crop, random_affine, random_erase, random_flip,
                          transform, view_drawer, warp)
from stages.params import AugmentParams
from tests.synthetic import make_split

CFG = AugmentParams(copies=1, on_the_fly=False, rotation_deg=15.0, translate=0.1, scale_min=0.8, scale_max=1.2,
                    elastic_alpha=0.0, elastic_sigma=4.0, pad=0, flip=0.0,
                    allow_flip=False, erase=0.0, erase_area_min=0.02, erase_area_max=0.25, seed=0)
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


def test_views_are_filled_chunk_by_chunk_in_the_originals_order(data, monkeypatch):
    """With chunks smaller than the split (7 of 20 images), each copy's chunks land in the
    originals' order: the images of transforming the chunks one after another, then joining them."""
    images, labels = data
    monkeypatch.setattr(augment_mod, "CHUNK", 7)
    cfg = dataclasses.replace(CFG, copies=2)
    out, _ = augment(images, labels, cfg, generator())
    drawn = generator()
    chunks = [transform(images[start:start + 7], cfg, drawn) for _ in range(2) for start in range(0, 20, 7)]
    assert torch.equal(out, torch.cat([images, *chunks]))


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
    """warp's coordinate convention: R(-a) for a = 90 degrees, no shift (the form of random_affine's
    matrices, written out here), turns an image like rot90."""
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


# --- pixel shift, flip and erasing -----------------------------------------------------------------

ALL_ON = dataclasses.replace(CFG, elastic_alpha=34.0, pad=3, flip=0.5, erase=0.5)
DEVICES = [CPU] + ([torch.device("cuda")] if torch.cuda.is_available() else [])


def dots(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n black images with one white pixel each at a random (row, col) at least 4 pixels from the
    edge; returns them [n, 28, 28] uint8 and the positions [n, 2]."""
    where = torch.randint(4, 24, (n, 2), generator=generator(5))
    images = torch.zeros(n, 28, 28, dtype=torch.uint8)
    images[torch.arange(n), where[:, 0], where[:, 1]] = 255
    return images, where


def test_views_do_not_depend_on_the_thread_count():
    """The augment stage's output is a cached DVC output, pulled by teammates whose machines have
    other core counts, and make queue gives each worker a share of the cores: the same params must
    draw the same bytes on any number of threads (the elastic field's blur is a float matmul and
    the warp a parallel grid_sample, either of which could split its sums by thread)."""
    images = torch.from_numpy(make_split(512, np.random.default_rng(3))[0])
    before = torch.get_num_threads()
    try:
        views = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            views.append(transform(images, ALL_ON, generator(3)))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(views[0], other) for other in views[1:])


def test_new_transforms_off_draw_nothing(data):
    """elastic, pad, flip and erase off: transform is exactly the affine warp and leaves the generator where
    the warp left it, so augment's output for MNIST is the same bytes as before these existed."""
    images = data[0]
    g_new, g_old = generator(7), generator(7)
    new = transform(images, CFG, g_new)
    old = warp(images, random_affine(len(images), CFG, g_old, CPU))
    assert torch.equal(new, old)
    assert torch.equal(g_new.get_state(), g_old.get_state())


def test_gaussian_smooth_matches_a_mirrored_convolution():
    """The matrix form equals the textbook blur: the field mirror-padded and convolved with the
    normalised Gaussian kernel along W, then along H (edges included, non-square planes too)."""
    field = torch.rand(3, 2, 20, 28, generator=generator(), dtype=torch.float64)
    sigma, radius = 2.5, 8  # the kernel spans +-ceil(3 sigma) pixels
    taps = torch.arange(-radius, radius + 1, dtype=torch.float64)
    kernel = torch.exp(-0.5 * (taps / sigma) ** 2)
    kernel = kernel / kernel.sum()
    x = field.reshape(6, 1, 20, 28)
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (radius, radius, 0, 0), mode="reflect"),
                                   kernel.view(1, 1, 1, -1))
    x = torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 0, radius, radius), mode="reflect"),
                                   kernel.view(1, 1, -1, 1))
    assert torch.allclose(gaussian_smooth(field, sigma), x.reshape(3, 2, 20, 28), atol=1e-12)


def test_gaussian_smooth_keeps_constants_and_mass():
    """A normalised blur: a constant field stays constant (mirrored edges), and an impulse spreads
    symmetrically with the Gaussian's variance along each axis."""
    constant = torch.full((2, 2, 28, 28), 0.7)
    assert torch.allclose(gaussian_smooth(constant, 4.0), constant)
    impulse = torch.zeros(1, 1, 28, 28)
    impulse[0, 0, 14, 14] = 1
    blurred = gaussian_smooth(impulse, 2.0)[0, 0]
    assert blurred.sum().item() == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(blurred, blurred.T, atol=1e-7)
    offsets = torch.arange(28.0) - 14
    variance = (blurred.sum(0) * offsets**2).sum().item()
    assert variance == pytest.approx(4.0, rel=0.02)  # the kernel is cut at 3 sigma: 1.2 % less


def test_elastic_displacement_is_smooth_scaled_and_seeded():
    """The field is [n, H, W, 2] in grid units (an image side is 2), proportional to alpha, smoother
    for a larger sigma, and the same for the same seed."""
    def field(alpha, sigma, seed=0):
        return elastic_displacement(500, 28, 28, alpha, sigma, generator(seed), CPU)
    d = field(20.0, 4.0)
    assert d.shape == (500, 28, 28, 2)
    assert torch.allclose(field(40.0, 4.0), 2 * d, atol=1e-6)
    assert torch.equal(d, field(20.0, 4.0)) and not torch.equal(d, field(20.0, 4.0, seed=1))
    mean_pixels = (d * 14).norm(dim=-1).mean().item()
    assert 0.8 < mean_pixels < 2.0  # 1.3 pixels measured: a gentle bend, not noise
    def roughness(f):  # mean change between neighbouring pixels, relative to the field's size
        return (f[:, 1:] - f[:, :-1]).abs().mean() / f.abs().mean()
    assert roughness(field(20.0, 6.0)) < roughness(d) < roughness(field(20.0, 1.0)) < 1


def test_elastic_moves_ink_locally(data):
    """Elastic distortions alone (no affine) change the strokes but keep them where they were: the
    ink is kept (a stretched stroke gains some, a squeezed one loses some: up to 17 % measured on
    these thin synthetic strokes) and the centre of mass stays within two pixels."""
    images = data[0]
    cfg = dataclasses.replace(IDENTITY, elastic_alpha=20.0, elastic_sigma=4.0)
    out = transform(images, cfg, generator())
    assert not torch.equal(out, images)
    ink_ratio = out.double().sum((1, 2)) / images.double().sum((1, 2))
    assert ((ink_ratio - 1).abs() < 0.25).all() and (ink_ratio.mean() - 1).abs() < 0.05
    assert (center_of_mass(out) - center_of_mass(images)).abs().max() < 2.0  # 1.1 measured
    assert torch.equal(out, transform(images, cfg, generator()))


def test_pad_crop_shifts_by_at_most_pad():
    """Each image moves by its own whole-pixel (dy, dx) within [-pad, pad], content intact, and the
    draws cover the whole range."""
    images, where = dots(2000)
    out = pad_crop(images, 3, generator())
    assert out.shape == images.shape and out.dtype == torch.uint8
    assert torch.equal(out.flatten(1).sum(1), images.flatten(1).sum(1))  # the dot stays inside
    found = (out == 255).flatten(1).int().argmax(1)
    moved = torch.stack([found // 28, found % 28], 1) - where
    assert moved.abs().max() == 3
    assert len(torch.unique(moved[:, 0])) == 7 and len(torch.unique(moved[:, 1])) == 7
    assert not torch.equal(moved[:, 0], moved[:, 1])  # the two axes are drawn independently


def test_pad_crop_fills_with_black():
    """What is shifted in from outside the image is 0."""
    images = torch.full((200, 28, 28), 255, dtype=torch.uint8)
    out = pad_crop(images, 2, generator())
    black = (out == 0).flatten(1).sum(1)  # [N] pixels shifted in
    assert black.min() == 0 and black.max() == 28 * 28 - 26 * 26  # a 2-pixel shift on both axes
    assert set(torch.unique(out).tolist()) == {0, 255}


def test_flip_mirrors_left_right(data):
    """Probability 1 mirrors every image, 0 none; 0.5 mirrors each image or leaves it whole, about half."""
    images = data[0]
    assert torch.equal(random_flip(images, 1.0, generator()), images.flip(-1))
    assert torch.equal(random_flip(images, 0.0, generator()), images)
    many = images.repeat(50, 1, 1)  # 1000 images
    out = random_flip(many, 0.5, generator())
    mirrored = (out == many.flip(-1)).flatten(1).all(1)
    kept = (out == many).flatten(1).all(1)
    assert (mirrored | kept).all()
    assert 400 < mirrored.sum() < 600


def test_erase_blacks_out_one_square_inside_the_image():
    """Probability 1: each image of white pixels gets one black square, wholly inside the image, its
    area within the range (up to the rounding of its side to whole pixels), of varied sizes."""
    images = torch.full((500, 28, 28), 255, dtype=torch.uint8)
    out = random_erase(images, 1.0, 0.05, 0.3, generator())
    assert out.shape == images.shape and out.dtype == torch.uint8
    black = out == 0
    rows, cols = black.any(2), black.any(1)  # [N, H], [N, W]
    height, width = rows.sum(1), cols.sum(1)
    assert torch.equal(height, width)  # a square...
    assert torch.equal(black.flatten(1).sum(1), height * width)  # ...filled, one per image
    side_min, side_max = round(math.sqrt(0.05) * 28), round(math.sqrt(0.3) * 28)
    assert height.min() >= side_min and height.max() <= side_max
    assert len(torch.unique(height)) >= side_max - side_min  # sizes spread over the range
    assert rows[:, 0].any() and rows[:, -1].any() and cols[:, 0].any() and cols[:, -1].any()  # reaches edges


def test_erase_probability(data):
    """Probability 0 erases nothing; 0.5 erases about half the images."""
    images = torch.full((1000, 28, 28), 255, dtype=torch.uint8)
    assert torch.equal(random_erase(images, 0.0, 0.1, 0.2, generator()), images)
    erased = (random_erase(images, 0.5, 0.1, 0.2, generator()) == 0).flatten(1).any(1)
    assert 400 < erased.sum() < 600


def test_all_on_is_seeded_and_per_image(data):
    """With shift, flip and erasing on, the same seed gives the same bytes, another seed others."""
    images = data[0].repeat(10, 1, 1)
    first = transform(images, ALL_ON, generator(0))
    assert torch.equal(first, transform(images, ALL_ON, generator(0)))
    assert not torch.equal(first, transform(images, ALL_ON, generator(1)))
    copies = first.view(10, 20, 28, 28)
    assert not torch.equal(copies[0], copies[1])  # the same image gets a different view each time


@pytest.mark.parametrize("device", DEVICES, ids=str)
def test_transforms_follow_the_device(data, device):
    """Each transform returns uint8 images of the input's shape on the input's device."""
    images = data[0].to(device)
    g = torch.Generator(device=device).manual_seed(0)
    for out in (pad_crop(images, 2, g), random_flip(images, 0.5, g), random_erase(images, 0.5, 0.02, 0.25, g),
                transform(images, ALL_ON, g)):
        assert out.device == images.device and out.shape == images.shape and out.dtype == torch.uint8


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU to compare devices")
def test_cuda_result_has_the_cpu_geometry(data):
    """On the GPU, flipping with probability 1 is the same mirror as on the CPU."""
    g = torch.Generator(device="cuda").manual_seed(0)
    assert torch.equal(random_flip(data[0].cuda(), 1.0, g).cpu(), data[0].flip(-1))


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


def test_on_the_fly_stores_no_views_but_the_recipe(data):
    """on_the_fly: the split unchanged (same tensor, views 0) and the params train draws with,
    plain values that load back into the same AugmentParams."""
    images, labels = data
    split = {"images": images, "labels": labels, "classes": list("0123456789"), "mean": 0.1, "std": 0.3}
    cfg = dataclasses.replace(CFG, copies=0, on_the_fly=True, seed=5)
    out = augmented_split(split, cfg)
    assert out["views"] == 0 and out["images"] is images and out["labels"] is labels
    assert AugmentParams(**out["on_the_fly"]) == cfg
    assert "on_the_fly" not in augmented_split(split, dataclasses.replace(CFG, copies=0))


def test_view_drawer_draws_the_transform_seeded_by_seed_and_epoch(data):
    """The drawer of epoch e is transform() from its own generator: the same (seed, epoch) draws the
    same views (a resumed run's epoch matches), another epoch or seed different ones; it keeps
    the batch's shape and dtype and changes the images."""
    images = data[0]
    recipe = dataclasses.asdict(dataclasses.replace(CFG, copies=0, on_the_fly=True))
    first = view_drawer(recipe, 1, CPU)(images)
    assert first.shape == images.shape and first.dtype == torch.uint8
    assert not torch.equal(first, images)
    assert torch.equal(view_drawer(recipe, 1, CPU)(images), first)
    assert torch.equal(first, transform(images, CFG, torch.Generator().manual_seed(0 * 1024 + 1)))
    assert not torch.equal(view_drawer(recipe, 2, CPU)(images), first)
    assert not torch.equal(view_drawer({**recipe, "seed": 1}, 1, CPU)(images), first)
    draw = view_drawer(recipe, 1, CPU)  # one generator per epoch: successive batches differ
    assert not torch.equal(draw(images), draw(images))
