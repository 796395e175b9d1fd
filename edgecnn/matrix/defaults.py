"""The default matrix (importable without torch, so `edgecnn --help` stays fast)."""
from __future__ import annotations

from ..target_names import TARGET_NAMES

# The project's focus nets; heavy or other nets are opt-in via ARCHS.
DEFAULT_ARCHS = ("squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
                 "mobilenet_v3_large", "efficientnet_b0", "efficientnet_lite0")
DEFAULT_PRECISIONS = ("fp32", "fp16", "int8")
DEFAULT_TARGETS = tuple(TARGET_NAMES)   # every target name, built or not: a missing one shows as ❌ with the reason
