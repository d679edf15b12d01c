"""What rebuilds a network: the model file stores it, params builds it, stages.models turns it into layers.

A module of its own, free of torch and of params, because both sides need it: params.py checks
train.model against ARCHITECTURES and builds a ModelConfig from the train section, and the model
file (stages.models) stores one. Only the train and evaluate stages (and predict, which is no
stage) import the network code; every stage imports params, so the layers kept here would make
every stage depend on them.
"""

from __future__ import annotations

import dataclasses
import reprlib
from dataclasses import dataclass
from typing import Any, Literal, get_args, get_origin, get_type_hints

Architecture = Literal["softmax", "mlp", "cnn"]
Pool = Literal["end", "early"]  # cnn: each block's max-pool after its last ReLU, or right after its first conv
Stem = Literal["pool", "stride"]  # cnn: the first block halves the image by its max-pool, or by a stride-2 first conv
ARCHITECTURES: tuple[str, ...] = get_args(Architecture)
MAX_NETWORKS = 16  # of an ensemble (train.networks, ModelConfig.networks): each multiplies the training time
MAX_HIDDEN_LAYERS = 16  # of an MLP (train.hidden, ModelConfig.hidden)
MAX_CONVS_PER_BLOCK = 4  # of a CNN (train.convs_per_block, ModelConfig.convs_per_block)


def largest_crop(image_size: int) -> int:
    """The most pixels a cnn may cut off each side of an image_size square (ModelConfig.crop): its
    three halvings need a side of at least 8."""
    return (image_size - 8) // 2


def feature_side(image_size: int, crop: int, stem: str) -> int:
    """The side of the CNN's last feature map, which its classifier flattens: three halvings of the
    central (image_size - 2 crop) square; a 2x2 max-pool floors (28 -> 14 -> 7 -> 3), a stride-2
    conv with padding 1 (stem: stride) rounds up."""
    seen = image_size - 2 * crop
    return (seen + 1) // 2 // 4 if stem == "stride" else seen // 8


def is_whole(value: object) -> bool:
    """Whether `value` is an int, and not a bool (which YAML's true and pickle's True would pass)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_valid_network_count(networks: object) -> bool:
    """Whether `networks` is a whole number of networks in 1-MAX_NETWORKS: the one rule for
    train.networks and a model file's."""
    return is_whole(networks) and 1 <= networks <= MAX_NETWORKS


MAX_CLASS_NAME = 100  # characters of one class name


def class_names_problem(classes: object, as_keys: bool = True) -> str | None:
    """Why `classes` cannot name a model's outputs, or None: the one rule for a dataset table's
    names (as_keys) and a model file's. A table's names key metrics/eval.json's per_class, whose
    keys DVC joins with dots (per_class.Sneaker.accuracy), and each is a cell of
    metrics/confusion.csv: a '.' or a control character (a line break) would break them. A model
    file only needs names (predict escapes what it prints): one written before these rules still
    loads. The message never prints the names whole (a model file's list may be built to be huge)."""
    if not (isinstance(classes, list) and len(classes) >= 2 and all(isinstance(c, str) and c for c in classes)):
        return "expected a list of at least two names"
    if not as_keys:
        return None
    if len(set(classes)) < len(classes):
        return "names must differ"
    bad = next((c for c in classes if "." in c or not c.isprintable() or len(c) > MAX_CLASS_NAME), None)
    if bad is not None:
        return (f"{bad[:MAX_CLASS_NAME]!r}: a name holds no '.' nor control characters, and at most "
                f"{MAX_CLASS_NAME} characters (names key metrics/eval.json's per_class, whose keys DVC joins with dots)")
    return None


def is_valid_crop(crop: object, image_size: int) -> bool:
    """Whether `crop` is a whole number of pixels a cnn can cut off each side, 0 to largest_crop: the
    one rule for train.crop, a dataset's crop (datasets.yaml) and a model file's."""
    return is_whole(crop) and 0 <= crop <= largest_crop(image_size)


# How a dataset's images were made from pictures, which predict repeats on a user's picture: the
# object's bounding box scaled to fit `box` x `box` pixels, then placed so that its centre of mass
# ("mass", MNIST's digits) or its bounding box's centre ("box", Fashion-MNIST's products) is the
# image's centre. datasets.yaml gives each dataset's; train stores it in the model file.
FRAMING_CENTRES = ("mass", "box")


