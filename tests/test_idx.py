"""stages.idx: IDX round trips, and every malformed file refused with IdxFormatError naming it."""

from __future__ import annotations

import gzip
import struct
import tracemalloc

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from stages.common import PipelineError
from stages.idx import (IdxFormatError, IdxTooLargeError, declared_dims, may_be_idx, parse_idx, read_bytes, read_images,
                        read_labels, read_pair, write_idx)

SIZE = 28
CLASSES = 10
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def header(type_code: int, dims: tuple[int, ...]) -> bytes:
    """An IDX header: two zero bytes, the type code, the number of dimensions, big-endian uint32 dims."""
    return bytes([0, 0, type_code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims)


def write(path, data: bytes, compress: bool):
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.mark.parametrize("shape", [(7,), (0,), (5, SIZE, SIZE), (2, 3, 4, 5)])
def test_round_trip(rng, shape):
    """parse_idx(write_idx(a)) gives back a's shape, dtype and values."""
    array = rng.integers(0, 256, size=shape, dtype=np.uint8)
    data = write_idx(array)
    assert data[:4] == bytes([0, 0, 0x08, len(shape)])
    parsed = parse_idx(data)
    assert parsed.dtype == np.uint8 and parsed.shape == shape
    np.testing.assert_array_equal(parsed, array)


def test_write_idx_refuses_other_dtypes():
    """Only uint8 arrays can be written (MNIST's only type)."""
    with pytest.raises(ValueError):
        write_idx(np.zeros(3, dtype=np.int64))


@pytest.mark.parametrize("compress", [True, False], ids=["gz", "plain"])
def test_read_pair(tmp_path, rng, compress):
    """read_images / read_labels / read_pair read gzip and plain files alike."""
    images = rng.integers(0, 256, size=(6, SIZE, SIZE), dtype=np.uint8)
    labels = np.array([0, 9, 3, 3, 1, 7], dtype=np.uint8)
    images_path = write(tmp_path / "images", write_idx(images), compress)
    labels_path = write(tmp_path / "labels", write_idx(labels), compress)
    np.testing.assert_array_equal(read_images(images_path, SIZE), images)
    np.testing.assert_array_equal(read_labels(labels_path, CLASSES), labels)
    got_images, got_labels = read_pair(images_path, labels_path, SIZE, CLASSES)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)


LABELS = write_idx(np.arange(10, dtype=np.uint8))


@pytest.mark.parametrize(("data", "reason"), [
    (b"", "bad magic"),
    (b"\x01\x00\x08\x01" + LABELS[4:], "bad magic"),
    (b"\x00\x01\x08\x01" + LABELS[4:], "bad magic"),
    (header(0x0D, (10,)) + bytes(40), "unsupported IDX value type 0x0d"),
    (header(0x08, ()), "zero dimensions"),
    (bytes([0, 0, 8, 3, 0, 0]), "truncated header"),
    (LABELS[:-1], "disagrees"),
    (LABELS + b"\x00", "disagrees"),
    (header(0x08, (2, 3)) + bytes(5), "disagrees"),
], ids=["empty", "magic byte 0", "magic byte 1", "float type", "no dims", "short header",
        "truncated", "extra byte", "short 2-d"])
def test_parse_idx_refuses_malformed(data, reason):
    """Each malformed header or size raises IdxFormatError naming the file and the problem."""
    with pytest.raises(IdxFormatError) as info:
        parse_idx(data, "some/file")
    assert str(info.value).startswith("some/file: ")
    assert reason in str(info.value)


def test_huge_declared_dims_allocate_nothing():
    """A header claiming 2^32-1 cubed values is refused from its size alone, without allocating."""
    data = header(0x08, (2**32 - 1,) * 3) + bytes(100)
    tracemalloc.start()
    try:
        with pytest.raises(IdxFormatError, match="disagrees"):
            parse_idx(data)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20


