"""predict: MNIST-style conversion of arbitrary images, and the command on a trained model file."""

from __future__ import annotations

import csv
import gzip
import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image, ImageDraw, ImageFont

from stages.common import load_tensors
from stages.predict import extract_ink, frame, object_may_fill_picture
from tests.conftest import PROJECT_ROOT


def to_mnist(gray: np.ndarray) -> np.ndarray:
    """uint8 [28, 28] MNIST-style digit from a greyscale image [H, W] with values 0..255: what
    predict does to a picture's grey image for a digit model (image_sample)."""
    return frame(extract_ink(gray))


def rendered_digit(digit: str, dark_on_light: bool, size=(180, 240)) -> np.ndarray:
    """A digit drawn with Pillow's bundled font, off-centre, as a greyscale array."""
    background, ink = (235, 25) if dark_on_light else (10, 250)
    image = Image.new("L", size, background)
    ImageDraw.Draw(image).text((15, 5), digit, fill=ink, font=ImageFont.load_default(size=150))
    return np.asarray(image)


def centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    rows, cols = np.indices(image.shape)
    total = image.sum()
    return (rows * image).sum() / total, (cols * image).sum() / total


@pytest.mark.parametrize("digit", list("0123456789"))
def test_converted_digit_is_fitted_into_20x20_and_centred_by_mass(digit):
    converted = to_mnist(rendered_digit(digit, dark_on_light=True))
    assert converted.shape == (28, 28) and converted.dtype == np.uint8
    rows, cols = np.nonzero(converted > 0.1 * converted.max())
    assert max(rows.max() - rows.min(), cols.max() - cols.min()) + 1 <= 21  # 20 px, plus resampling spill
    com_row, com_col = centre_of_mass(converted.astype(float))
    assert abs(com_row - 13.5) <= 1 and abs(com_col - 13.5) <= 1
    assert converted[0].max() == 0 and converted[:, 0].max() == 0, "the background is black, as in MNIST"


def test_dark_on_light_and_light_on_dark_give_the_same_digit():
    dark_on_light = to_mnist(rendered_digit("4", dark_on_light=True)).astype(float)
    light_on_dark = to_mnist(rendered_digit("4", dark_on_light=False)).astype(float)
    assert np.corrcoef(dark_on_light.ravel(), light_on_dark.ravel())[0, 1] > 0.95


def test_an_mnist_style_image_scaled_up_and_inverted_converts_back():
    original = to_mnist(rendered_digit("7", dark_on_light=True))
    photo = 255 - np.asarray(Image.fromarray(original).resize((112, 112), Image.BICUBIC))
    again = to_mnist(photo)
    assert np.corrcoef(original.ravel().astype(float), again.ravel().astype(float))[0, 1] > 0.9


def test_a_fashion_model_gets_its_pictures_framed_as_fashion_mnist_was():
    """Fashion-MNIST's products fill the frame: the longer side scaled to 28 pixels and the bounding
    box centred, not MNIST's 20x20 box centred by mass. A shape on white, 120 x 60 pixels, whose
    dark left quarter puts its centre of mass ~2 pixels (at 28x28) left of its box's centre."""
    picture = np.full((300, 200), 245, np.uint8)
    picture[100:220, 40:55] = 0  # dark: heavy ink
    picture[100:220, 55:100] = 180  # light grey: faint ink, still above the bounding-box threshold
    ink = extract_ink(picture)
    fashion = frame(ink, 28, {"box": 28, "centre": "box"})
    rows, cols = np.nonzero(fashion > 0.1 * fashion.max())
    assert (rows.min(), rows.max()) == (0, 27)  # the longer side fills the 28 pixels
    assert cols.max() - cols.min() + 1 in (14, 15) and abs((cols.min() + cols.max()) / 2 - 13.5) <= 0.5  # box centred
    by_mass = frame(ink, 28, {"box": 28, "centre": "mass"})
    assert abs(centre_of_mass(by_mass.astype(float))[1] - 13.5) <= 0.5
    assert abs(centre_of_mass(fashion.astype(float))[1] - 13.5) >= 1.5  # so the two centrings differ
    digit = frame(ink)  # None: MNIST's 20x20 box, by mass
    rows, cols = np.nonzero(digit > 0.1 * digit.max())
    assert rows.max() - rows.min() + 1 <= 21
    assert np.array_equal(digit, to_mnist(picture))
    assert np.array_equal(digit, frame(ink, 28, {"box": 20, "centre": "mass"}))


