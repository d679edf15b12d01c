"""predict on hostile and unusual images: every format and encoding gives the digit the plain
greyscale PNG gives, memory stays bounded, and every bad file costs exactly one error line."""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw, ImageFont, features

from stages import predict
from stages.common import PipelineError
from stages.idx import write_idx
from stages.model_config import ModelConfig
from stages.models import FORMAT_VERSION, build_model, save_model
from tests.conftest import PROJECT_ROOT
from tests.test_models import Exploit

SCALE = 4  # the 28x28 digit is saved at 112x112, as a small scan would be


def mnist_like_digit(digit: str = "3") -> np.ndarray:
    """uint8 [28, 28], light ink on black: a font digit put through the MNIST recipe."""
    image = Image.new("L", (180, 240), 0)
    ImageDraw.Draw(image).text((15, 5), digit, fill=255, font=ImageFont.load_default(size=150))
    return predict.frame(predict.extract_ink(np.asarray(image)))


@pytest.fixture(scope="module")
def ink() -> np.ndarray:
    """uint8 [112, 112]: the digit's ink (0 = none, 255 = full) at scan size."""
    return np.asarray(Image.fromarray(mnist_like_digit()).resize((28 * SCALE, 28 * SCALE), Image.BICUBIC))


def derived(path: Path) -> predict.Sample:
    [sample] = predict.load_samples(path, 28)
    return sample


@pytest.fixture(scope="module")
def reference(ink, tmp_path_factory) -> np.ndarray:
    """What predict derives from the plain 8-bit greyscale PNG: dark ink on white paper."""
    path = tmp_path_factory.mktemp("reference") / "plain.png"
    Image.fromarray(255 - ink).save(path)
    return derived(path).image.astype(int)


def rgba(ink: np.ndarray, colour: int) -> Image.Image:
    """Ink drawn in alpha, in one colour over a fully transparent background."""
    return Image.fromarray(np.dstack([np.full_like(ink, colour)] * 3 + [ink]), "RGBA")


def palette_with_transparent_background(ink: np.ndarray) -> Image.Image:
    image = Image.fromarray(255 - ink).convert("P")  # L -> P keeps the values, with a grey palette
    image.info["transparency"] = 255  # the white background's palette index
    return image


def rotated_by_sensor(ink: np.ndarray, path: Path, **options) -> Path:
    """The digit as a phone stores a photo taken in portrait: pixels turned 90 degrees, with EXIF
    Orientation 6 ("rotate 90 degrees clockwise to view") saying so."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(255 - ink).transpose(Image.Transpose.ROTATE_90).save(path, exif=exif, **options)
    return path


def save(image: Image.Image, path: Path, **options) -> Path:
    image.save(path, **options)
    return path


def grey(ink: np.ndarray, mode: str = "L") -> Image.Image:
    """Dark ink on white paper, in `mode`."""
    return Image.fromarray(255 - ink).convert(mode)


# name -> (writer(ink, directory) -> path, largest difference allowed per pixel, frames in the file)
# Lossless encodings must give the reference exactly (alpha compositing may round by 1); JPEG's
# loss moves a few pixels a little.
FORMATS = {
    "rgb-png": (lambda ink, d: save(grey(ink, "RGB"), d / "a.png"), 0, 1),
    "rgba-png-black-ink-in-alpha": (lambda ink, d: save(rgba(ink, 0), d / "a.png"), 1, 1),
    "rgba-png-white-ink-in-alpha": (lambda ink, d: save(rgba(ink, 255), d / "a.png"), 1, 1),
    "la-png-ink-in-alpha": (lambda ink, d: save(rgba(ink, 0).convert("LA"), d / "a.png"), 1, 1),
    "palette-png-transparent-background": (
        lambda ink, d: save(palette_with_transparent_background(ink), d / "a.png", transparency=255), 1, 1),
    "grey-16-bit-png": (
        lambda ink, d: save(Image.fromarray((255 - ink).astype(np.uint16) * 257), d / "a.png"), 0, 1),
    # Fewer bits than the container: 12-bit data (a scanner's, a medical image's) in a 16-bit PNG,
    # 8-bit values in a 32-bit integer TIFF. White is the top of the values' depth.
    "grey-12-bit-in-16-bit-png": (
        lambda ink, d: save(Image.fromarray((((255 - ink).astype(np.uint32) * 4095 + 127) // 255).astype(np.uint16)),
                           d / "a.png"), 1, 1),
    "grey-8-bit-in-32-bit-tiff": (lambda ink, d: save(grey(ink, "I"), d / "a.tif"), 0, 1),
    "png-exif-rotate-90": (lambda ink, d: rotated_by_sensor(ink, d / "a.png"), 0, 1),
    "jpeg-exif-rotate-90": (lambda ink, d: rotated_by_sensor(ink, d / "a.jpg", quality=95), 24, 1),
    "jpeg": (lambda ink, d: save(grey(ink), d / "a.jpg", quality=95), 24, 1),
    "progressive-jpeg": (lambda ink, d: save(grey(ink, "RGB"), d / "a.jpg", quality=95, progressive=True), 24, 1),
    "cmyk-jpeg": (lambda ink, d: save(grey(ink, "CMYK"), d / "a.jpg", quality=95), 24, 1),
    "gif-two-frames": (lambda ink, d: save(grey(ink), d / "a.gif", save_all=True,
                                           append_images=[Image.fromarray(ink)]), 0, 2),
    "tiff-two-frames": (lambda ink, d: save(grey(ink), d / "a.tif", save_all=True,
                                            append_images=[Image.fromarray(ink)]), 0, 2),
    "webp-lossless": (lambda ink, d: save(grey(ink, "RGB"), d / "a.webp", lossless=True), 0, 1),
    "bmp": (lambda ink, d: save(grey(ink), d / "a.bmp"), 0, 1),
    "float-tiff-0-to-255": (lambda ink, d: save(grey(ink, "F"), d / "a.tif"), 0, 1),
    # Normalising tools write grey levels as 0..1 floats: scaled to 0..255, not taken as near-black.
    "float-tiff-0-to-1": (lambda ink, d: save(Image.fromarray(((255 - ink) / 255).astype(np.float32), "F"),
                                              d / "a.tif"), 1, 1),
    # ... and resampling overshoots 1 a little: still 0..1, not near-black 0..255.
    "float-tiff-0-to-1.05": (lambda ink, d: save(Image.fromarray(((255 - ink) / 255 * 1.05).astype(np.float32), "F"),
                                                 d / "a.tif"), 16, 1),
}


@pytest.mark.parametrize("name", FORMATS)
def test_every_format_gives_the_digit_of_the_plain_greyscale_png(name, ink, reference, tmp_path):
    if name.startswith("webp") and not features.check("webp"):
        pytest.skip("this Pillow was built without WebP support")
    write, tolerance, frames = FORMATS[name]
    sample = derived(write(ink, tmp_path))
    difference = np.abs(sample.image.astype(int) - reference)
    assert difference.max() <= tolerance, f"{name}: differs by up to {difference.max()} levels"
    assert difference.mean() <= max(tolerance / 8, 0.01)
    assert not sample.blank and sample.frames == frames


def test_sixteen_bit_grey_is_scaled_not_clipped():
    """65535 is white: a mid-grey 16-bit pixel is mid-grey in 8 bits, not clipped to white."""
    image = Image.fromarray(np.array([[0, 32896, 65535]], np.uint16))
    assert predict.grey_ink(image).tolist() == [[0.0, 128.0, 255.0]]


def test_alpha_is_composited_onto_the_background_the_ink_stands_out_from():
    alpha = np.array([[0.0, 255.0, 128.0]])
    black_ink = predict.composite_alpha(np.zeros((1, 3)), alpha)
    white_ink = predict.composite_alpha(np.full((1, 3), 255.0), alpha)
    assert np.allclose(black_ink, [[255.0, 0.0, 127.0]])  # laid on white
    assert np.allclose(white_ink, [[0.0, 255.0, 128.0]])  # laid on black
    # A keyed image: the canvas colour (white) under the transparent pixel, opaque light edges.
    keyed = predict.composite_alpha(np.array([[255.0, 0.0, 230.0]]), np.array([[0.0, 255.0, 255.0]]))
    assert keyed.tolist() == [[255.0, 0.0, 230.0]]
    opaque = np.array([[10.0, 200.0, 30.0]])
    assert predict.composite_alpha(opaque, np.full((1, 3), 255.0)).tolist() == opaque.tolist()


def test_a_24_megapixel_jpeg_is_reduced_while_decoding(ink, reference, tmp_path):
    """6000x4000: JPEG's DCT scaling decodes it at 1/4 (1500x1000), never at full size."""
    photo = Image.new("L", (6000, 4000), 255)
    photo.paste(Image.fromarray(255 - ink).resize((4000, 4000), Image.BICUBIC), (1000, 0))
    path = save(photo, tmp_path / "photo.jpg", quality=90)
    with open(path, "rb") as file:
        decoded = predict.decode(file, path).image
    assert decoded.size == (1500, 1000)
    # The white margins move nothing: the digit is cut out by its ink.
    assert np.abs(derived(path).image.astype(int) - reference).mean() <= 3


