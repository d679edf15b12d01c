"""The IDX file format of MNIST: parse, check and write.

Layout: two zero bytes, a type code (0x08 = unsigned byte, the only one MNIST uses), the number of
dimensions, one big-endian uint32 per dimension, then the values in C order.
Images are 3-d [count, rows, cols] (magic 0x00000803), labels 1-d [count] (magic 0x00000801).
"""

from __future__ import annotations

import gzip
import io
import zlib
from pathlib import Path

import numpy as np

from stages.common import PipelineError, cannot_read

UBYTE = 0x08
VALUE_TYPES = (0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E)  # every type code of the format: u8, i8, i16, i32, f32, f64
_GZIP_MAGIC = b"\x1f\x8b"


class IdxFormatError(PipelineError):
    """A malformed IDX file; the message names the file."""


class IdxTooLargeError(IdxFormatError):
    """Content past a reader's size bound (max_size): refused before it is all read or inflated."""


class LabelOutOfRangeError(IdxFormatError):
    """A label past the classes the caller was told of (read_labels' num_classes)."""


def parse_idx(data: bytes, name: str = "<bytes>") -> np.ndarray:
    """Parses an uncompressed IDX file. Raises IdxFormatError on anything malformed, never another error."""
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise IdxFormatError(f"{name}: not an IDX file (bad magic number {data[:4].hex() or 'empty'})")
    type_code, ndim = data[2], data[3]
    if type_code != UBYTE:
        raise IdxFormatError(f"{name}: unsupported IDX value type 0x{type_code:02x} (only 0x08, unsigned byte)")
    if ndim == 0:
        raise IdxFormatError(f"{name}: IDX header declares zero dimensions")
    header_size = 4 + 4 * ndim
    if len(data) < header_size:
        raise IdxFormatError(f"{name}: truncated header ({len(data)} bytes, need {header_size})")
    dims = tuple(int(d) for d in np.frombuffer(data, dtype=">u4", count=ndim, offset=4))
    expected = header_size + int(np.prod(dims, dtype=object))  # object dtype: no overflow on huge dims
    if len(data) != expected:
        raise IdxFormatError(
            f"{name}: size {len(data):,} bytes disagrees with the header's dimensions {dims} "
            f"({expected:,} bytes expected); the file is truncated or not what it claims"
        )
    try:
        return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(dims)
    except ValueError as exc:  # e.g. more dimensions than NumPy supports
        raise IdxFormatError(f"{name}: unusable dimensions {dims} ({exc})") from None


def may_be_idx(head: bytes) -> bool:
    """True when a file that starts with `head` could be IDX: gzip (by content, as read_bytes takes
    it), or IDX's two zero bytes and a type code. parse_idx says whether it is."""
    return head[:2] == _GZIP_MAGIC or (head[:2] == b"\0\0" and len(head) > 2 and head[2] in VALUE_TYPES)


def declared_dims(head: bytes) -> str:
    """The dimensions an IDX header at the start of `head` gives, as ": its IDX header gives the
    dimensions 60,000 x 28 x 28", or "" where `head` starts with none: said with a size refusal,
    where a file larger than its table's counts allow is more often a wrong count than a wrong file."""
    ndim = head[3] if len(head) > 3 and head[:2] == b"\0\0" and head[2] in VALUE_TYPES else 0
    if ndim == 0 or len(head) < 4 + 4 * ndim:
        return ""
    dims = np.frombuffer(head, dtype=">u4", count=ndim, offset=4)
    return ": its IDX header gives the dimensions " + " x ".join(f"{int(d):,}" for d in dims)


def write_idx(array: np.ndarray) -> bytes:
    """Serialises a uint8 array as an uncompressed IDX file (used by tests and by `predict` fixtures)."""
    array = np.ascontiguousarray(array)
    if array.dtype != np.uint8 or not 1 <= array.ndim <= 255:
        raise ValueError(f"write_idx takes a uint8 array of 1..255 dims, got {array.dtype} {array.shape}")
    header = bytes([0, 0, UBYTE, array.ndim]) + np.asarray(array.shape, dtype=">u4").tobytes()
    return header + array.tobytes()


