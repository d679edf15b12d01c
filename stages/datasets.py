"""The dataset table (datasets.yaml beside this file), read into typed, checked entries."""

from __future__ import annotations

import hashlib
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from stages.common import PipelineError, read_yaml
from stages.model_config import class_names_problem, framing_problem, is_valid_crop, is_whole, largest_crop

TABLE_PATH = Path(__file__).with_name("datasets.yaml")
# Each role is one IDX file; preprocess relies on exactly these four.
FILE_ROLES = ("train_images", "train_labels", "test_images", "test_labels")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_FILE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True)
class DataFile:
    name: str  # uncompressed IDX name, as fetch writes it to data/raw; mirrors serve it as name + ".gz"
    sha256: str  # of the uncompressed content
    size: int  # bytes of the uncompressed content (IDX header + data), from the dataset's counts

    @property
    def gz_name(self) -> str:
        return self.name + ".gz"

    def path_in(self, directory: Path) -> Path:
        """The file in `directory`: uncompressed (data/raw) or gzipped (a mirror's copy), whichever
        is there, the uncompressed one when both are; the uncompressed name when neither is, for
        the reader's error to name."""
        gzipped = directory / self.gz_name
        return gzipped if gzipped.is_file() and not (directory / self.name).is_file() else directory / self.name


@dataclass(frozen=True)
class Dataset:
    name: str
    files: dict[str, DataFile]  # role (FILE_ROLES) -> file
    train_count: int
    test_count: int
    image_size: int  # images are image_size x image_size, one uint8 channel
    classes: tuple[str, ...]
    flippable: bool  # an image mirrored left-right keeps its class (a shoe; not a digit)
    crop: int  # pixels `train.crop: auto` cuts off each side: the border the images leave nearly empty
    framing: dict  # {box, centre}: how a picture became an image (stages.model_config.framing_problem)

    def missing_from(self, directory: Path, roles: tuple[str, ...] = FILE_ROLES) -> str:
        """'' when `directory` holds the file of each role, plain or .gz (DataFile.path_in); else
        which it lacks, e.g. "no t10k-labels-idx1-ubyte (nor .gz)", for the caller's error, which
        adds its own way out (a stage's `dvc repro fetch`, a benchmark's --raw)."""
        lacking = [self.files[role].name for role in roles if not self.files[role].path_in(directory).is_file()]
        return f"no {', '.join(lacking)} (nor .gz)" if lacking else ""


def is_url(source: str) -> bool:
    """Whether a source of a dataset's files ($MNIST_MIRROR, a fetch.mirrors entry) is a base URL;
    else it is a directory."""
    return "://" in source


def credentials_problem(source: str) -> str | None:
    """Why a source with a user name or password in its URL (https://user:token@host/) is refused,
    naming it without them; None for any other source. urllib would not send them (it reads
    "user:token@host" as the host name), and every log line naming the source would print them."""
    parts = urllib.parse.urlsplit(source)
    if not is_url(source) or "@" not in parts.netloc:  # not one in the path or the query
        return None
    shown = parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]).geturl()
    return (f"{shown}: a user name or password in a mirror's URL is not supported (it would be printed "
            "in the logs, and is not sent); serve the files without one, or download them and give "
            "their directory")


def idx_size(role: str, count: int, image_size: int) -> int:
    """Bytes of an IDX file of `count` images (a 16-byte header: magic, count, rows, columns; then
    one uint8 per pixel) or labels (an 8-byte header: magic, count; then one uint8 each)."""
    return 16 + count * image_size * image_size if role.endswith("images") else 8 + count


_NAME = re.compile(r"[a-z][a-z0-9_-]*")
# Names that `dvc exp run -S fetch.dataset=NAME` (Hydra's parser) reads as a bool, null or float.
_NOT_TEXT = {"true", "false", "null", "nan", "inf"}