def test_a_camera_mpo_is_one_picture_reduced_while_decoding(ink, reference, tmp_path):
    """MPO: a JPEG with a second picture (a camera's preview), which Pillow opens as its own format."""
    photo = Image.new("L", (2500, 2000), 255)
    photo.paste(Image.fromarray(255 - ink).resize((2000, 2000), Image.BICUBIC), (250, 0))
    path = save(photo, tmp_path / "photo.jpg", format="MPO", save_all=True, append_images=[photo.resize((250, 200))])
    with open(path, "rb") as file:
        decoded = predict.decode(file, path)
    assert decoded.image.format == "MPO"
    assert decoded.image.size == (1250, 1000) and decoded.frames == 1  # decoded at 1/2
    assert np.abs(derived(path).image.astype(int) - reference).mean() <= 3


def test_tiff_pages_are_counted_up_to_a_bound(ink, tmp_path, monkeypatch):
    """A TIFF of thousands of pages would take seconds to count: the count stops at the bound."""
    frames = [Image.fromarray(255 - ink)] + [Image.new("L", ink.shape, level) for level in range(4)]
    path = save(frames[0], tmp_path / "five.tif", save_all=True, append_images=frames[1:])
    gif = save(frames[0], tmp_path / "five.gif", save_all=True, append_images=frames[1:])
    assert derived(path).frames == 5
    monkeypatch.setattr(predict, "MAX_COUNTED_FRAMES", 3)
    assert derived(gif).frames == 5  # GIF's frames are counted from their headers, whatever their number
    sample = derived(path)
    assert sample.frames == 3 and not sample.blank  # the first page is still the one classified
    row = predict.result_rows([sample], np.array([3]), np.array([0.9]), [str(k) for k in range(10)])[0]
    assert predict.text_line(row) == f"{path}: 3 (90.0%), first of 3 or more frames"


@pytest.mark.parametrize("suffix", ["gif", "png"])
def test_a_later_frame_cut_short_leaves_the_first_one_classified(ink, tmp_path, suffix):
    """Counting an animation's frames reads their headers, never their pixels: a GIF or APNG cut
    off inside its second frame (an interrupted download) still gives its first."""
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, ink.shape, dtype=np.uint8))
    path = save(Image.fromarray(255 - ink), tmp_path / f"a.{suffix}", save_all=True, append_images=[noise])
    path.write_bytes(path.read_bytes()[:-1500])  # the second frame's pixels take more than that
    sample = derived(path)
    assert sample.frames == 2 and not sample.blank


def test_a_format_this_pillow_lacks_is_named_as_missing(tmp_path, monkeypatch):
    """A Pillow built without AVIF (a distribution's, say): the file is named, not called damaged."""
    path = tmp_path / "photo.avif"
    path.write_bytes(b"\0\0\0\x1cftypavif\0\0\0\0avifmif1miaf" + bytes(100))
    monkeypatch.setattr(predict, "raster_formats", lambda: ("PNG", "JPEG"))
    with pytest.raises(PipelineError, match=r"photo.avif: AVIF, which this Pillow was built without \(PNG, JPEG\): "):
        predict.load_samples(path, 28)