def test_a_file_that_cannot_be_read_is_one_line_naming_it(tmp_path, monkeypatch):
    """Not a format problem, so not IdxFormatError: the reason the system gives (as root, chmod
    000 does not stop a read, so a refusal is simulated)."""
    with pytest.raises(PipelineError, match=rf"^{tmp_path}: cannot read \(Is a directory\)$"):
        read_images(tmp_path, SIZE)
    labels = write(tmp_path / "labels", write_idx(np.zeros(3, np.uint8)), False)

    def refused(path, mode="r", *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr("builtins.open", refused)
    with pytest.raises(PipelineError, match=rf"^{labels}: cannot read \(Permission denied\)$") as info:
        read_labels(labels, CLASSES)
    assert not isinstance(info.value, IdxFormatError)


def test_images_of_wrong_shape(tmp_path):
    """A 3-d file of 28x27 images, or a 2-d file, is not an images file of size 28."""
    narrow = write(tmp_path / "narrow", write_idx(np.zeros((2, SIZE, SIZE - 1), np.uint8)), True)
    with pytest.raises(IdxFormatError, match=r"expected images of shape \[N, 28, 28\]") as info:
        read_images(narrow, SIZE)
    assert str(narrow) in str(info.value)
    flat = write(tmp_path / "flat", write_idx(np.zeros((2, SIZE * SIZE), np.uint8)), False)
    with pytest.raises(IdxFormatError) as info:
        read_images(flat, SIZE)
    assert str(flat) in str(info.value)


def test_labels_of_wrong_shape(tmp_path):
    """A 2-d labels file is refused."""
    path = write(tmp_path / "labels", write_idx(np.zeros((3, 2), np.uint8)), True)
    with pytest.raises(IdxFormatError, match="1-d labels") as info:
        read_labels(path, CLASSES)
    assert str(path) in str(info.value)


def test_label_out_of_range(tmp_path):
    """Label 10 in a 10-class file is refused; 9 is fine."""
    path = write(tmp_path / "labels", write_idx(np.array([0, 10, 9], np.uint8)), True)
    with pytest.raises(IdxFormatError, match=r"label 10 is outside 0\.\.9") as info:
        read_labels(path, CLASSES)
    assert str(path) in str(info.value)


def test_pair_of_different_lengths(tmp_path):
    """Images and labels must pair up one to one."""
    images = write(tmp_path / "images", write_idx(np.zeros((3, SIZE, SIZE), np.uint8)), True)
    labels = write(tmp_path / "labels", write_idx(np.zeros(4, np.uint8)), True)
    with pytest.raises(IdxFormatError, match="3 images but .* 4 labels") as info:
        read_pair(images, labels, SIZE, CLASSES)
    assert str(images) in str(info.value) and str(labels) in str(info.value)


@pytest.mark.parametrize("damage", ["truncated", "corrupted body", "bad crc"])
def test_damaged_gzip(tmp_path, damage):
    """A damaged gzip file is an IdxFormatError naming the file, not a zlib/EOF error."""
    packed = bytearray(gzip.compress(LABELS))
    if damage == "truncated":
        packed = packed[:len(packed) // 2]
    elif damage == "corrupted body":
        packed[12:16] = b"\xff\xff\xff\xff"
    else:
        packed[-8] ^= 0xFF  # the CRC-32 of the trailer
    path = tmp_path / "labels.gz"
    path.write_bytes(bytes(packed))
    with pytest.raises(IdxFormatError, match="damaged gzip") as info:
        read_labels(path, CLASSES)
    assert str(path) in str(info.value)


def check_parse(data: bytes) -> None:
    """parse_idx returns a uint8 ndarray or raises IdxFormatError; anything else propagates (fails)."""
    try:
        result = parse_idx(data, "fuzz")
    except IdxFormatError as exc:
        assert str(exc).startswith("fuzz: ")
    else:
        assert isinstance(result, np.ndarray) and result.dtype == np.uint8


@FUZZ
@given(st.binary(max_size=2048))
def test_fuzz_arbitrary_bytes(data):
    """No byte string makes parse_idx fail other than with IdxFormatError."""
    check_parse(data)


@st.composite
def idx_like(draw) -> bytes:
    """Plausible IDX files: a valid magic (mostly), random dims, small or huge, and a body that
    often has exactly the declared size, then sometimes cut or extended."""
    type_code = draw(st.sampled_from([0x08, 0x08, 0x08, 0x09, 0x0D]))
    ndim = draw(st.integers(1, 4) | st.integers(0, 255))
    dim = st.integers(0, 5) | st.integers(0, 2**32 - 1) | st.sampled_from([0, 1, 2**31, 2**32 - 1])
    dims = tuple(draw(st.lists(dim, min_size=ndim, max_size=ndim)))
    size = int(np.prod(dims, dtype=object))
    body = bytes(size) if size <= 4096 and draw(st.booleans()) else draw(st.binary(max_size=256))
    data = header(type_code, dims) + body
    cut = draw(st.integers(-8, 8))
    return data[:len(data) + cut] if cut < 0 else data + bytes(cut)


@FUZZ
@given(idx_like())
@example(header(0x08, (1,) * 65) + b"\x00")  # more dimensions than numpy arrays can have
@example(header(0x08, (0, 2**32 - 1, 2**32 - 1)))  # zero values, but a shape numpy cannot hold
def test_fuzz_valid_looking_headers(data):
    """Headers that look valid, with any dims, parse or raise IdxFormatError: never another error."""
    check_parse(data)


def test_a_size_limit_bounds_plain_and_gzip_content(tmp_path):
    """With max_size, content over the limit is refused whether stored plain or gzipped (a gzip
    bomb is not inflated past the limit); content within it comes back whole."""
    content = write_idx(np.zeros((10, 28, 28), np.uint8))
    for name, data in (("plain", content), ("packed.gz", gzip.compress(content))):
        path = tmp_path / name
        path.write_bytes(data)
        assert read_bytes(path, max_size=len(content)) == content
        # Its own kind of IdxFormatError: fetch adds what bounds the size (the dataset table).
        # The header's dimensions are said: a file larger than a table's counts allow is more often a
        # wrong count than a wrong file.
        with pytest.raises(IdxTooLargeError, match=rf"{name}: content larger than {len(content) - 1:,} bytes "
                                                   r"\(refused\): its IDX header gives the dimensions 10 x 28 x 28$"):
            read_bytes(path, max_size=len(content) - 1)


def test_a_tiny_gz_larger_than_its_content_is_read(tmp_path):
    """A .gz of a few labels is larger than their content (gzip's header): the size bound is the
    content's, with gzip's allowance for the file (stored_limit); a .gz past that is refused as too
    large, not read cut short as damaged."""
    content = write_idx(np.arange(20, dtype=np.uint8))
    (tmp_path / "tiny.gz").write_bytes(gzip.compress(content))
    assert (tmp_path / "tiny.gz").stat().st_size > len(content)
    assert read_bytes(tmp_path / "tiny.gz", max_size=len(content)) == content
    (tmp_path / "huge.gz").write_bytes(gzip.compress(bytes(range(256)) * 1000, compresslevel=0))
    with pytest.raises(IdxTooLargeError, match=r"huge\.gz: a \.gz of more than 65,564 bytes, more than 28 bytes of "
                                               r"content can take \(refused\)$"):
        read_bytes(tmp_path / "huge.gz", max_size=len(content))


def test_declared_dims_reads_an_idx_header_only():
    assert declared_dims(write_idx(np.zeros((60000, 1, 1), np.uint8))[:1024]) == \
        ": its IDX header gives the dimensions 60,000 x 1 x 1"
    for head in (b"", b"\0\0\x08\x03" + bytes(8), b"PK\3\4" + bytes(12), b"\0\0\x08\0"):  # short, zip, 0-d
        assert declared_dims(head) == ""


def test_may_be_idx_takes_idx_and_gzip_starts_only():
    assert may_be_idx(write_idx(np.zeros((1, 2, 2), np.uint8))[:4])
    assert may_be_idx(gzip.compress(b"anything")[:4])
    assert not may_be_idx(b"\0\0\1\0")  # an ICO: no IDX type code 0x01
    assert not may_be_idx(b"\x89PNG") and not may_be_idx(b"\0\0") and not may_be_idx(b"")