def digit_framing(image_size: int) -> dict:
    """MNIST's framing, for images of image_size pixels a side: a 20x20 box in 28x28, centred by
    mass. What model files before format 8 (which stored none) are framed with, as predict did then."""
    return {"box": max(1, 20 * image_size // 28), "centre": "mass"}


def framing_problem(framing: object, image_size: int) -> str | None:
    """Why `framing` is no {box, centre} for images of image_size pixels a side; None when it is one.
    The one rule for a dataset's framing (datasets.yaml) and a model file's. Values are shown by
    reprlib, bounded: a model file's pickle can nest one small list in itself into billions of items."""
    if not (isinstance(framing, dict) and set(framing) == {"box", "centre"}):
        return f"expected {{box, centre}}, got {reprlib.repr(framing)}"
    box = framing["box"]
    if not is_whole(box) or not 1 <= box <= image_size:
        return f"box: expected whole pixels in 1-{image_size}, got {reprlib.repr(box)}"
    if framing["centre"] not in FRAMING_CENTRES:
        return f"centre: expected one of {', '.join(FRAMING_CENTRES)}, got {reprlib.repr(framing['centre'])}"
    return None


@dataclass(frozen=True)
class ModelConfig:
    """Everything that rebuilds the network, weights aside; stored in the model file as plain values."""

    architecture: Architecture
    hidden: tuple[int, ...]  # mlp: hidden layer widths, input to output
    dropout: float  # mlp: dropout probability after each hidden layer
    channels: tuple[int, ...]  # cnn: output channels of its three conv blocks
    convs_per_block: int  # cnn: 3x3 convs in each block
    pool: Pool  # cnn
    image_size: int  # images are [image_size, image_size]
    num_classes: int  # logits per image
    mean: float  # pixel mean and std of the train split, in [0, 1] units: the first layer normalises
    std: float
    # Test-time augmentation: in eval mode the logits are averaged over the image and its views,
    # its mirror image (flip) and its shifts by tta_shift pixels left, right, up and down (0: none).
    # Part of the model, so that val scoring in train, evaluate and predict all see the same outputs.
    tta_flip: bool = False
    tta_shift: int = 0
    # cnn: how the first block halves the image. "pool": its max-pool, like the other blocks;
    # "stride": its first conv steps 2 pixels (no max-pool in that block), so no layer works at the
    # full 28x28 resolution. The weights have the same shapes either way.
    stem: Stem = "pool"
    # cnn (0 for the others): pixels cut off each side before the first conv (the network sees the
    # central image_size - 2 * crop pixels square). MNIST's digits are size-normalised to 20x20 and
    # centred by their centre of mass, so the border is nearly empty (0.24 % of the ink in the outer
    # 2 pixels, though 11.8 % of images have a pixel above 64 there) while every conv's cost scales
    # with the pixels it sees. Applied after the test-time views are formed.
    crop: int = 0
    # Networks of this config trained side by side (stages.models.Ensemble), each from its own
    # initial weights, on the same batches; in eval mode their logits (each after its test-time
    # augmentation) are averaged. 1: a single network, whose weights keep their names.
    networks: int = 1

    def to_dict(self) -> dict[str, Any]:
        """Plain values (lists, not tuples) for the model file."""
        return {**dataclasses.asdict(self), "hidden": list(self.hidden), "channels": list(self.channels)}

    @classmethod
    def from_dict(cls, raw: Any) -> ModelConfig:
        """The config of a model file; ValueError naming what is missing or unknown."""
        if not isinstance(raw, dict):
            raise ValueError(f"the configuration is a {type(raw).__name__}, not a mapping")
        names = [field.name for field in dataclasses.fields(cls)]
        missing, unknown = [n for n in names if n not in raw], [k for k in raw if k not in names]
        if missing or unknown:
            raise ValueError(f"configuration keys missing: {missing}, unknown: {unknown}")
        # Every Literal field's value must be one of its choices: the network code would otherwise
        # read an unknown one as "not the other one" (an unknown stem would build the pool stem).
        hints = get_type_hints(cls)
        for name in names:
            choices = get_args(hints[name]) if get_origin(hints[name]) is Literal else None
            if choices and raw[name] not in choices:
                raise ValueError(f"configuration {name} {reprlib.repr(raw[name])} is not one of {', '.join(map(repr, choices))}")
        # A crop the network cannot take would fail only at the first forward pass, with a shape error.
        crop = raw["crop"]
        if not is_valid_crop(crop, raw["image_size"]):
            raise ValueError(f"configuration crop {reprlib.repr(crop)} is not a whole number of pixels in "
                             f"0-{largest_crop(raw['image_size'])}")
        # Bounded before any network is built: a damaged count would otherwise build that many
        # (the layers' widths need no bound: stages.models.load_model builds them without memory).
        if not is_valid_network_count(raw["networks"]):
            raise ValueError(f"configuration networks {reprlib.repr(raw['networks'])} is not a whole number in 1-{MAX_NETWORKS}")
        if not (isinstance(raw["hidden"], (list, tuple)) and len(raw["hidden"]) <= MAX_HIDDEN_LAYERS):
            raise ValueError(f"configuration hidden is not a list of at most {MAX_HIDDEN_LAYERS} widths")
        if not (is_whole(raw["convs_per_block"]) and 1 <= raw["convs_per_block"] <= MAX_CONVS_PER_BLOCK):
            raise ValueError(f"configuration convs_per_block {reprlib.repr(raw['convs_per_block'])} is not a whole number "
                             f"in 1-{MAX_CONVS_PER_BLOCK}")
        if crop and raw["architecture"] != "cnn":
            raise ValueError(f"configuration crop {crop} for a {raw['architecture']!r}: only a cnn crops")
        return cls(**{**raw, "hidden": tuple(raw["hidden"]), "channels": tuple(raw["channels"])})