def test_other_large_images_are_shrunk_before_the_pixel_work(tmp_path):
    image = Image.new("I;16", (5000, 3000))
    assert predict.shrink(image).size == (1250, 750)  # factor 4 brings 5000 into 1024..2047
    assert predict.shrink(Image.new("P", (1000, 2000))).size == (1000, 2000)  # small enough


@pytest.mark.parametrize("suffix", ["png", "webp"])
def test_a_large_photo_stored_turned_is_turned_after_it_is_shrunk(ink, reference, tmp_path, monkeypatch, suffix):
    """A 3000x4000 photo, pixels stored as the sensor saw them and EXIF "rotate 90°": the turn is
    made on the shrunk image (a turned full-size copy doubled the memory: 219 -> 368 MiB added
    for an 8000x6000 RGB PNG) and gives the digit of the photo stored upright."""
    if suffix == "webp" and not features.check("webp"):
        pytest.skip("this Pillow was built without WebP support")
    photo = Image.new("L", (3000, 4000), 255)
    photo.paste(Image.fromarray(255 - ink).resize((3000, 3000), Image.BICUBIC), (0, 500))
    upright = save(photo, tmp_path / f"upright.{suffix}", lossless=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    stored = save(photo.transpose(Image.Transpose.ROTATE_90), tmp_path / f"stored.{suffix}", exif=exif, lossless=True)
    turned = []
    transpose = Image.Image.transpose
    monkeypatch.setattr(Image.Image, "transpose", lambda image, method: turned.append(image.size) or transpose(image, method))
    assert np.array_equal(derived(stored).image, derived(upright).image)
    assert turned == [(1334, 1000)]  # 4000x3000 reduced by 3 (a partial last block kept), then turned
    assert np.abs(derived(upright).image.astype(int) - reference).mean() <= 3


def test_images_above_the_pixel_limit_are_refused_before_decoding(tmp_path, monkeypatch):
    path = save(Image.new("L", (300, 200)), tmp_path / "big.png")
    monkeypatch.setattr(predict, "MAX_PIXELS", 50_000)
    with pytest.raises(PipelineError, match=r"big.png: refused, 300x200 is 60,000 pixels, more than the 50,000-pixel"):
        predict.load_samples(path, 28)


def test_a_decompression_bomb_is_refused(tmp_path):
    """A 90 KB PNG that declares 20000x20000 pixels (400 MP)."""
    path = save(Image.new("1", (20000, 20000), 1), tmp_path / "bomb.png")
    assert path.stat().st_size < 200_000
    with pytest.raises(PipelineError, match=r"bomb.png: refused, .*50,000,000-pixel limit"):
        predict.load_samples(path, 28)


def test_a_progressive_jpeg_of_too_many_scans_is_refused_before_decoding(ink, reference, tmp_path):
    """Each scan decodes the whole image again and libjpeg takes any number of them: a 2 MB file
    of 50,000 repeated scans would take about 35 minutes at 49 MP. Over MAX_JPEG_SCANS: refused
    without decoding; under it, decoded as ever."""
    data = io.BytesIO()
    Image.fromarray(255 - ink).convert("RGB").save(data, "JPEG", progressive=True, quality=95)
    data = data.getvalue()
    last_scan = data[data.rindex(b"\xff\xda"):-2]  # the last SOS segment and its data, to EOI
    assert predict.jpeg_scans(io.BytesIO(data), predict.MAX_JPEG_SCANS) == 10  # libjpeg's script for colour
    many = data[:-2] + last_scan * 150 + data[-2:]
    first_scan = many.index(b"\xff\xda")
    junk = many[:first_scan] + b"\x00" + many[first_scan:]  # libjpeg skips a stray byte before a marker
    for name, content in (("many.jpg", many), ("junk.jpg", junk)):
        with pytest.raises(PipelineError, match=rf"{name}: refused, a progressive JPEG of more than 100 scans \(each "
                                                r"decodes the whole image again; .*counted 101 before stopping\)"):
            predict.load_samples(str(save_bytes(tmp_path / name, content)), 28)
    fewer = save_bytes(tmp_path / "fewer.jpg", data[:-2] + last_scan * 80 + data[-2:])
    assert predict.jpeg_scans(io.BytesIO(fewer.read_bytes()), predict.MAX_JPEG_SCANS) == 90
    assert not predict.load_samples(str(fewer), 28)[0].blank
    plain = save_bytes(tmp_path / "plain.jpg", data)
    assert np.abs(predict.load_samples(str(plain), 28)[0].image.astype(int) - reference).max() <= 24  # as "jpeg"


def save_bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_a_gzip_bomb_idx_file_is_refused_within_bounded_memory(tmp_path):
    """60 KB of gzip declaring 80,000 MNIST images (63 MB): refused at the 50 MP limit, read no further."""
    count = 80_000
    header = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in (count, 28, 28))
    path = tmp_path / "bomb-images-idx3-ubyte.gz"
    path.write_bytes(gzip.compress(header + bytes(count * 28 * 28), compresslevel=9))
    assert path.stat().st_size < 100_000
    with pytest.raises(PipelineError, match=r"bomb-images-idx3-ubyte.gz: .*content larger than 50,001,024 bytes"):
        predict.load_samples(path, 28)


@pytest.mark.parametrize("background, noise", [(255, 0), (250, 10), (0, 12), (128, 0)])
def test_blank_and_nearly_blank_images_are_blank(background, noise, tmp_path):
    rng = np.random.default_rng(0)
    pixels = np.clip(background + rng.integers(-noise, noise + 1, (60, 80)), 0, 255).astype(np.uint8)
    sample = derived(save(Image.fromarray(pixels), tmp_path / "blank.png"))
    assert sample.blank and sample.image.max() == 0


def test_a_fully_transparent_image_is_blank(tmp_path):
    assert derived(save(Image.new("RGBA", (40, 40), (0, 0, 0, 0)), tmp_path / "clear.png")).blank


