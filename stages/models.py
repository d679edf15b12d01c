"""The models, and the model file that train writes and evaluate (and any later user) reads.

Every model takes raw images, uint8 or float in [0, 255], shape [N, H, W], and returns logits
[N, num_classes]: normalisation is the model's first layer, with the train split's statistics as
buffers, so the model file alone is enough to classify images. (In training, an Ensemble returns
each network's logits, and may take a batch per network: see Ensemble.)
"""

from __future__ import annotations

import reprlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from stages.common import PipelineError, exception_line, load_tensors, save_tensors
from stages.model_config import (ARCHITECTURES, ModelConfig, class_names_problem, digit_framing, feature_side,
                                 framing_problem, is_whole)

# 2: the config gained convs_per_block; 3: it gained pool; 4: its `model` key became `architecture`
# (the fields of ModelConfig); 5: it gained tta_flip and tta_shift; 6: it gained stem; 7: it gained crop;
# 8: the file gained `framing` beside the config (its dataset's, for predict; older files: MNIST's);
# 9: the config gained networks (an ensemble's count; older files hold one network).
FORMAT_VERSION = 9


# What a config of an older format means in the next one: each function takes the stored dict of
# format N to format N + 1, so files of every format listed still load as the network they described.
_UPGRADES = {
    2: lambda config: {**config, "pool": "end"},
    3: lambda config: {"architecture": config["model"], **{k: v for k, v in config.items() if k != "model"}},
    4: lambda config: {**config, "tta_flip": False, "tta_shift": 0},
    5: lambda config: {**config, "stem": "pool"},
    6: lambda config: {**config, "crop": 0},
    7: lambda config: config,  # the config is unchanged; `framing` is new beside it (load_model)
    8: lambda config: {**config, "networks": 1},
}


class ModelFileError(PipelineError):
    """A model file that is damaged or does not match the code that loads it."""


class Normalize(nn.Module):
    """[N, H, W] pixels in [0, 255] -> [N, 1, H, W] floats with the train split's mean 0 and std 1."""

    def __init__(self, mean: float, std: float):
        super().__init__()
        # Buffers, not constants: they travel in the state dict and follow .to(device).
        self.register_buffer("mean", torch.tensor(mean * 255.0))
        self.register_buffer("std", torch.tensor(std * 255.0))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return ((images.float() - self.mean) / self.std).unsqueeze(1)