def shirt(size: int = 112, grey: int = 110) -> np.ndarray:
    """A product photo cropped close: a textured grey shirt (body and sleeves) that covers about
    three fifths of a white picture, and its true ink [size, size] (255 - the picture, 0 outside)."""
    picture = np.full((size, size), 250.0)
    body = np.zeros((size, size), bool)
    body[8:size - 4, size // 5:size - size // 5] = True  # torso, touching the bottom edge
    body[8:size // 2, 2:size - 2] = True  # sleeves, reaching both sides
    texture = np.random.default_rng(0).normal(0, 12, (size, size))
    picture[body] = grey + texture[body]
    picture = np.clip(picture, 0, 255)
    return picture.astype(np.uint8), np.where(body, 255 - picture, 0)


def test_a_product_that_covers_most_of_its_picture_keeps_its_body():
    """The median of such a picture is the product's own grey: levelled from there, only its
    outline and texture were left (Fashion-MNIST test images as pictures: 879 of 1,000 right, 935
    now). A model framed by its box (Fashion's) takes the background from the border instead."""
    picture, truth = shirt()
    assert (truth > 0).mean() > 0.55, "the case: more product than background"
    fashion = {"box": 28, "centre": "box"}
    expected = frame(truth, 28, fashion).ravel().astype(float)
    for shown in (picture, 255 - picture):  # dark on white, light on black
        ink = extract_ink(shown, object_may_fill=object_may_fill_picture(fashion))
        assert np.corrcoef(frame(ink, 28, fashion).ravel().astype(float), expected)[0, 1] > 0.95
        assert np.median(ink[truth > 0]) > 120  # the body: 140 levels above the background
        hollow = extract_ink(shown)  # as strokes on paper: the median's grey taken for the paper
        assert np.median(hollow[truth > 0]) < 10
    # A digit model's pictures are strokes on paper: unchanged for it (grey paper inside a white
    # margin is paper there, not an object).
    assert not object_may_fill_picture(None) and not object_may_fill_picture({"box": 20, "centre": "mass"})


def test_blank_image_stays_blank():
    assert to_mnist(np.full((50, 50), 255, np.uint8)).max() == 0


def predict(project, *args):
    return subprocess.run([sys.executable, "-m", "stages.predict", *args], cwd=project.root,
                          capture_output=True, text=True, env={**project.env, "PYTHONPATH": str(PROJECT_ROOT)})


@pytest.mark.integration
def test_predict_on_idx_matches_evaluate_and_survives_bad_files(built_project, tmp_path):
    """IDX test images (here gzipped, as mirrors serve them) get evaluate's predictions; a bad file
    gets one error line; PNGs and --json work."""
    test_images = tmp_path / "t10k-images-idx3-ubyte.gz"
    test_images.write_bytes(gzip.compress(built_project.path("data/raw/t10k-images-idx3-ubyte").read_bytes()))
    png = tmp_path / "digit.png"
    Image.fromarray(255 - load_tensors(built_project.path("data/prepared/test.pt"))["images"][0].numpy()).save(png)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(png.read_bytes()[:60])
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"no image at all")
    result = predict(built_project, str(test_images), str(truncated), str(garbage), str(png), "--json")
    assert result.returncode == 1, "a failed file makes the exit status non-zero"
    errors = result.stderr.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"predict: error: {truncated}: damaged or unsupported image")
    assert errors[1].startswith(f"predict: error: {garbage}: neither an image predict reads")
    rows = json.loads(result.stdout)
    with open(built_project.path("metrics/confusion.csv")) as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]  # class names
    idx_rows = [r for r in rows if r["file"].startswith(str(test_images))]
    assert [r["label"] for r in idx_rows] == evaluated
    assert rows[-1]["file"] == str(png)
    assert rows[-1]["status"] == "ok" and 0 < rows[-1]["probability"] <= 1
    assert [r["status"] for r in rows if r["file"] in (str(truncated), str(garbage))] == ["error", "error"]

    text = predict(built_project, str(png))
    assert text.returncode == 0
    assert text.stdout.startswith(f"{png}: ") and text.stdout.strip().endswith("%)")


@pytest.mark.integration
def test_predict_reads_uncompressed_idx_and_a_single_image(built_project, tmp_path):
    """data/raw's plain IDX file (fetch stores the files uncompressed), and a 2-d IDX file of one image."""
    plain = built_project.path("data/raw/t10k-images-idx3-ubyte")
    result = predict(built_project, str(plain), "--json")
    assert result.returncode == 0, result.stderr
    with open(built_project.path("metrics/confusion.csv")) as f:
        evaluated = [row["predicted"] for row in csv.DictReader(f)]  # class names
    assert [r["label"] for r in json.loads(result.stdout)] == evaluated
    single = tmp_path / "one.idx"
    content = plain.read_bytes()
    # The same bytes as a 2-d IDX file holding only the first image.
    single.write_bytes(bytes([0, 0, 8, 2]) + (28).to_bytes(4, "big") * 2 + content[16:16 + 784])
    result = predict(built_project, str(single), "--json")
    assert result.returncode == 0, result.stderr
    assert [r["file"] for r in json.loads(result.stdout)] == [f"{single}[0]"]