def gunzip_if_compressed(data: bytes, name: str = "<bytes>", max_size: int | None = None) -> bytes:
    """`data` gunzipped when it is gzip (by content, not name), else unchanged; IdxFormatError if
    damaged, or if the content is larger than `max_size` bytes (when given)."""
    if data[:2] != _GZIP_MAGIC:
        content = data
    else:
        try:
            with gzip.GzipFile(fileobj=io.BytesIO(data)) as stream:
                # Reading at most one byte past the limit: a gzip bomb (a few KB that inflate to
                # gigabytes) is refused after max_size bytes of memory, not after all of them.
                content = stream.read(-1 if max_size is None else max_size + 1)
        except (OSError, EOFError, zlib.error) as exc:
            raise IdxFormatError(f"{name}: damaged gzip data ({exc})") from None
    if max_size is not None and len(content) > max_size:
        raise IdxTooLargeError(f"{name}: content larger than {max_size:,} bytes (refused)"
                               + declared_dims(content[:1024]))
    return content


def stored_limit(content_size: int) -> int:
    """The most bytes a file of `content_size` bytes of content takes stored, gzipped or plain: the
    content plus room for gzip's overhead (on incompressible data a few bytes per 64 KiB block, and a
    header; a tiny file's .gz is larger than its content)."""
    return content_size + content_size // 100 + 65536


def read_bytes(path: Path, max_size: int | None = None) -> bytes:
    """The uncompressed content of `path`; with `max_size`, refused (IdxTooLargeError) above that
    many bytes of content, or of file (stored_limit), so the memory it takes is bounded whatever the
    file holds. A file that cannot be read (no permission, a directory) is a one-line PipelineError
    naming it."""
    limit = None if max_size is None else stored_limit(max_size)
    try:
        with open(path, "rb") as f:
            data = f.read(-1 if limit is None else limit + 1)
    except OSError as exc:
        raise cannot_read(path, exc) from None
    if limit is not None and len(data) > limit and data[:2] == _GZIP_MAGIC:  # cut here, it would read as damaged
        raise IdxTooLargeError(f"{path}: a .gz of more than {limit:,} bytes, more than {max_size:,} bytes of "
                               "content can take (refused)")
    return gunzip_if_compressed(data, str(path), max_size)


def read_images(path: Path, image_size: int, max_size: int | None = None) -> np.ndarray:
    """uint8 [N, image_size, image_size] from an IDX images file (of at most max_size bytes, see read_bytes)."""
    images = parse_idx(read_bytes(path, max_size), str(path))
    if images.ndim != 3 or images.shape[1:] != (image_size, image_size):
        raise IdxFormatError(
            f"{path}: expected images of shape [N, {image_size}, {image_size}], found dimensions {images.shape}"
        )
    return images


def read_labels(path: Path, num_classes: int, max_size: int | None = None) -> np.ndarray:
    """uint8 [N] from an IDX labels file (of at most max_size bytes), every value in 0..num_classes-1."""
    labels = parse_idx(read_bytes(path, max_size), str(path))
    if labels.ndim != 1:
        raise IdxFormatError(f"{path}: expected a 1-d labels file, found dimensions {labels.shape}")
    if labels.size and labels.max() >= num_classes:
        bad = int(labels.max())
        raise LabelOutOfRangeError(f"{path}: label {bad} is outside 0..{num_classes - 1}")
    return labels


def read_pair(images_path: Path, labels_path: Path, image_size: int, num_classes: int,
              max_sizes: tuple[int | None, int | None] = (None, None)) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) of read_images and read_labels, each file of at most its max_sizes entry."""
    images = read_images(images_path, image_size, max_sizes[0])
    labels = read_labels(labels_path, num_classes, max_sizes[1])
    if len(images) != len(labels):
        raise IdxFormatError(
            f"{images_path} holds {len(images):,} images but {labels_path} holds {len(labels):,} labels"
        )
    return images, labels