def _parse_entry(name: str, raw: object) -> Dataset:
    where = f"{TABLE_PATH.name}: {name}"
    # fetch.dataset's value and a key of fetch.mirrors, which `dvc exp run -S fetch.mirrors.NAME=...`
    # splits at dots: `k.mnist` passed here and failed there; `-S fetch.dataset=2024` gives a number.
    if not (isinstance(name, str) and _NAME.fullmatch(name) and name not in _NOT_TEXT):
        raise PipelineError(f"{TABLE_PATH.name}: {name!r}: a dataset's name is lowercase letters, digits, '-' and "
                            "'_', starting with a letter (and not true, false, null, nan or inf)")
    if not isinstance(raw, dict):
        raise PipelineError(f"{where}: expected a mapping")
    expected = {"files", "train_count", "test_count", "image_size", "classes", "flippable", "crop", "framing"}
    if set(raw) != expected:
        raise PipelineError(f"{where}: expected keys {sorted(expected)}, found {sorted(raw)}")
    files_raw = raw["files"]
    if not isinstance(files_raw, dict) or set(files_raw) != set(FILE_ROLES):
        raise PipelineError(f"{where}.files: expected exactly {list(FILE_ROLES)}")
    for key in ("train_count", "test_count", "image_size"):
        if not is_whole(raw[key]) or raw[key] < 1:
            raise PipelineError(f"{where}.{key}: expected a positive integer")
    files = {}
    for role in FILE_ROLES:
        entry = files_raw[role]
        if not (isinstance(entry, dict) and set(entry) == {"name", "sha256"}
                and isinstance(entry["name"], str) and _SHA256.fullmatch(str(entry["sha256"]))):
            raise PipelineError(f"{where}.files.{role}: expected {{name, sha256 (64 lowercase hex digits, of the "
                                "uncompressed content)}}")
        # A file name, joined to data/raw, a mirror's directory and its URL: a '/' or '..' in it
        # would write fetch's output outside data/raw, or read a mirror's neighbour.
        if not _FILE_NAME.fullmatch(entry["name"]):
            raise PipelineError(f"{where}.files.{role}.name: {entry['name']!r} is not a plain file name (letters, "
                                "digits, '.', '_' and '-', not first)")
        count = raw["train_count"] if role.startswith("train") else raw["test_count"]
        files[role] = DataFile(entry["name"], entry["sha256"], idx_size(role, count, raw["image_size"]))
    classes = raw["classes"]
    if problem := class_names_problem(classes):
        raise PipelineError(f"{where}.classes: {problem}")
    if not isinstance(raw["flippable"], bool):
        raise PipelineError(f"{where}.flippable: expected true or false")
    if not is_valid_crop(raw["crop"], raw["image_size"]):
        raise PipelineError(f"{where}.crop: expected a whole number of pixels in "
                            f"0-{largest_crop(raw['image_size'])}, got {raw['crop']!r}")
    problem = framing_problem(raw["framing"], raw["image_size"])
    if problem:
        raise PipelineError(f"{where}.framing: {problem}")
    return Dataset(name, files, raw["train_count"], raw["test_count"], raw["image_size"], tuple(classes),
                   raw["flippable"], raw["crop"], dict(raw["framing"]))


def load_table(path: Path = TABLE_PATH) -> dict[str, Dataset]:
    raw = read_yaml(path, "the dataset table")
    if not isinstance(raw, dict) or not raw:
        raise PipelineError(f"{path}: expected a mapping of dataset names to entries")
    return {name: _parse_entry(name, entry) for name, entry in raw.items()}


@dataclass(frozen=True)
class KnownFile:
    """A file of the dataset table, as found by its content's SHA-256 (known_files)."""
    dataset: Dataset
    role: str  # one of FILE_ROLES

    def __str__(self) -> str:
        """"<dataset>'s <file name>", e.g. "fashion-mnist's train-images-idx3-ubyte"."""
        return f"{self.dataset.name}'s {self.dataset.files[self.role].name}"


def known_files(table: dict[str, Dataset]) -> dict[str, KnownFile]:
    """SHA-256 of every file the table lists -> that file: fetch names a file found in place of
    another by it (MNIST's and Fashion-MNIST's files have the same names), predict refuses a
    dataset's own images for a model of other classes."""
    return {entry.sha256: KnownFile(dataset, role) for dataset in table.values()
            for role, entry in dataset.files.items()}


def digest_problem(file: DataFile, content: bytes, known: dict[str, KnownFile] | None = None) -> str | None:
    """Why `content` (uncompressed) is not `file` as the table pins it, or None. `known`
    (known_files) names the table's file that it is instead, if any (a mirror of the other dataset)."""
    digest = hashlib.sha256(content).hexdigest()
    if digest == file.sha256:
        return None
    which = f": it is {known[digest]}" if known and digest in known else ""
    # Whole: a table entry being written differs from the file's in any digit, and its author
    # needs this file's (of the content, not of the .gz)
    return f"SHA-256 of the uncompressed content is {digest}, stages/datasets.yaml expects {file.sha256}{which}"