def _conv_block(c_in: int, c_out: int, convs: int, pool: str, stride: bool = False) -> list[nn.Module]:
    # `convs` 3x3 convs, each keeping H and W and followed by BatchNorm (which makes a high
    # one-cycle learning rate stable, and the conv bias redundant) and ReLU, and one 2x2 max-pool
    # that halves H and W. Two stacked 3x3 convs see 5x5 pixels with fewer weights than one 5x5.
    # pool "end" pools after the last ReLU; "early" pools the first conv's output, as
    # KellerJordan's airbench does: max-pooling commutes with ReLU, and with BatchNorm's per-channel
    # affine map wherever its scale is positive, so the network is nearly the same while
    # BatchNorm and ReLU, memory-bound on a CPU, touch a quarter of the pixels.
    # stride: the first conv halves H and W itself (evaluated at every other pixel; padding 1 keeps
    # 28 -> 14) and the block has no max-pool: a quarter of that conv's work, and no full-resolution
    # activations at all (ModelConfig.stem).
    layers: list[nn.Module] = []
    for i in range(convs):
        first = i == 0
        layers.append(nn.Conv2d(c_in if first else c_out, c_out, 3, stride=2 if first and stride else 1,
                                padding=1, bias=False))
        if first and pool == "early" and not stride:
            layers.append(nn.MaxPool2d(2))
        layers += [nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
    if pool == "end" and not stride:
        layers.append(nn.MaxPool2d(2))
    return layers


def shifted(images: torch.Tensor, dx: int, dy: int) -> torch.Tensor:
    """[..., H, W] images moved dx pixels right and dy down (negative: left, up), background (0)
    shifted in."""
    h, w = images.shape[-2:]
    pad = max(abs(dx), abs(dy))
    padded = nn.functional.pad(images, (pad, pad, pad, pad))
    return padded[..., pad - dy:pad - dy + h, pad - dx:pad - dx + w]


class Network(nn.Sequential):
    """The layers in order, on the image's central square when `crop` > 0 (ModelConfig.crop); in
    eval mode with test-time augmentation, the mean of their logits over the image's views
    (ModelConfig.tta_flip, tta_shift). Training always sees the plain images. A Sequential, so the
    weights keep their names whatever the augmentation or crop."""

    def __init__(self, *layers: nn.Module, tta_flip: bool = False, tta_shift: int = 0, crop: int = 0):
        super().__init__(*layers)
        self.tta_flip, self.tta_shift, self.crop = tta_flip, tta_shift, crop

    def layers(self, images: torch.Tensor) -> torch.Tensor:
        """[N, H, W] images -> [N, C] logits of the layers, on the central square when cropping."""
        c = self.crop
        return super().forward(images[..., c:-c, c:-c] if c else images)

    def views(self, images: torch.Tensor) -> list[torch.Tensor]:
        """[N, H, W] images -> the views whose logits are averaged, the images themselves first."""
        views = [images]
        if self.tta_flip:
            views.append(images.flip(-1))
        s = self.tta_shift
        if s:
            views += [shifted(images, dx, dy) for dx, dy in ((s, 0), (-s, 0), (0, s), (0, -s))]
        return views

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.training or not (self.tta_flip or self.tta_shift):
            return self.layers(images)
        # Shifted views are formed on the whole image, so a shift brings border pixels into the crop.
        return torch.stack([self.layers(view) for view in self.views(images)]).mean(0)  # [views, N, C] -> [N, C]


class Ensemble(nn.Module):
    """Networks of one config side by side (ModelConfig.networks). In training mode the logits of
    each, [networks, N, C], so that each is trained on its own loss (stages.train.make_loss), from
    the same images [N, H, W] or from a batch each, [networks, N, H, W] (train.network_batches own);
    in eval mode the mean of their logits on the same images, [N, C]. Averaging networks cancels part
    of each one's errors: separate runs of the default CNN scored val 99.60 % alone, 99.66 % averaged
    over 4-5 (2026-11-28); four trained here side by side, sharing batches and views, scored no better
    than cnn-max at its time (benchmarks/README.md, rule 16)."""

    def __init__(self, networks: list[nn.Module]):
        super().__init__()
        self.networks = nn.ModuleList(networks)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:  # a batch per network: training only (eval averages over the same images)
            if not self.training or len(images) != len(self.networks):
                raise ValueError(f"a batch per network needs training mode and {len(self.networks)} batches, "
                                 f"got {'eval mode' if not self.training else len(images)}")
            logits = torch.stack([network(each) for network, each in zip(self.networks, images)])
        else:
            logits = torch.stack([network(images) for network in self.networks])  # [networks, N, C]
        return logits if self.training else logits.mean(0)


def build_model(config: ModelConfig) -> nn.Module:
    """A fresh model of `config`, a Network or an Ensemble of them; weights from the global torch
    RNG, drawn network by network (an ensemble's first network is the single network of that seed)."""
    if config.networks > 1:
        return Ensemble([build_network(config) for _ in range(config.networks)])
    return build_network(config)


def build_network(config: ModelConfig) -> Network:
    """One fresh network of `config` (its `networks` aside)."""
    size, classes = config.image_size, config.num_classes
    layers: list[nn.Module] = [Normalize(config.mean, config.std)]
    if config.architecture == "softmax":
        layers += [nn.Flatten(), nn.Linear(size * size, classes)]
    elif config.architecture == "mlp":
        widths = [size * size, *config.hidden]
        layers.append(nn.Flatten())
        for w_in, w_out in zip(widths, widths[1:]):
            layers += [nn.Linear(w_in, w_out), nn.ReLU(inplace=True)]
            if config.dropout > 0:
                layers.append(nn.Dropout(config.dropout))
        layers.append(nn.Linear(widths[-1], classes))
    elif config.architecture == "cnn":
        c1, c2, c3 = config.channels
        convs, pool, stride = config.convs_per_block, config.pool, config.stem == "stride"
        side = feature_side(size, config.crop, config.stem)  # of the last block's output
        layers += [*_conv_block(1, c1, convs, pool, stride), *_conv_block(c1, c2, convs, pool),
                   *_conv_block(c2, c3, convs, pool),
                   nn.Flatten(), nn.Linear(c3 * side * side, classes)]
    else:
        raise ModelFileError(f"unknown architecture {config.architecture!r}; known: {', '.join(ARCHITECTURES)}")
    return Network(*layers, tta_flip=config.tta_flip, tta_shift=config.tta_shift, crop=config.crop)


def network_count(model: nn.Module) -> int:
    """How many networks `model` averages: an Ensemble's count, else 1."""
    return len(model.networks) if isinstance(model, Ensemble) else 1


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def predict_logits(model: nn.Module, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """Logits [N, C] in float32 for images [N, H, W], batch by batch, on the model's device."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = [model(images[i:i + batch_size].to(device)).float() for i in range(0, len(images), batch_size)]
    model.train(was_training)
    return torch.cat(out)


def save_model(path: Path, model: nn.Module, config: ModelConfig, classes: list[str],
               framing: dict | None = None) -> None:
    """`framing`: how its dataset's images were made from pictures (datasets.yaml), for predict;
    None: MNIST's (stages.model_config.digit_framing). A framing load_model would refuse is refused."""
    framing = _checked_framing(path, digit_framing(config.image_size) if framing is None else framing,
                               config.image_size)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # The config as plain values: the file loads with weights_only, which refuses project classes.
    save_tensors(path, {"format_version": FORMAT_VERSION, "config": config.to_dict(), "classes": list(classes),
                        "framing": framing, "state_dict": state})


def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, file contents without the weights). Raises ModelFileError with the reason.

    The contents' "config" is the stored dict, upgraded to the current format;
    ModelConfig.from_dict(meta["config"]) is the config the model was built from."""
    try:
        payload = load_tensors(path, required=("format_version", "config", "classes", "state_dict"))
    except PipelineError as exc:
        raise ModelFileError(str(exc)) from None
    version = payload["format_version"]
    if not is_whole(version):
        raise ModelFileError(f"{path}: format_version must be an integer, found {type(version).__name__}")
    if version != FORMAT_VERSION and version not in _UPGRADES:
        readable = ", ".join(str(v) for v in sorted([*_UPGRADES, FORMAT_VERSION]))
        raise ModelFileError(f"{path}: model file format {version}, this code reads {readable}; "
                             "re-run `dvc repro` to retrain")
    config = payload["config"]
    try:
        for older in range(version, FORMAT_VERSION):
            config = _UPGRADES[older](config)
        # Built on the meta device (shapes, no memory), then given the file's tensors once their
        # names and shapes match: a config of absurd widths in a small file (a crafted one: a
        # 1.7 KB file asked for 4.2 GB and 9.5 s) is refused without allocating its layers.
        with torch.device("meta"):
            model = build_model(ModelConfig.from_dict(config))
        expected = {name: tensor.dtype for name, tensor in model.state_dict().items()}
        model.load_state_dict(_dense_weights(payload["state_dict"]), strict=True, assign=True)
        for name, tensor in model.state_dict().items():
            if tensor.dtype != expected[name]:
                raise TypeError(f"{name} is {tensor.dtype}, not {expected[name]}")
    except ModelFileError as exc:
        raise ModelFileError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as exc:
        raise ModelFileError(f"{path}: weights do not fit the stored configuration "
                             f"{_describe(config)} ({exception_line(exc)})") from None
    # Weights that are NaN or infinite (a diverged run, a damaged copy saved with a valid checksum)
    # would give NaN probabilities and a class picked at random, without an error.
    broken = [name for name, tensor in model.state_dict().items()
              if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]
    if broken:
        raise ModelFileError(f"{path}: weights {', '.join(broken[:3])}{' ...' if len(broken) > 3 else ''} "
                             "hold NaN or infinite values (a diverged run?); retrain: `dvc repro --force train`")
    classes = payload["classes"]
    if problem := class_names_problem(classes, as_keys=False):
        raise ModelFileError(f"{path}: class names: {problem}")
    if len(classes) != config.get("num_classes"):
        raise ModelFileError(f"{path}: {len(classes)} class names do not match the model's "
                             f"{config.get('num_classes')} outputs")
    framing = _checked_framing(path, payload.get("framing") if version >= 8 else digit_framing(config["image_size"]),
                               config["image_size"])
    # The metadata describes the model as loaded: an older file's config comes back upgraded.
    meta = {**{k: v for k, v in payload.items() if k != "state_dict"}, "config": config, "framing": framing}
    return model.to(device).eval(), meta


def _dense_weights(state: Any) -> dict[str, torch.Tensor]:
    """The file's tensors, each checked to hold its own elements and copied to the standard layout.
    A tensor's shape alone says nothing of its storage: a weight saved as a stride-0 view of one
    number (torch.zeros(()).expand(2_000_000, 784)) made a 2.7 KB file that took 11 GB once touched,
    and a sparse one fails in the kernels; so memory stays bounded by the file's size. Contiguous,
    as build_model's own weights are: CPU training leaves conv weights channels-last, and evaluate
    and predict compute as they always have."""
    if not isinstance(state, dict):
        raise TypeError(f"the weights are a {type(state).__name__}, not a mapping of names to tensors")
    for name, tensor in state.items():
        if not (isinstance(tensor, torch.Tensor) and tensor.layout == torch.strided
                and tensor.untyped_storage().nbytes() >= tensor.numel() * tensor.element_size()):
            raise TypeError(f"{name} is not a dense tensor holding its own elements")
    # clone, not contiguous(): a [16, 1, 3, 3] weight saved channels-last counts as contiguous, and
    # its strides would steer the convolution to another kernel (other rounding)
    return {name: tensor.clone(memory_format=torch.contiguous_format) for name, tensor in state.items()}


def _checked_framing(path: Path, framing: Any, image_size: int) -> dict:
    """A copy of `framing` (stages.model_config), or ModelFileError naming the file: the one check
    of what save_model writes and load_model reads."""
    problem = framing_problem(framing, image_size)
    if problem:
        raise ModelFileError(f"{path}: framing: {problem}")
    return dict(framing)


def _describe(config: Any) -> str:
    if not isinstance(config, dict):
        return repr(type(config).__name__)
    # reprlib: a crafted file's lists may nest into billions of shared items
    shown = {k: v if isinstance(v, str) else reprlib.repr(v) for k, v in config.items()
             if k in ("architecture", "hidden", "channels")}
    return "(" + ", ".join(f"{k}={v}" for k, v in shown.items()) + ")"