def test_a_faint_but_real_digit_is_not_blank(ink, tmp_path):
    faint = (255 - ink.astype(int) * 60 // 255).astype(np.uint8)  # ink only 60 levels below white
    assert not derived(save(Image.fromarray(faint), tmp_path / "faint.png")).blank


def test_a_bold_digit_cropped_to_its_ink_keeps_its_ink(tmp_path):
    """A thick-stroked digit cropped to its bounding box is more than half ink, so the median of
    the whole image is the ink's level: taken as the background, it erased the digit (blank)."""
    image = Image.new("L", (180, 240), 255)
    ImageDraw.Draw(image).text((15, 5), "4", fill=0, font=ImageFont.load_default(size=150), stroke_width=12,
                               stroke_fill=0)
    with_margin = np.asarray(image)
    rows, cols = np.nonzero(with_margin < 128)
    tight = with_margin[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    assert (tight < 128).mean() > 0.5, "the case: more ink than paper"
    cropped = derived(save(Image.fromarray(tight), tmp_path / "tight.png"))
    assert not cropped.blank
    framed = derived(save(Image.fromarray(with_margin), tmp_path / "margin.png")).image
    assert np.corrcoef(cropped.image.ravel().astype(float), framed.ravel().astype(float))[0, 1] > 0.95
    # ... while grey paper inside a white margin is still the background, not the ink it holds
    on_grey = np.where(with_margin < 128, with_margin, 200).astype(np.uint8)
    in_margin = derived(save(Image.fromarray(np.pad(on_grey, 20, constant_values=255)), tmp_path / "m.png")).image
    assert np.corrcoef(in_margin.ravel().astype(float), framed.ravel().astype(float))[0, 1] > 0.95
    empty_page = np.pad(np.full((200, 150), 215, np.uint8), 1, constant_values=255)
    assert derived(save(Image.fromarray(empty_page), tmp_path / "empty.png")).blank


def photographed(ink: np.ndarray, lighting: str, depth: float) -> Image.Image:
    """A 1600x1200 phone photo of the digit drawn dark (25) on paper (235), its paper up to `depth`
    grey levels darker where the light is weaker: a lens's vignette (darker corners), light from
    above (darker towards the bottom), or a hand's soft shadow over the left third."""
    height, width = 1200, 1600
    page = np.full((height, width), 235.0)
    digit = np.asarray(Image.fromarray(ink).resize((600, 600), Image.BICUBIC), np.float64) / 255
    page[300:900, 500:1100] -= digit * (235 - 25)
    y, x = np.mgrid[0:height, 0:width] + 0.5
    darker = {"even": np.zeros_like(page),
              "vignette": ((x / width - 0.5) ** 2 + (y / height - 0.5) ** 2) * 2,
              "from-above": y / height,
              "soft-shadow": np.clip((0.4 * width - x) / (0.15 * width), 0, 1)}[lighting]
    return Image.fromarray(np.clip(page - depth * darker, 0, 255).round().astype(np.uint8))


@pytest.mark.parametrize("lighting, depth", [("vignette", 60), ("from-above", 60), ("soft-shadow", 45)])
def test_a_photo_under_uneven_light_gives_the_evenly_lit_digit(ink, tmp_path, lighting, depth):
    """Paper up to 45-60 levels darker in the corners, towards the bottom or in a shadow. Levelled
    by one grey (the median), the darker paper was ink: the digit's box took in the page, and the
    digit shrank into a corner of a grey rectangle (correlation 0.0-0.2 with the even photo's)."""
    even = derived(save(photographed(ink, "even", 0), tmp_path / "even.jpg", quality=90)).image.astype(float)
    uneven = derived(save(photographed(ink, lighting, depth), tmp_path / f"{lighting}.jpg", quality=90))
    assert not uneven.blank
    assert np.corrcoef(even.ravel(), uneven.image.ravel().astype(float))[0, 1] > 0.98


@pytest.mark.parametrize("lighting, depth", [("vignette", 60), ("from-above", 60), ("soft-shadow", 45)])
def test_an_empty_page_under_uneven_light_is_blank(tmp_path, lighting, depth):
    page = photographed(np.zeros((112, 112), np.uint8), lighting, depth)
    assert derived(save(page, tmp_path / "empty.jpg", quality=90)).blank


def test_the_paper_level_of_one_grey_is_that_grey_and_ignores_ink_and_margins():
    """On flat paper the fitted surface is the paper's grey: neither the ink (far above it) nor a
    margin of another grey (far below) bends it; with too little paper, the first guess."""
    page = np.full((90, 120), 40.0)
    page[30:60, 50:60] = 230  # a stroke
    page[:, :8] = 0  # a margin
    assert np.allclose(predict.paper_level(page, 40.0), 40.0)
    assert np.allclose(predict.paper_level(np.full((50, 50), 200.0), 30.0), 30.0)  # no pixel near 30
    # A strip: reduced by one factor for both axes, 40x2000 kept two rows, and a curve fitted to
    # two rows bent flat paper by up to 7 levels at full size.
    strip = np.full((40, 2000), 120.0) + np.random.default_rng(0).normal(0, 1, (40, 2000))
    assert np.abs(predict.paper_level(strip, 120.0) - 120).max() < 0.5


@pytest.mark.parametrize("margin_from", [440, 500])
def test_paper_beside_a_lighter_margin_stays_paper(ink, tmp_path, margin_from):
    """Grey paper (225) with a white margin over its right part: blocks across the edge, averaged,
    fell inside the band and bent the surface down towards the margin, so the paper near it read
    as ink and the digit's box took in most of the page (a 7 read as a 1). Block medians do not."""
    page = np.full((600, 800), 225.0)
    page[200:400, 120:320] -= np.asarray(Image.fromarray(ink).resize((200, 200), Image.BICUBIC)) * (200 / 255)
    noise = np.random.default_rng(1).normal(0, 3, page.shape)
    plain = derived(save(Image.fromarray(np.clip(page + noise, 0, 255).round().astype(np.uint8)), tmp_path / "p.png"))
    page[:, margin_from:] = 255
    margin = derived(save(Image.fromarray(np.clip(page + noise, 0, 255).round().astype(np.uint8)), tmp_path / "m.png"))
    assert np.corrcoef(plain.image.ravel().astype(float), margin.image.ravel().astype(float))[0, 1] > 0.98


def bad_files(directory: Path, ink: np.ndarray) -> dict[str, Path]:
    """name -> a file (or not-a-file) that must get exactly one error line."""
    png = save(grey(ink), directory / "good.png").read_bytes()
    jpeg = save(grey(ink), directory / "good.jpg", quality=90).read_bytes()
    files = {
        "truncated-png": png[:len(png) // 2],
        "truncated-jpeg": jpeg[:len(jpeg) // 2],
        "zero-bytes": b"",
        "random-bytes": bytes(range(256)) * 4,
        "png-header-only": png[:33],
        "idx-of-no-images": write_idx(np.zeros((0, 28, 28), np.uint8)),
        # Pillow would hand PostScript to Ghostscript (an interpreter) whatever the file's name.
        "postscript-named-png": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 28 28\n0 0 moveto 28 28 lineto stroke\n",
        # An iPhone photo's start (ISO box "ftyp", brand heic); Pillow has no HEIC decoder.
        "heic-photo": b"\0\0\0\x18ftypheic\0\0\0\0mif1heic" + bytes(200),
        "pdf-scan": b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n<< /Type /Catalog >>\nendobj\n",
        # Pillow decodes an icon's largest image inside Image.open, before any size check.
        "icon": save(grey(ink), directory / "good.ico").read_bytes(),
        "gzipped-png": gzip.compress(png),
        # A HEIF whose major brand is the generic mif1 (which Pillow's AVIF check takes) is still HEIC.
        "heif-mif1-photo": b"\0\0\0\x18ftypmif1\0\0\0\0mif1heic" + bytes(200),
        # Text that Pillow's checks would take for XBM or PPM: no format is named.
        "c-source": b"/* main.c */\nint main(void) { return 0; }\n",
        "python-notes": b"Python notes: see the README\n",
    }
    paths = {}
    for name, data in files.items():
        paths[name] = directory / name
        paths[name].write_bytes(data)
    paths["directory"] = directory / "a-directory"
    paths["directory"].mkdir()
    paths["symlink-loop"] = directory / "loop-a"
    os.symlink(directory / "loop-b", directory / "loop-a")
    os.symlink(directory / "loop-a", directory / "loop-b")
    paths["missing"] = directory / "missing.png"
    # Past the IDX size bound, and sparse: read whole it would be refused as too large an IDX file.
    paths["large-text"] = directory / "notes.txt"
    with open(paths["large-text"], "wb") as file:
        file.write(b"notes\n")
        file.truncate(predict.MAX_PIXELS + 2 * predict.IDX_HEADER_ALLOWANCE)
    return paths


EXPECTED_REASONS = {
    "truncated-png": "damaged or unsupported image",
    "truncated-jpeg": "damaged or unsupported image",
    "zero-bytes": "empty file (0 bytes)",
    "random-bytes": "neither an image predict reads (PNG, JPEG, GIF, BMP, TIFF, WebP, AVIF, PBM/PGM/PPM) nor "
                    "an IDX file (it begins 00 01 02 03 04 05 06 07)",
    # Pillow's PNG plugin gives up at open; the signature says what it was meant to be
    "png-header-only": "damaged or unsupported image (PNG signature, but the header cannot be read)",
    "idx-of-no-images": "IDX file holds no images",
    "postscript-named-png": "EPS is not a format predict reads (PNG, JPEG, GIF, BMP, TIFF, WebP, AVIF, "
                            "PBM/PGM/PPM): convert the image to PNG",
    "heic-photo": "HEIC is not a format predict reads",
    "pdf-scan": "PDF is not a format predict reads",
    "icon": "ICO is not a format predict reads",
    "gzipped-png": "neither an image predict reads (PNG, JPEG, GIF, BMP, TIFF, WebP, AVIF, PBM/PGM/PPM) nor "
                   "a usable IDX file (not an IDX file (bad magic number 89504e47))",
    "large-text": "neither an image predict reads",
    "heif-mif1-photo": "HEIC is not a format predict reads",
    "c-source": "neither an image predict reads (PNG, JPEG, GIF, BMP, TIFF, WebP, AVIF, PBM/PGM/PPM) nor an IDX "
                "file (it begins 2f 2a 20 6d 61 69 6e 2e)",
    "python-notes": "neither an image predict reads",
    "directory": "is a directory",
    "symlink-loop": "cannot read (Too many levels of symbolic links)",
    "missing": "no such file",
}


def test_each_bad_file_gets_its_own_one_line_reason(ink, tmp_path):
    for name, path in bad_files(tmp_path, ink).items():
        with pytest.raises(PipelineError) as raised:
            predict.load_samples(path, 28)
        message = str(raised.value)
        assert message.startswith(f"{path}: {EXPECTED_REASONS[name]}"), message
        assert "\n" not in message


# ---------------------------------------------------------------------------------------------
# The command, with the small model of a synthetic pipeline run (see tests/conftest.py)


def run_main(*argv: str) -> tuple[int, list[str], list[str]]:
    """predict.main in this process: (exit status, stdout lines, stderr lines). Any exception
    other than SystemExit escapes, failing the test."""
    out, err = io.StringIO(), io.StringIO()
    status = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            predict.main(list(argv))
        except SystemExit as exc:
            status = exc.code
    return status, out.getvalue().splitlines(), err.getvalue().splitlines()


def image_header(kind: str) -> bytes:
    """A valid header of each format, for the fuzz test to append random bodies to."""
    buffer = io.BytesIO()
    Image.new("L", (16, 16), 200).save(buffer, format=kind)
    data = buffer.getvalue()
    return data[:{"PNG": 33, "JPEG": 20, "GIF": 13}[kind]]  # signature + IHDR / SOI + APP0 / screen


HEADERS = [image_header(kind) for kind in ("PNG", "JPEG", "GIF")]


def whole_image(kind: str, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.tile(np.arange(0, 256, 8, dtype=np.uint8), (32, 1))).convert(mode).save(buffer, format=kind)
    return buffer.getvalue()


# Pillow's decoders differ in how they fail: PPM raises ValueError, TIFF warns about bad tags, ...
WHOLE = [whole_image(kind) for kind in ("PNG", "JPEG", "GIF", "TIFF", "WEBP", "BMP", "PPM", "ICO", "TGA")]
WHOLE += [whole_image("TIFF", "RGB"), whole_image("PNG", "RGBA"), whole_image("JPEG", "CMYK")]


def corrupt(data: bytes, changes: list[tuple[int, int]]) -> bytes:
    """`data` with the byte at each position (modulo its length) replaced."""
    out = bytearray(data)
    for position, value in changes:
        out[position % len(out)] = value
    return bytes(out)


fuzzed_files = st.one_of(
    st.binary(max_size=300),  # random bytes
    # a valid header, a random body
    st.tuples(st.sampled_from(HEADERS), st.binary(max_size=300)).map(lambda t: t[0] + t[1]),
    st.tuples(st.sampled_from(WHOLE), st.floats(0, 1)).map(lambda t: t[0][:int(len(t[0]) * t[1])]),  # truncated
    st.tuples(st.sampled_from(WHOLE),  # a few bytes changed
              st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=4)).map(
        lambda t: corrupt(*t)),
)


@pytest.mark.integration
@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(fuzzed_files, min_size=1, max_size=4))
def test_fuzzed_files_get_one_line_each_and_never_a_traceback(built_project, files):
    model = str(built_project.path("models/model.pt"))
    with tempfile.TemporaryDirectory() as directory:
        paths = []
        for i, data in enumerate(files):
            paths.append(Path(directory) / f"file{i}")
            paths[-1].write_bytes(data)
        status, out, err = run_main("--model", model, *map(str, paths))
    assert len(out) + len(err) == len(files), (out, err)
    lines = out + [line.removeprefix("predict: error: ") for line in err]
    assert all(any(line.startswith(f"{p}: ") for line in lines) for p in paths)
    assert status == (1 if err else 0)


@pytest.fixture(scope="module")
def mixed_files(ink, tmp_path_factory) -> tuple[Path, list[Path], dict[str, Path]]:
    """(a blank image, four good images of different formats, bad_files)."""
    directory = tmp_path_factory.mktemp("mixed")
    good = []
    for name in ("rgba-png-black-ink-in-alpha", "grey-16-bit-png", "jpeg-exif-rotate-90", "gif-two-frames"):
        (directory / name).mkdir()
        good.append(FORMATS[name][0](ink, directory / name))
    blank = save(Image.new("L", (40, 40), 255), directory / "blank.png")
    (directory / "bad").mkdir()
    return blank, good, bad_files(directory / "bad", ink)


@pytest.mark.integration
def test_the_command_prints_one_line_per_file_in_order(built_project, mixed_files):
    blank, good, bad = mixed_files
    model = str(built_project.path("models/model.pt"))
    files = [good[0], bad["zero-bytes"], blank, good[3], bad["symlink-loop"], good[1]]
    status, out, err = run_main("--model", model, *map(str, files))
    assert status == 1, "a failed file makes the exit status non-zero"
    assert err == [f"predict: error: {bad['zero-bytes']}: empty file (0 bytes)",
                   f"predict: error: {bad['symlink-loop']}: cannot read (Too many levels of symbolic links)"]
    assert [line.split(": ")[0] for line in out] == [str(good[0]), str(blank), str(good[3]), str(good[1])]
    assert out[1] == f"{blank}: blank (no ink after thresholding)"
    assert out[2].endswith(", first of 2 frames") and "%)" in out[2]

    assert run_main("--model", model, str(blank)) == (0, [f"{blank}: blank (no ink after thresholding)"], []), \
        "a blank image is a result, not an error"


@pytest.mark.integration
def test_json_has_one_object_per_file_with_the_same_keys(built_project, mixed_files):
    blank, good, bad = mixed_files
    model = str(built_project.path("models/model.pt"))
    status, out, err = run_main("--model", model, "--json", str(good[3]), str(blank), str(bad["directory"]))
    rows = json.loads("\n".join(out))
    assert status == 1 and err == [f"predict: error: {bad['directory']}: is a directory, not an image file"]
    keys = {"file", "status", "class", "label", "probability", "frames", "error"}
    assert [set(row) for row in rows] == [keys] * 3
    ok, empty, error = rows
    assert ok["status"] == "ok" and ok["frames"] == 2 and ok["error"] is None
    assert ok["label"] == built_project_classes(built_project)[ok["class"]] and 0 < ok["probability"] <= 1
    assert empty == {"file": str(blank), "status": "blank", "class": None, "label": None,
                     "probability": None, "frames": 1, "error": None}
    assert error == {"file": str(bad["directory"]), "status": "error", "class": None, "label": None,
                     "probability": None, "frames": None,
                     "error": f"{bad['directory']}: is a directory, not an image file"}


def built_project_classes(project) -> list[str]:
    return torch.load(project.path("models/model.pt"), weights_only=True)["classes"]


def command(project, *args: str, shell: str | None = None) -> subprocess.CompletedProcess:
    env = {**project.env, "PYTHONPATH": str(PROJECT_ROOT)}
    argv = ["bash", "-o", "pipefail", "-c", shell] if shell else [sys.executable, "-m", "stages.predict", *args]
    return subprocess.run(argv, cwd=project.root, capture_output=True, text=True, env=env)


@pytest.mark.integration
def test_a_closed_pipe_ends_the_run_quietly(built_project, tmp_path):
    """`predict ... | head -1`: no BrokenPipeError traceback, the status cat and grep would give."""
    many = tmp_path / "many.idx"  # 5,000 lines of output, more than a pipe buffers (64 KiB)
    many.write_bytes(write_idx(np.random.default_rng(0).integers(0, 256, (5000, 28, 28), dtype=np.uint8)))
    result = command(built_project, shell=f"{sys.executable} -m stages.predict {many} | head -1")
    assert len(result.stdout.splitlines()) == 1 and result.stdout.startswith(f"{many}[0]: ")
    assert result.stderr == ""
    assert result.returncode == 141  # 128 + SIGPIPE, through pipefail


@pytest.mark.integration
def test_help_names_the_command_and_shows_defaults(built_project):
    result = command(built_project, "--help")
    assert result.returncode == 0
    assert result.stdout.startswith("usage: python -m stages.predict ")
    text = " ".join(result.stdout.split())  # argparse wraps lines at the terminal's width
    assert "model file written by train (default: models/model.pt)" in text
    assert "cpu, cuda, cuda:N, mps, or auto (a CUDA GPU, else an Apple one, else the CPU) (default: cpu)" in text


@pytest.mark.integration
def test_runs_without_params_yaml_from_any_directory(built_project, mixed_files, tmp_path):
    """Only the model file is read: a user's directory with no params.yaml is enough."""
    _, good, _ = mixed_files
    model = str(built_project.path("models/model.pt"))
    result = subprocess.run([sys.executable, "-m", "stages.predict", "--model", model, str(good[1])], cwd=tmp_path,
                            capture_output=True, text=True, env={**built_project.env, "PYTHONPATH": str(PROJECT_ROOT)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"{good[1]}: ")


def test_options_may_come_between_the_files(tmp_path, monkeypatch):
    """`predict a.png --model m.pt b.png`, as ls or grep take it: plain parse_args stopped at the
    option and refused b.png; after `--` a name that begins with - is a file."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "model.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    for name in ("a.png", "b.png", "-c.png"):
        Image.fromarray(mnist_like_digit()).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main("a.png", "--model", "model.pt", "b.png", "--json", "--", "-c.png")
    assert status == 0 and err == []
    assert [row["file"] for row in json.loads("\n".join(out))] == ["a.png", "b.png", "-c.png"]
    status, _, err = run_main("--json", "--model", "model.pt")  # no file: argparse's usage error
    assert status == 2 and err[-1].endswith("error: the following arguments are required: PATH")
    assert predict.parse_options(["--", "--json"]).paths == ["--json"]
    status, _, err = run_main("-c.png")  # as docs/predict.md says: an option, named
    assert status == 2 and err[-1].endswith("error: unrecognized arguments: -c.png")


def test_a_labels_file_is_named_as_one(tmp_path, monkeypatch):
    """The dataset's labels file beside its images: "IDX images must be [N, 28, 28] ..., found
    (10000,)" said what it was not; now what it is."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "model.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(write_idx(np.arange(12, dtype=np.uint8) % 10))
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main("--model", "model.pt", "t10k-labels-idx1-ubyte")
    assert status == 1 and out == [] and err == [
        "predict: error: t10k-labels-idx1-ubyte: a 1-d IDX file of 12 values, a labels file (t10k-labels-idx1-ubyte "
        "and the like), not images: classify an images file (idx3)"]


def test_a_known_idx_file_of_another_dataset_is_refused(tmp_path, monkeypatch):
    """MNIST's and Fashion-MNIST's IDX files share names and format: a model of one classified the
    other's images, a digit named Sandal. A file of the table (by SHA-256 of its content, gzip or
    not) whose dataset has other classes than the model's is one error line; the rest go on."""
    import gzip
    import hashlib
    from types import SimpleNamespace

    import stages.datasets

    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    garments = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                "Ankle boot"]
    save_model(tmp_path / "garments.pt", build_model(cfg), cfg, garments, {"box": 28, "centre": "box"})
    save_model(tmp_path / "digits.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    content = write_idx(np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8))
    (tmp_path / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(content))
    (tmp_path / "mine-idx3-ubyte").write_bytes(content[:-1] + b"\x00")  # not the table's file
    images = SimpleNamespace(name="t10k-images-idx3-ubyte", sha256=hashlib.sha256(content).hexdigest())
    table = {"digits": SimpleNamespace(name="digits", classes=tuple(str(k) for k in range(10)),
                                       files={"test_images": images})}
    monkeypatch.setattr(predict, "known_dataset_files", lambda: stages.datasets.known_files(table))
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main("--model", "garments.pt", "t10k-images-idx3-ubyte.gz", "mine-idx3-ubyte")
    assert status == 1 and err == [
        "predict: error: t10k-images-idx3-ubyte.gz: digits's t10k-images-idx3-ubyte, and the model's classes are "
        "T-shirt/top, Trouser, Pullover, Dress, Coat, Sandal, Shirt, Sneaker, Bag, Ankle boot: classify it with a "
        "model of that dataset"]
    assert [line.split(":")[0] for line in out] == ["mine-idx3-ubyte[0]", "mine-idx3-ubyte[1]", "mine-idx3-ubyte[2]"]
    status, out, _ = run_main("--model", "digits.pt", "t10k-images-idx3-ubyte.gz")
    assert status == 0 and len(out) == 3
    monkeypatch.undo()  # predict's own lookup: the real table, read once
    real = stages.datasets.load_table()["fashion-mnist"]
    assert predict.known_dataset_files() is predict.known_dataset_files()
    assert predict.known_dataset_files()[real.files["test_images"].sha256].dataset == real


def test_files_are_named_as_given_and_never_split_a_line(tmp_path, monkeypatch):
    """`./a.png` stays `./a.png` (argparse's Path would print `a.png`), a trailing slash is not
    dropped, and a newline or escape sequence in a file name is written as an escape, so each
    image keeps one line and no name can drive the terminal."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(4, 8, 16), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "model.pt", build_model(cfg), cfg, [str(k) for k in range(10)])
    for name in ("a.png", "new\nline.png", "\x1b[31mred.png"):
        Image.fromarray(mnist_like_digit()).save(tmp_path / name)
    monkeypatch.chdir(tmp_path)
    not_utf8 = os.fsdecode(b"\xff.png")  # bytes that are no UTF-8: a surrogate in the str
    status, out, err = run_main("--model", "model.pt", "./a.png", "new\nline.png", "\x1b[31mred.png", "a.png/",
                                "./missing.png", "gone\n.png", not_utf8, "-")
    assert status == 1
    assert [line.split(": ")[0] for line in out] == ["./a.png", "new\\nline.png", "\\x1b[31mred.png"]
    assert err == ["predict: error: a.png/: cannot read (Not a directory)", "predict: error: ./missing.png: no such file",
                   "predict: error: gone\\n.png: no such file", "predict: error: \\udcff.png: no such file",
                   "predict: error: -: no such file (predict reads files, not standard input: save the image and name it)"]
    with pytest.raises(PipelineError) as raised:  # --model's path is escaped too
        predict.main(["--model", "gone\n\x1b[2J.pt", "./a.png"])
    assert str(raised.value).startswith("gone\\n\\x1b[2J.pt: no model file here; ")


def test_an_image_the_model_gives_no_finite_output_for_is_an_error_not_nan(tmp_path, monkeypatch):
    """Finite weights can still give NaN (a normalisation std of 0: load_model's finiteness check
    passes it). Was `a.png: 0 (nan%)`, status 0, and `"probability": NaN` in --json (no JSON
    reader takes it); now one error line per image, status 1, and the other files go on."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    model = build_model(cfg)
    model[0].std.zero_()  # Normalize's std buffer
    save_model(tmp_path / "model.pt", model, cfg, [str(k) for k in range(10)])
    Image.fromarray(mnist_like_digit()).save(tmp_path / "a.png")
    Image.new("L", (28, 28), 255).save(tmp_path / "white.png")  # blank: never reaches the model's output
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main("--model", "model.pt", "a.png", "white.png")
    assert status == 1 and out == ["white.png: blank (no ink after thresholding)"]
    assert err == ["predict: error: a.png: the model's outputs for it are not finite (NaN or infinite): its weights "
                   "are broken; retrain: `dvc repro --force train`"]
    status, out, _ = run_main("--model", "model.pt", "--json", "a.png", "white.png")
    rows = json.loads("\n".join(out))  # strict: allow_nan=False wrote it
    assert status == 1 and [(row["status"], row["probability"]) for row in rows] == [("error", None), ("blank", None)]


def test_a_class_name_with_control_characters_is_printed_escaped(tmp_path, monkeypatch):
    """A model file's names are printed as the end of each line: an escape sequence set the
    terminal's title, a line break forged a result line (`other.png: 3 (99.0%)`)."""
    torch.manual_seed(0)
    cfg = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1,
                      pool="end", image_size=28, num_classes=10, mean=0.13, std=0.31)
    forged = "\x1b]0;owned\x07 x\nother.png: 3 (99.0"
    save_model(tmp_path / "model.pt", build_model(cfg), cfg, [forged] * 10)  # every output: that name
    Image.fromarray(mnist_like_digit()).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    status, out, err = run_main("--model", "model.pt", "a.png")
    assert status == 0 and err == [] and len(out) == 1
    assert out[0].startswith("a.png: \\x1b]0;owned\\x07 x\\nother.png: 3 (99.0 (")


def test_a_model_file_that_would_run_code_is_refused(tmp_path):
    """predict loads with weights_only=True (see tests/test_models.py for the loader itself)."""
    marker, model = tmp_path / "pwned", tmp_path / "model.pt"
    torch.save({"format_version": FORMAT_VERSION, "config": Exploit(marker), "classes": [], "state_dict": {}}, model)
    with pytest.raises(PipelineError, match="model.pt"):
        predict.main(["--model", str(model), str(tmp_path)])
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# The command's own options: a bad --device or --model is one line, never a traceback


@pytest.mark.parametrize("name, reason", [
    ("bogus", "not a device; use cpu, cuda, cuda:N, mps or auto"),
    ("cuda", "no CUDA GPU is available here; use cpu or auto"),
    ("cuda:1", "no CUDA GPU is available here; use cpu or auto"),
    ("mps", "no Apple GPU (MPS) is available here; use cpu or auto"),
    ("meta", "predict runs on cpu, cuda or mps"),
])
def test_a_device_this_machine_lacks_is_named(name, reason, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    with pytest.raises(PipelineError) as raised:
        predict.predict_device(name)
    assert str(raised.value) == f"--device {name!r}: {reason}"


def test_devices_that_exist_are_used(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert predict.predict_device("auto") == torch.device("cpu")  # auto: the CPU when there is no GPU
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert predict.predict_device("auto") == torch.device("mps")  # a Mac's GPU
    assert predict.predict_device("mps") == torch.device("mps")
    assert predict.predict_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert predict.predict_device("cuda:0") == torch.device("cuda", 0)
    assert predict.predict_device("auto") == torch.device("cuda", 0)
    with pytest.raises(PipelineError, match=r"--device 'cuda:1': this machine has 1 CUDA GPU\(s\), numbered from 0"):
        predict.predict_device("cuda:1")


@pytest.mark.parametrize("argv, expected", [
    (["--device", "bogus"], "predict: error: --device 'bogus': not a device; use cpu, cuda, cuda:N, mps or auto"),
    (["--model", "{tmp}"], "predict: error: {tmp}: a directory; --model takes the model file (models/model.pt "
                           "in the project)"),
    (["--model", "{tmp}/none.pt"], "predict: error: {tmp}/none.pt: no model file here; train one with `dvc repro` "
                                   "or `dvc pull` it from your DVC remote (in the project), or name one with "
                                   "--model PATH"),
])
def test_bad_options_cost_one_line_and_status_1(argv, expected, tmp_path, monkeypatch, capsys):
    image = tmp_path / "digit.png"
    Image.fromarray(mnist_like_digit()).save(image)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["mnist-predict", *[a.format(tmp=tmp_path) for a in argv], str(image)])
    with pytest.raises(SystemExit) as stopped:
        predict.cli()
    assert stopped.value.code == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.splitlines() == [expected.format(tmp=tmp_path)]


@pytest.mark.parametrize("json_output", [False, True], ids=["text", "json"])
def test_results_that_cannot_be_written_are_one_line(tmp_path, json_output):
    """`predict ... > /dev/full` (Linux: every write fails with ENOSPC): one line naming the reason,
    status 1, no traceback (and none from the interpreter's last flush of what it could not write)."""
    config = ModelConfig(architecture="softmax", hidden=(), dropout=0.0, channels=(), convs_per_block=1, pool="end",
                         image_size=28, num_classes=10, mean=0.13, std=0.31)
    save_model(tmp_path / "model.pt", build_model(config), config, [str(k) for k in range(10)])
    image = save(grey(mnist_like_digit()), tmp_path / "digit.png")
    with open("/dev/full", "w") as full:
        result = subprocess.run([sys.executable, "-m", "stages.predict", "--model", str(tmp_path / "model.pt"),
                                 str(image), *(["--json"] if json_output else [])],
                                cwd=PROJECT_ROOT, stdout=full, stderr=subprocess.PIPE, text=True)
    assert result.stderr == ("predict: error: cannot write the results to standard output "
                             "(No space left on device)\n")
    assert result.returncode == 1
