"""Classify image files with the trained model: `python -m stages.predict PATH... [--json]`.

Images (PNG, JPEG, GIF, BMP, TIFF, WebP, AVIF, PBM/PGM/PPM: READ_FORMATS) go through small pure steps:
decode (bounded in size and memory) -> shrink -> orient (EXIF) -> grey, with the ink told from
the background (alpha, palette transparency and 16-bit handled) -> blank? -> frame, which makes
the image the way the model's dataset made its images (the model file's `framing`): inverted when
the background is light, then, for MNIST, scaled to fit a 20x20 box and placed in the 28x28 image
so that its centre of mass is at the centre; for Fashion-MNIST, scaled so that its longer side
fills the 28 pixels and centred by its bounding box.
IDX files (plain or .gz) already hold MNIST-format images and are classified as they are, one
result per image.

Every image gets exactly one line (an IDX file one per image it holds): its class, `blank`, or a
one-line error naming the file and the reason (on stderr); the run goes on with the next file and
exits with status 1 if any file failed.
Only the model file is read (no params.yaml), with torch's weights_only loader, and for IDX files
the dataset table (stages/datasets.yaml, shipped with the package). See docs/predict.md.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import mmap
import os
import re
import signal
import stat
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np
import torch
from PIL import ExifTags, Image, UnidentifiedImageError

from stages.common import PipelineError, cannot_read, exception_line, log, os_reason, run_main
from stages.idx import IdxFormatError, may_be_idx, parse_idx, read_bytes
from stages.model_config import digit_framing
from stages.models import load_model, predict_logits
from stages.runtime import resolve_device

STAGE = "predict"
PROG = "python -m stages.predict"
DEFAULT_MODEL = Path("models/model.pt")
INK_THRESHOLD = 0.1  # of the brightest value: fainter pixels don't define the digit's bounding box
# Images with more pixels are refused before any pixel is decoded. 50 MP is above what phones and
# cameras save by default (12-24 MP; 48-50 MP only in their full-resolution modes) and above an A4
# page scanned at 600 dpi (35 MP), so no honest photo or scan of a digit is refused, while a
# decompression bomb (a 90 KB PNG declaring 20000x20000 = 400 MP) is. It also bounds memory for
# formats that cannot be reduced while decoding (PNG, GIF, TIFF, WebP): 89 MiB added for a 49 MP
# grey PNG, 295 MiB for 16-bit grey, 389 MiB for RGBA (docs/predict.md, Memory). Pillow's own
# guard (Image.MAX_IMAGE_PIXELS, 89 MP warning / 179 MP error) lies above it.
MAX_PIXELS = 50_000_000
# Scans of a progressive JPEG: libjpeg's default script writes 10 (6 for greyscale), mozjpeg's
# optimised ones a few more; each decodes the whole image again (stages.predict.jpeg_scans).
MAX_JPEG_SCANS = 100
IDX_HEADER_ALLOWANCE = 1024  # bytes: magic number and dimensions, 4 bytes each
# Working resolution, pixels on the longer side: images are reduced to between 1x and 2x this
# while (JPEG) or right after (other formats) decoding. The digit ends up 20 px tall, so even a
# digit filling a tenth of a photo keeps 5x the resolution it needs; and a float64 working copy
# is at most 2047x2047x8 bytes = 32 MB, whatever the camera's resolution.
WORK_SIDE = 1024
# The largest ink contrast (brightest ink minus the background, 0..255) below which an image is
# blank: pencil on paper or a marker on a whiteboard differs from its background by 100+ levels,
# while JPEG noise, paper texture and a scanner's glass stay within about 10-20.
BLANK_CONTRAST = 32
# The paper's level under uneven light (paper_level): a block within PAPER_BAND grey levels of the
# fitted surface counts as paper in the next round (JPEG noise and paper texture stay inside, ink
# and a margin of another grey outside); the surface is fitted to the medians of about FIT_SIDE
# blocks a side (a quadratic needs no more), in at most FIT_ROUNDS rounds, and only while at least
# MIN_PAPER_SHARE of the image is paper.
PAPER_BAND = BLANK_CONTRAST / 2
FIT_SIDE = 64
FIT_ROUNDS = 10
MIN_PAPER_SHARE = 0.25
MODE_BIN = 4  # grey levels: the histogram that picks the paper's commonest level near the first guess
BATCH = 256  # images per forward pass for IDX files: bounds activation memory for large files
# The formats predict decodes: what phones, scanners and image tools save, each declaring its size
# in a header that Image.open reads without decoding a pixel, so the pixel limit comes first.
# Pillow opens more, and some of those cost before any check: ICO decodes its largest icon inside
# Image.open, FITS parses slowly, EPS runs Ghostscript (an interpreter) on the file. Those, and
# formats Pillow lacks (HEIC, PDF, SVG), are refused by name (SIGNATURES). MPO is a JPEG with extra pictures
# (a camera's preview or second eye); PPM stands for PBM, PGM and PPM.
# Pillow's format name -> the name users know (MPO is said as JPEG; PPM's plugin reads all three).
READ_FORMATS = {"PNG": "PNG", "JPEG": "JPEG", "MPO": "JPEG", "GIF": "GIF", "BMP": "BMP", "TIFF": "TIFF",
                "WEBP": "WebP", "AVIF": "AVIF", "PPM": "PBM/PGM/PPM"}
# A TIFF's pages are counted up to this many: an honest multi-page scan has far fewer, and counting
# them (Pillow's n_frames, or seeking page by page) takes time that grows with the square of their
# count: 6.4 s for a 3.3 MB file of 32,000 one-pixel pages. A file with more reports this many.
MAX_COUNTED_FRAMES = 1000
SIGNATURE_BYTES = 512  # how much of a file's start identify_format reads (SVG's <svg may follow a prolog)
_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis")  # ftyp brands of HEIC files
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
WIDE_DEPTHS = (8, 10, 12, 14, 16, 32)  # bits an integer image's values may use, whatever its container holds
_REDUCIBLE = ("L", "LA", "I", "F", "RGB", "RGBA")  # modes Image.reduce takes as they are


@dataclass(frozen=True)
class Decoded:
    """The first frame of an image file (JPEGs already reduced) and how many frames the file holds."""
    image: Image.Image
    frames: int


# ---------------------------------------------------------------------------------------------
# decode -> shrink -> orient -> grey -> (blank?) -> frame


def check_file(path: str) -> None:
    """PipelineError unless `path` is a non-empty regular file (stat follows symlinks, so a loop
    or a dangling link is reported here rather than deep inside a decoder)."""
    try:
        info = os.stat(path)
    except FileNotFoundError:
        # `-` means standard input to many tools; predict reads only files.
        hint = " (predict reads files, not standard input: save the image and name it)" if path == "-" else ""
        raise PipelineError(f"{path}: no such file{hint}") from None
    except OSError as exc:  # e.g. ELOOP "Too many levels of symbolic links", EACCES on a parent
        raise cannot_read(path, exc) from None
    if stat.S_ISDIR(info.st_mode):
        raise PipelineError(f"{path}: is a directory, not an image file")
    if not stat.S_ISREG(info.st_mode):
        # A FIFO or device would block or never end; an image is always a regular file.
        raise PipelineError(f"{path}: not a regular file")
    if info.st_size == 0:
        raise PipelineError(f"{path}: empty file (0 bytes)")


def reduction_factor(size: tuple[int, int]) -> int:
    """Integer factor that brings the longer side of `size` (w, h) to between WORK_SIDE and
    2 * WORK_SIDE; 1 when it is already smaller."""
    return max(1, max(size) // WORK_SIDE)


@functools.cache
def raster_formats() -> tuple[str, ...]:
    """READ_FORMATS that this Pillow opens (a build may lack WebP or AVIF)."""
    Image.init()
    return tuple(name for name in READ_FORMATS if name in Image.OPEN)


def read_format_names() -> tuple[str, ...]:
    """The formats predict reads here, as users name them: PNG, JPEG, GIF, ..."""
    return tuple(dict.fromkeys(READ_FORMATS[name] for name in raster_formats()))


def count_frames(image: Image.Image) -> int:
    """Frames (animation frames, TIFF pages) in the file `image` was opened from, leaving it at
    the first. An MPO counts as one: viewers show its primary picture, and its others are a
    preview or a stereo pair, not frames."""
    if image.format == "MPO" or not getattr(image, "is_animated", False):
        return 1  # is_animated reads at most the second frame's header
    if image.format != "TIFF":
        # GIF's, APNG's, WebP's and AVIF's n_frames read headers only (a GIF's seek(n), by contrast,
        # decodes every frame before n, and fails on a damaged later frame).
        return image.n_frames
    pages = 2
    with contextlib.suppress(EOFError):  # past the last page
        while pages < MAX_COUNTED_FRAMES:
            image.seek(pages)  # a TIFF's seek reads the page's header (IFD), no pixel
            pages += 1
    image.seek(0)
    return pages


# In a scan's entropy-coded data a 0xFF byte is followed by 0x00 (a stuffed 0xFF) or a restart
# marker 0xD0-0xD7; anything else after it is the next marker.
_SCAN_END = re.compile(rb"\xff[^\x00\xd0-\xd7]")


def jpeg_scans(file: BinaryIO, limit: int) -> int:
    """The scans (SOS segments) of the first picture of the JPEG in `file`, counted up to limit + 1.
    A progressive JPEG refines the whole image once per scan, and libjpeg takes any number: 10,000
    repeated 41-byte scans made a 435 KB file of 4 MP decode in 41 s. Walks the marker segments as
    libjpeg finds them (bytes before a marker are skipped, as its next_marker does: one junk byte
    must not end the count while the decoder goes on), each scan's data skipped to its end by a
    regular expression, so no byte of an APP segment (an ICC profile, a thumbnail) is taken for a
    marker. The file is mapped, not read: 50 MB take under half a second."""
    where = file.tell()  # Pillow's place in the file, given back
    try:
        data = mmap.mmap(file.fileno(), 0, access=mmap.ACCESS_READ)
    except (AttributeError, OSError, ValueError, io.UnsupportedOperation):  # no file behind it (BytesIO)
        file.seek(0)
        data = file.read()
    try:
        position, scans = 2, 0  # after SOI
        while scans <= limit and (position := data.find(b"\xff", position)) != -1:
            while position < len(data) and data[position] == 0xFF:  # the marker's 0xFF, and any fill bytes
                position += 1
            if position == len(data):
                break
            marker = data[position]
            position += 1
            if marker == 0xD9:  # EOI: the first picture ends (an MPO's others are not decoded)
                break
            if marker == 0x00 or 0xD0 <= marker <= 0xD7 or marker == 0x01:  # no segment: stuffing, RSTn, TEM
                continue
            position += int.from_bytes(data[position:position + 2], "big")  # the segment, its length included
            if marker == 0xDA:
                scans += 1
                end = _SCAN_END.search(data, position)
                if end is None:
                    break
                position = end.start()
        return scans
    finally:
        if isinstance(data, mmap.mmap):
            data.close()
        file.seek(where)


def decode(file: BinaryIO, path: str) -> Decoded:
    """Decodes the first frame of the image in `file` (opened from `path`); a large JPEG is
    reduced while decoding (JPEG's DCT scaling, via Image.draft), other formats later by shrink(). Raises
    UnidentifiedImageError when Pillow knows no such format, PipelineError when the image is too
    large, and whatever the decoder raises on a damaged file."""
    try:
        with Image.open(file, formats=raster_formats()) as image:
            # Image.open read only the header: the size is known, no pixel is decoded yet.
            pixels = image.width * image.height
            if pixels > MAX_PIXELS:
                raise PipelineError(f"{path}: refused, {image.width}x{image.height} is {pixels:,} "
                                    f"pixels, more than the {MAX_PIXELS:,}-pixel limit for an image "
                                    "of a digit")
            frames = count_frames(image)
            factor = reduction_factor(image.size)
            if image.format in ("JPEG", "MPO") and (scans := jpeg_scans(file, MAX_JPEG_SCANS)) > MAX_JPEG_SCANS:
                raise PipelineError(f"{path}: refused, a progressive JPEG of more than {MAX_JPEG_SCANS} scans "
                                    f"(each decodes the whole image again; cameras and editors write up to about "
                                    f"ten; counted {scans:,} before stopping)")
            if image.format in ("JPEG", "MPO") and factor > 1:
                # Decode at 1/2, 1/4 or 1/8 scale: the full-size pixels are never in memory.
                image.draft(image.mode, (image.width // factor, image.height // factor))
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        # Pillow's own guard, inside Image.open and so before the check above, for sizes beyond
        # 89 MP (a warning, an error under pillow_warnings) or 179 MP (an error).
        raise PipelineError(f"{path}: refused, more than the {MAX_PIXELS:,}-pixel limit for an image of a "
                            f"digit (Pillow: {exc})") from None
    return Decoded(image, frames)


# EXIF Orientation (2-8) -> the transpose that shows the stored pixels as a viewer does; 1 or no
# tag: upright as stored. The table of Pillow's ImageOps.exif_transpose.
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def orientation(image: Image.Image) -> Image.Transpose | None:
    """The turn (or mirror) that shows the decoded `image` as a viewer does: phones store pixels as
    the sensor saw them and record the rotation in the EXIF Orientation tag (or XMP's, which
    getexif reads too). None: upright as stored. Read from the decoded file's image: a reduced
    copy no longer has a TIFF's tags."""
    return _UPRIGHT.get(image.getexif().get(ExifTags.Base.Orientation))


def orient(image: Image.Image, turn: Image.Transpose | None) -> Image.Image:
    """`image` (shrunk) turned by `turn`, orientation()'s answer for the file. Turned after shrink,
    not before: turning the full-size image copied it whole (an 8000x6000 RGB PNG, EXIF "rotate
    90°": 368 MiB added at the peak, 219 without the tag). A box reduction and a turn commute, but
    for which edge keeps a partial block."""
    return image if turn is None else image.transpose(turn)


def shrink(image: Image.Image) -> Image.Image:
    """The image reduced by an integer factor (a box filter: each output pixel is the mean of a
    factor x factor block) to between WORK_SIDE and 2 * WORK_SIDE on its longer side."""
    factor = reduction_factor(image.size)
    if factor == 1:
        return image
    # The modes reduce() takes are reduced as they are, and grey_ink converts the small result: an
    # RGBA image converted first would need another 4 bytes a pixel (Pillow keeps LA in 32 bits),
    # 190 MB at 49 MP. The box filter and the conversion to grey are both linear, so the order only
    # moves roundings. Palettes and 16-bit modes, which reduce() refuses, are converted first.
    return image.reduce(factor) if image.mode in _REDUCIBLE else to_reducible(image).reduce(factor)


def has_alpha(image: Image.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info


def to_reducible(image: Image.Image) -> Image.Image:
    """The image in the smallest mode that keeps what grey_ink needs: L, LA (alpha kept), I
    (16-bit values kept) or F; Image.reduce and grey_ink accept all four."""
    if image.mode in ("L", "LA", "I", "F"):
        return image
    if image.mode in _SIXTEEN_BIT:
        return image.convert("I")  # exact: I holds every 16-bit value
    if has_alpha(image):
        # Palette and tRNS transparency become a real alpha channel through RGBA (convert copies
        # even to the same mode: an RGBA image goes straight to LA).
        return (image if image.mode == "RGBA" else image.convert("RGBA")).convert("LA")
    return image.convert("L")  # 1, P, RGB, CMYK (Adobe inversion handled by Pillow), YCbCr, ...


def composite_alpha(grey: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Grey [H, W] of a grey+alpha image (both 0..255) laid on the background its ink stands out from.

    Two kinds of image have a transparent background. Keyed ones (palette or tRNS transparency,
    a background removed by colour) keep their canvas colour under the transparent pixels and
    their anti-aliased edges blend into it: laid on that colour, they look as they were drawn.
    Where the colour under the transparent pixels says nothing (the same as the ink: a digit
    drawn in alpha), the digit is laid on white when its visible pixels are dark on average and
    on black when they are light (a digit made for dark themes). Opaque images are unchanged.
    """
    alpha = alpha / 255.0
    visible = alpha > 0
    if not visible.any():
        return np.zeros_like(grey)  # fully transparent: blank
    clear = ~visible
    background = None
    if clear.any():
        canvas = float(grey[clear].mean())
        if np.abs(grey[visible] - canvas).max() >= BLANK_CONTRAST:
            background = canvas
    if background is None:
        background = 255.0 if (grey * alpha).sum() / alpha.sum() < 128 else 0.0
    return grey * alpha + background * (1 - alpha)


def grey_ink(image: Image.Image) -> np.ndarray:
    """float64 [H, W] in 0..255 for an image from to_reducible (any mode is accepted)."""
    image = to_reducible(image)
    pixels = np.asarray(image, dtype=np.float64)
    if image.mode == "I":
        # 16-bit PNG and TIFF, 32-bit TIFF: white is the top of the values' depth (Pillow's
        # convert("L") clips at 255 instead, which turns all but the darkest pixels white). The
        # depth is the smallest of 8, 10, 12, 14, 16 or 32 bits that holds the values, not the
        # container's: 12-bit scanner or medical data in a 16-bit PNG (0..4095), or 8-bit values in
        # a 32-bit TIFF, scaled as 16 bits was near-black and read as blank. The price: a nearly
        # black 16-bit picture (every value under 256) is read as 8-bit data, its faint marks as ink.
        pixels = np.clip(pixels, 0, None)
        top = pixels.max()  # once: the image may be the whole working size
        white = next(2.0 ** bits - 1 for bits in WIDE_DEPTHS if top <= 2.0 ** bits - 1)
        return np.clip(pixels * (255 / white), 0, 255)
    if image.mode == "F":
        pixels = np.nan_to_num(pixels)
        # Float TIFFs hold grey levels in 0..255 or, from scientific and normalising tools, 0..1
        # (up to 2: resampling overshoots; a 0..255 image that dark would be blank anyway).
        if pixels.max() <= 2.0:
            pixels = pixels * 255
        return np.clip(pixels, 0, 255)  # as Pillow's convert("L") does
    if image.mode == "LA":
        return composite_alpha(pixels[..., 0], pixels[..., 1])
    return pixels


def border(image: np.ndarray) -> np.ndarray:
    """The pixels of the image's four edges, [2 (H + W)] (corners twice): where a centred subject isn't."""
    return np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])


def is_light_background(gray: np.ndarray) -> bool:
    """True when the image's border is brighter than mid-grey."""
    return float(np.median(border(gray))) > 127


def extract_ink(gray: np.ndarray, photo: bool = True, object_may_fill: bool = False) -> np.ndarray:
    """float64 [H, W]: ink >= 0 on a background of ~0, from a greyscale image with values 0..255,
    dark-on-light or light-on-dark. photo: the paper's level may vary across the image
    (paper_level); False: one level, for images a program made (IDX files: 8x faster).
    object_may_fill: the picture may be of one object that covers most of it, such as a product
    photographed on a plain ground (object_may_fill_picture); else strokes on paper."""
    ink = np.asarray(gray, dtype=np.float64)
    if is_light_background(ink):
        ink = 255 - ink

    def paper(start: float) -> np.ndarray | float:
        return paper_level(ink, start) if photo else start

    def paper_on_border(surface: np.ndarray | float) -> float:
        # The share of the border's pixels that lie on the paper `surface` found.
        return float(np.mean(np.abs(border(ink) - border(np.broadcast_to(surface, ink.shape))) < PAPER_BAND))

    # The background's level, taken to ~0: the paper's level at each pixel (paper_level), found
    # from the median, whatever its grey level (most of a page is paper). An object that covers
    # more than half the picture makes the median its own grey, which leaves only its outline and
    # texture: for such pictures, when under half the border lies on the surface found, it is
    # found again from the border's median, and the one more of the border lies on is kept
    # (benchmarks/predict_check --dataset fashion-mnist: Fashion-MNIST's first 1,000 test images
    # as 112x112 pictures, the fashion preset's model: 879 right from the median, 935 so; 950 on
    # the images themselves). Not for strokes
    # on paper: grey paper inside a white margin would then be the object.
    # A bold digit cropped to its ink leaves nothing: then the paper is found from the 10th
    # percentile, between its strokes. A frame or margin covering less than a tenth of the image
    # does not count as that paper: an empty page inside a thin white frame stays blank (inside a
    # wider margin it is a grey rectangle).
    surface = paper(float(np.median(ink)))
    if object_may_fill and (on_border := paper_on_border(surface)) < 0.5:
        around = paper(float(np.median(border(ink))))
        if paper_on_border(around) > on_border:
            surface = around
    levelled = np.clip(ink - surface, 0, None)
    return levelled if not is_blank(levelled) else np.clip(ink - paper(float(np.percentile(ink, 10))), 0, None)


def object_may_fill_picture(framing: dict | None) -> bool:
    """Whether a picture for a model of this framing (the model file's; None: MNIST's) may be one
    object that covers most of it: the dataset trimmed its pictures to the object's box and
    centred that box (Fashion-MNIST's products), where digits are strokes centred by their mass."""
    return framing is not None and framing["centre"] == "box"


def paper_level(ink: np.ndarray, start: float) -> np.ndarray:
    """The background's level at every pixel of `ink` [H, W] (float64, ink brighter than paper),
    from a first guess `start`: a photo's paper is not one grey (a lens darkens the corners, light
    falls from one side, a hand casts a soft shadow), and ink counted from one level turns the
    darker paper into ink that swallows the digit's box. A smooth surface, a quadratic in x and y,
    is fitted to the paper: the blocks within PAPER_BAND levels of the last fit (the first fit: the
    commonest level near `start`), round after round, on block medians, about FIT_SIDE blocks a
    side. Ink stands further above it and a margin of another grey further from it, so neither
    bends the surface; on one flat grey it is that grey. Where too little of the image is paper
    for a fit, that commonest level everywhere."""
    height, width = ink.shape
    # Blocks of fy x fx pixels, each axis by its own factor (a 40x2000 strip keeps its 40 rows), the
    # rest of a partial block left out; each block's median, not its mean: a block across the edge
    # of the paper (a lighter margin, a stroke) takes the level of what covers most of it, where a
    # mean would land between the two, inside the band, and bend the surface there.
    fy, fx = max(1, height // FIT_SIDE), max(1, width // FIT_SIDE)
    rows, cols = height // fy, width // fx
    # The median of up to 8x8 evenly spread pixels of each block: of all of them it cost 0.1 s more
    # for a 2047x1535 image.
    sy, sx = max(1, fy // 8), max(1, fx // 8)
    blocks = ink[:rows * fy, :cols * fx].reshape(rows, fy, cols, fx)[:, ::sy, :, ::sx]
    small = np.median(blocks.swapaxes(1, 2).reshape(rows, cols, -1), axis=-1)

    def positions(size: int, factor: int, count: int) -> np.ndarray:
        # The centres of `count` blocks of `factor` pixels on an axis of `size` pixels, in [-1, 1]:
        # the same coordinates at both resolutions.
        return (np.arange(count) * factor + factor / 2) / size * 2 - 1

    y, x = positions(height, fy, rows)[:, None], positions(width, fx, cols)[None, :]
    design = np.stack(np.broadcast_arrays(np.ones_like(x * y), x, y, x * x, x * y, y * y), -1).reshape(-1, 6)
    # An axis of one or two blocks cannot tell a curve (or, with one, a slope) from a constant.
    terms = [0, *([1, 3] if cols >= 3 else []), *([2, 5] if rows >= 3 else []), *([4] if min(rows, cols) >= 3 else [])]
    values = small.ravel()
    # The first guess moved to the commonest level within the band around it: a median between two
    # greys (paper beside a lighter margin, half and half) would take both in as one sloping paper.
    near = values[np.abs(values - start) < PAPER_BAND]
    if near.size:
        counts, edges = np.histogram(near, bins=np.arange(start - PAPER_BAND, start + PAPER_BAND + 1e-9, MODE_BIN))
        start = float(edges[np.argmax(counts)] + MODE_BIN / 2)
    fitted, paper, coefficients = np.full_like(values, start), None, None
    for _ in range(FIT_ROUNDS):
        kept = np.abs(values - fitted) < PAPER_BAND
        if kept.mean() < MIN_PAPER_SHARE or (paper is not None and np.array_equal(kept, paper)):
            break
        paper = kept
        coefficients = np.zeros(6)
        coefficients[terms] = np.linalg.lstsq(design[paper][:, terms], values[paper], rcond=None)[0]
        fitted = design @ coefficients
    if coefficients is None:
        return np.full_like(ink, start)
    y = positions(height, 1, height)[:, None]
    x = positions(width, 1, width)[None, :]
    c = coefficients
    # Grouped so that only two sums and a product run over every pixel: [1, W] + [H, 1] * [1, W] + [H, 1].
    return (c[0] + c[1] * x + c[3] * x * x) + y * (c[2] + c[4] * x) + c[5] * y * y


def is_blank(ink: np.ndarray) -> bool:
    """No ink after thresholding: nothing stands BLANK_CONTRAST levels above the background."""
    return float(ink.max()) < BLANK_CONTRAST


def frame(ink: np.ndarray, size: int = 28, framing: dict | None = None) -> np.ndarray:
    """uint8 [size, size] image from extract_ink's output [H, W], framed as `framing` says
    (stages.model_config; None: MNIST's): the ink's bounding box scaled to fit framing["box"]
    pixels, then placed with its centre of mass ("mass") or its box's centre ("box") at the image's
    centre."""
    framing = digit_framing(size) if framing is None else framing
    if ink.max() <= 0:
        return np.zeros((size, size), np.uint8)  # a blank image stays blank
    rows, cols = np.nonzero(ink > INK_THRESHOLD * ink.max())
    ink = ink[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
    ink = ink * (255 / ink.max())
    scale = framing["box"] / max(ink.shape)
    height, width = max(1, round(ink.shape[0] * scale)), max(1, round(ink.shape[1] * scale))
    resized = np.asarray(Image.fromarray(ink.astype(np.float32), mode="F").resize((width, height), Image.LANCZOS))
    resized = np.clip(resized, 0, 255)
    total = resized.sum()
    if total <= 0:
        return np.zeros((size, size), np.uint8)
    # Place the box so its centre (of mass, or of the box) lands on the image centre, clipped to stay inside.
    if framing["centre"] == "mass":
        com_row = (resized.sum(axis=1) @ np.arange(height)) / total
        com_col = (resized.sum(axis=0) @ np.arange(width)) / total
    else:
        com_row, com_col = (height - 1) / 2, (width - 1) / 2
    top = int(np.clip(round((size - 1) / 2 - com_row), 0, size - height))
    left = int(np.clip(round((size - 1) / 2 - com_col), 0, size - width))
    out = np.zeros((size, size), np.float64)
    out[top:top + height, left:left + width] = resized
    return np.round(out).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# One file -> one or more named 28x28 images


@dataclass(frozen=True)
class Sample:
    """One image to classify: its name in the output, the 28x28 digit, and what to say about it."""
    name: str
    image: np.ndarray  # uint8 [size, size]
    blank: bool
    frames: int = 1


@contextlib.contextmanager
def pillow_warnings() -> Iterator[None]:
    """A warning printed by Pillow (corrupt EXIF, odd TIFF tags) would be a second line for the
    file: silenced. The decompression-bomb warning (reached only above MAX_PIXELS) becomes an
    error, which decode() reports as a refusal."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        yield


def damaged(path: str, exc: Exception) -> PipelineError:
    """The one-line error for a file Pillow failed on. Its decoders report damaged input with
    OSError mostly, but also ValueError (PPM), SyntaxError, EOFError, struct.error, ... depending
    on the plugin, and EXIF or mode conversion can fail on odd files; a file from outside must
    cost one error line, never the run, so every Exception from Pillow ends here."""
    return PipelineError(f"{path}: damaged or unsupported image ({exception_line(exc)})")


def image_sample(path: str, size: int, framing: dict | None = None) -> Sample:
    """The Sample for an image file; UnidentifiedImageError when Pillow knows no such format,
    OSError when the file cannot be opened."""
    with pillow_warnings(), open(path, "rb") as file:
        try:
            decoded = decode(file, path)
            gray = grey_ink(orient(shrink(decoded.image), orientation(decoded.image)))
        except (PipelineError, UnidentifiedImageError):
            raise
        except Exception as exc:  # noqa: BLE001 - see damaged()
            raise damaged(path, exc) from None
    ink = extract_ink(gray, object_may_fill=object_may_fill_picture(framing))
    blank = is_blank(ink)
    digit = np.zeros((size, size), np.uint8) if blank else frame(ink, size, framing)
    return Sample(path, digit, blank, decoded.frames)


def other_datasets_file(data: bytes, classes: list[str] | None) -> str | None:
    """"<dataset>'s <file name>" when `data` (an IDX file's content) is an image file of a dataset
    in stages/datasets.yaml whose classes are not `classes` (the model's; None: not checked).
    MNIST's and Fashion-MNIST's files share names and formats, and a model of one classified the
    other's images without a word (a digit named Sandal)."""
    import hashlib

    if classes is None:
        return None
    found = known_dataset_files().get(hashlib.sha256(data).hexdigest())
    if found and found.role.endswith("_images") and found.dataset.classes != tuple(classes):
        return str(found)
    return None


@functools.cache
def known_dataset_files() -> dict:
    """datasets.known_files of the dataset table, read once however many IDX files are given."""
    from stages.datasets import known_files, load_table

    return known_files(load_table())


def idx_samples(path: str, size: int, classes: list[str] | None = None) -> list[Sample]:
    """One Sample per image of an IDX file (plain or gzip); a file of another dataset than the
    model's (`classes`) is refused (other_datasets_file)."""
    try:
        # The images' pixel limit bounds an IDX file too: one uint8 a pixel, plus a short header.
        data = read_bytes(Path(path), max_size=MAX_PIXELS + IDX_HEADER_ALLOWANCE)
        known = other_datasets_file(data, classes)
        if known:
            raise PipelineError(f"{path}: {known}, and the model's classes are {', '.join(classes)}: classify it "
                                "with a model of that dataset")
        array = parse_idx(data, path)
    except IdxFormatError as exc:
        reason = str(exc).removeprefix(f"{path}: ")
        raise PipelineError(f"{path}: neither an image predict reads ({', '.join(read_format_names())}) "
                            f"nor a usable IDX file ({reason})") from None
    if array.ndim == 1:
        raise PipelineError(f"{path}: a 1-d IDX file of {len(array):,} values, a labels file (t10k-labels-idx1-ubyte "
                            "and the like), not images: classify an images file (idx3)")
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3 or array.shape[1:] != (size, size):
        raise PipelineError(f"{path}: IDX images must be [N, {size}, {size}] or [{size}, {size}], found {array.shape}")
    if len(array) == 0:
        raise PipelineError(f"{path}: IDX file holds no images (dimensions {array.shape})")
    return [Sample(f"{path}[{i}]", image, is_blank(extract_ink(image, photo=False))) for i, image in enumerate(array)]


def has_ftyp_brand(head: bytes, brands: tuple[bytes, ...]) -> bool:
    """True for an ISO media file (AVIF, HEIC: an `ftyp` box first) whose major or compatible
    brands, in the box's first 24 bytes, include one of `brands`."""
    return head[4:8] == b"ftyp" and any(brand in head[8:32] for brand in brands)


# Signatures that name a format for certain (Pillow's own checks are made to pick a decoder to
# try, and some take any text that starts with `Py` or `/*`): the formats predict reads, then
# those it refuses by name. (TGA has no signature at its start: it is not named.)
SIGNATURES = (
    ("PNG", lambda head: head.startswith(b"\x89PNG\r\n\x1a\n")),
    ("JPEG", lambda head: head.startswith(b"\xff\xd8\xff")),
    ("GIF", lambda head: head[:6] in (b"GIF87a", b"GIF89a")),
    ("BMP", lambda head: head.startswith(b"BM") and head[6:10] == bytes(4)),  # then 4 reserved zero bytes
    ("TIFF", lambda head: head[:4] in (b"II*\0", b"MM\0*")),
    ("WebP", lambda head: head.startswith(b"RIFF") and head[8:12] == b"WEBP"),
    ("AVIF", lambda head: has_ftyp_brand(head, (b"avif", b"avis"))),
    ("PBM/PGM/PPM", lambda head: head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace()),
    ("HEIC", lambda head: has_ftyp_brand(head, _HEIF_BRANDS)),  # iPhones'
    ("JPEG XL", lambda head: head.startswith((b"\xff\x0a", b"\0\0\0\x0cJXL \r\n\x87\n"))),
    ("JPEG 2000", lambda head: head.startswith((b"\0\0\0\x0cjP  \r\n\x87\n", b"\xff\x4f\xff\x51"))),
    ("ICO", lambda head: head.startswith(b"\0\0\1\0")),
    ("CUR", lambda head: head.startswith(b"\0\0\2\0")),
    ("PSD", lambda head: head.startswith(b"8BPS")),
    ("EPS", lambda head: head.startswith((b"%!PS", b"\xc5\xd0\xd3\xc6"))),
    ("PDF", lambda head: head.startswith(b"%PDF-")),
    ("FITS", lambda head: head.startswith(b"SIMPLE  =")),
    ("QOI", lambda head: head.startswith(b"qoif")),
    ("DDS", lambda head: head.startswith(b"DDS ")),
    ("SVG", lambda head: b"<svg" in head),
)


def identify_format(head: bytes) -> str | None:
    """The format that a file's first bytes (SIGNATURE_BYTES of them) announce, or None."""
    return next((name for name, matches in SIGNATURES if matches(head)), None)


def not_an_image(path: str, head: bytes) -> PipelineError:
    """The one-line error for a file that predict cannot open as an image nor take as IDX."""
    name, names = identify_format(head), read_format_names()
    readable = ", ".join(names)
    if name in names:  # its signature, but Pillow gave up on the header after it
        return PipelineError(f"{path}: damaged or unsupported image ({name} signature, but the header cannot be read)")
    if name in READ_FORMATS.values():
        return PipelineError(f"{path}: {name}, which this Pillow was built without ({readable}): convert the image "
                             "to PNG, or install Pillow's wheel from PyPI")
    if name is not None:
        return PipelineError(f"{path}: {name} is not a format predict reads ({readable}): convert the image to PNG")
    return PipelineError(f"{path}: neither an image predict reads ({readable}) nor an IDX file "
                         f"(it begins {head[:8].hex(' ')})")


def load_samples(path: str, size: int, framing: dict | None = None,
                 classes: list[str] | None = None) -> list[Sample]:
    """The samples in one file, named by `path` as given (`./a.png` stays `./a.png`); raises
    PipelineError (one line, naming the file) if unusable.
    `framing`: how the model's dataset made its images from pictures (the model file's);
    `classes`: the model's, which refuse a known IDX file of another dataset (None: unchecked)."""
    path = os.fspath(path)  # a Path from a caller other than main: the samples' names are strings
    check_file(path)
    try:
        return [image_sample(path, size, framing)]
    except UnidentifiedImageError:
        pass  # not in a format predict decodes: IDX, or said what it is
    except OSError as exc:  # opening failed (e.g. permission denied)
        raise cannot_read(path, exc) from None
    try:
        with open(path, "rb") as file:
            head = file.read(SIGNATURE_BYTES)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if not may_be_idx(head):
        raise not_an_image(path, head)  # read no further: a large file of something else costs nothing
    return idx_samples(path, size, classes)  # stages.idx.read_bytes names a file it cannot read


# ---------------------------------------------------------------------------------------------
# Classification and output


@torch.no_grad()
def classify(model: torch.nn.Module, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(predicted class index [N], its probability [N]) for uint8 images [N, H, W]."""
    probabilities = torch.softmax(predict_logits(model, torch.from_numpy(images), BATCH), dim=1)
    best, index = probabilities.max(dim=1)
    return index.cpu().numpy(), best.cpu().numpy()


def result_rows(samples: list[Sample], index: np.ndarray, probability: np.ndarray,
                classes: list[str]) -> list[dict]:
    """The JSON objects for classified samples (every key always present; see docs/predict.md); an
    error row for one whose probability is not finite."""
    rows = []
    for sample, k, p in zip(samples, index, probability):
        if not sample.blank and not np.isfinite(p):
            # Finite weights can still overflow (a normalisation std of 0, a weight near float32's
            # largest): a NaN probability is no answer, and JSON has no NaN.
            rows.append(error_row(sample.name, f"{sample.name}: the model's outputs for it are not finite (NaN or "
                                               "infinite): its weights are broken; retrain: `dvc repro --force train`"))
            continue
        row = {"file": sample.name, "status": "blank" if sample.blank else "ok",
               "class": None, "label": None, "probability": None, "frames": sample.frames, "error": None}
        if not sample.blank:
            row.update({"class": int(k), "label": classes[int(k)], "probability": round(float(p), 6)})
        rows.append(row)
    return rows


def error_row(path: str, message: str) -> dict:
    return {"file": path, "status": "error", "class": None, "label": None, "probability": None,
            "frames": None, "error": message}


def printable(text: str) -> str:
    """`text` with every character that is not printable written as a Python escape: a newline or
    an escape sequence in a file name must neither split an image's line nor drive the terminal,
    and a name's bytes that are not UTF-8 (surrogates here) could not be printed at all."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def text_line(row: dict) -> str:
    """The text-mode line for a classified or blank sample."""
    name = printable(row["file"])
    if row["status"] == "blank":
        line = f"{name}: blank (no ink after thresholding)"
    else:
        line = f"{name}: {printable(row['label'])} ({100 * row['probability']:.1f}%)"
    if row["frames"] > 1:
        more = " or more" if row["frames"] >= MAX_COUNTED_FRAMES else ""
        line += f", first of {row['frames']}{more} frames"
    return line


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="Classify image files (PNG, JPEG, GIF, TIFF, WebP, ...) and IDX image files "
                    "with the trained model. One line per image: its class, 'blank', or an error "
                    "on stderr; the exit status is 1 if any file failed.")
    # str, not Path: each file is named in the output as given (Path would turn ./a.png into a.png).
    # nargs "*" and checked by parse_options: "+" with parse_intermixed_args demands a file before any `--`.
    parser.add_argument("paths", nargs="*", metavar="PATH", help="image files, or IDX files (plain or .gz); "
                        "after --, names that begin with -")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL, help="model file written by train")
    parser.add_argument("--device", default="cpu",
                        help="cpu, cuda, cuda:N, mps, or auto (a CUDA GPU, else an Apple one, else the CPU)")
    parser.add_argument("--json", action="store_true",
                        help="print one JSON list with an object per image (errors included) instead of text lines")
    return parser


def predict_device(name: str) -> torch.device:
    """The torch device that --device names: cpu, cuda, cuda:N, mps, or auto (a CUDA GPU, else an
    Apple GPU, else the CPU). One that is not a device, or not on this machine, is a PipelineError:
    one line, no traceback."""
    if name == "auto":
        device = resolve_device("auto")  # train's rule: the CUDA GPU when there is one
        return torch.device("mps") if device.type == "cpu" and torch.backends.mps.is_available() else device
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise PipelineError(f"--device {name!r}: not a device; use cpu, cuda, cuda:N, mps or auto") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"--device {name!r}: no CUDA GPU is available here; use cpu or auto")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise PipelineError(f"--device {name!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                            f"numbered from 0")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise PipelineError(f"--device {name!r}: no Apple GPU (MPS) is available here; use cpu or auto")
    if device.type not in ("cpu", "cuda", "mps"):
        raise PipelineError(f"--device {name!r}: predict runs on cpu, cuda or mps")
    return device


def check_model_path(path: Path) -> None:
    """A missing or misnamed model file, said with what to do (the default path is relative to
    the working directory, so outside the project it is missing)."""
    if path.is_dir():
        raise PipelineError(f"{path}: a directory; --model takes the model file (models/model.pt in the project)")
    if not path.exists():
        raise PipelineError(f"{path}: no model file here; train one with `dvc repro` or `dvc pull` it from "
                            "your DVC remote (in the project), or name one with --model PATH")


def parse_options(argv: list[str] | None, prog: str | None = None) -> argparse.Namespace:
    """The command line, options and files in any order (`a.png --model m.pt b.png`, as ls or grep
    take them); after `--`, every word is a file. argparse's plain parse_args stopped at the first
    option after a file and refused the files behind it."""
    parser = build_parser(prog)
    argv = sys.argv[1:] if argv is None else list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    args = parser.parse_intermixed_args(argv[:split])
    args.paths += argv[split + 1:]
    if not args.paths:
        parser.error("the following arguments are required: PATH")
    return args


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    args = parse_options(argv, prog)
    try:
        device = predict_device(args.device)
        check_model_path(args.model)
        model, meta = load_model(args.model, device)
    except PipelineError as exc:  # --model's path is named as given: escaped like the images' names
        raise PipelineError(printable(str(exc))) from None
    classes, size = meta["classes"], meta["config"]["image_size"]
    rows, failed = [], 0
    for path in args.paths:
        try:
            samples = load_samples(path, size, meta["framing"], classes)
        except PipelineError as exc:
            log(STAGE, printable(f"error: {exc}"))
            failed += 1
            if args.json:
                rows.append(error_row(path, str(exc)))
            continue
        for row in result_rows(samples, *classify(model, np.stack([s.image for s in samples])), classes):
            if row["status"] == "error":
                log(STAGE, printable(f"error: {row['error']}"))
                failed += 1
            if args.json:
                rows.append(row)
            elif row["status"] != "error":
                # Flushed line by line: results appear as they come, in order with the errors
                # on stderr, and a closed pipe (`| head`) is noticed at once.
                emit(text_line(row))
    if args.json:
        emit(json.dumps(rows, indent=2, allow_nan=False))
    if failed:
        sys.exit(1)


def emit(text: str) -> None:
    """Prints results on stdout, flushed. A closed pipe propagates (cli ends quietly); any other
    failure to write (a full disk: `> /dev/full`) is one line."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        raise
    except OSError as exc:
        discard_stdout()
        raise PipelineError(f"cannot write the results to standard output "
                            f"({os_reason(exc)})") from None


def cli(prog: str | None = None) -> None:
    """Console-script entry point (`mnist-predict`)."""
    try:
        run_main(STAGE, lambda: main(prog=prog))
    except BrokenPipeError:
        # The reader went away (`... | head -5`): stop quietly, as cat or grep do.
        discard_stdout()
        sys.exit(128 + signal.SIGPIPE)


def discard_stdout() -> None:
    """Points stdout at /dev/null, so that the interpreter's final flush of what could not be
    written does not fail again."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


if __name__ == "__main__":
    cli(PROG)
