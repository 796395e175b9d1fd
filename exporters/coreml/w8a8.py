"""Core ML W8A8 as a recipe of the INT8 engine: coremltools.optimize.torch's LinearQuantizer in PyTorch.

Weights INT8 per output channel, activations 8-bit per tensor (``scheme`` "affine", or "symmetric":
coremltools' own default, zero points 0/128), ranges from min/max observers over the calibration images
(calibration only, no training; not the default moving average, whose first batch would dominate a short
calibration). Measured here in PyTorch simulation on held-out sample photos: pretrained EfficientNet-Lite0
top-1 agreement 81% affine vs 67% symmetric.

The steps the engine asks for: ``prepare`` strips StochasticDepth and folds BatchNorm into the convolutions
(the rounding must see the weights the quantizer rounds); ``round_weights`` moves them onto the per-channel
grid PyTorch's min/max observer derives (``exporters.int8.rounding``); ``calibrate`` runs the observers.
The fallback searches *units* (a module path cut to three components, e.g. ``features.2.0``) on one
calibrated model by switching their fake quantizers off, instead of re-calibrating per candidate (tens of
seconds a pass for Lite0 here). The simulation approximates coremltools leaving a unit unquantized (its input
may still be quantized for other consumers): the pipeline's gate on the converted program decides.
``finalize`` then quantizes for real with the chosen units float (``module_name_configs`` None), calibrated
on the whole calibration split, and the converter turns that module into the W8A8 ML Program.
"""
from __future__ import annotations

import contextlib
import io
import time
import warnings
from typing import Dict, List, Optional, Sequence

import numpy as np

from ..errors import ExportError
from ..int8.engine import Recipe
from ..int8.fallback import Space
from .export import _first_line, import_coremltools, one_thread, strip_for_quantization

SCHEMES = ("symmetric", "affine")
UNIT_DEPTH = 3
MAX_IMAGES = 512        # calibration images the observers see


def _unit(name: str, depth: int = UNIT_DEPTH) -> str:
    return ".".join(name.split(".")[:depth])


def _covers(unit: str, name: str) -> bool:
    """``unit`` is the module ``name`` or one of its parents."""
    return name == unit or name.startswith(unit + ".")


def classifier_tail(model) -> List[str]:
    """The module that produces the logits and the leaf modules registered after it (SqueezeNet: its ReLU and
    average pool), the classifier first. The classifier is the last Conv2d/Linear the model registers (the zoo's
    and torchvision's nets register their head last). The converter reads the program back and refuses a W8A8
    model whose logits are quantized, so a net where this guess is wrong fails loudly."""
    from torch import nn

    leaves = [(name, mod) for name, mod in model.named_modules() if name and not list(mod.children())]
    last = max((i for i, (_, mod) in enumerate(leaves) if isinstance(mod, (nn.Conv2d, nn.Linear))), default=None)
    return [] if last is None else [name for name, _ in leaves[last:]]


# ops between the classifier and the logits that only move, pool or reshape values
_PASS_THROUGH = {"flatten", "reshape", "view", "squeeze", "mean", "adaptive_avg_pool2d", "avg_pool2d", "dropout",
                 "relu", "contiguous"}


def drop_output_quantizers(prepared, tail: Sequence[str]) -> int:
    """Remove the activation quantizers between the classifier and the model's output (SqueezeNet's head
    quantizes after its average pool and after the flatten, whatever the module configs say), so the logits
    stay float; returns how many were removed. Walks back from the output through quantizers and
    pass-through ops, and stops at the first other node."""
    graph, dropped = prepared.graph, 0
    node = next(n for n in graph.nodes if n.op == "output").args[0]
    while hasattr(node, "op") and node.args:
        target = str(node.target)
        name = getattr(node.target, "__name__", target)
        if node.op == "call_module" and target.startswith("activation_post_process"):
            source = node.args[0]
            node.replace_all_uses_with(source)
            graph.erase_node(node)
            dropped, node = dropped + 1, source
        elif (node.op == "call_module" and target in tail[1:]) or (
                node.op in ("call_function", "call_method") and name in _PASS_THROUGH):
            node = node.args[0]
        else:
            break
    if dropped:
        graph.lint()
        prepared.recompile()
    return dropped


class Calibrated:
    """A LinearQuantizer-prepared model whose observers have seen the calibration images (the "ranges")."""

    def __init__(self, quantizer, prepared, images: int, float_units: Sequence[str], output_quantizers_dropped=0):
        self.quantizer, self.prepared, self.images, self.float_units = quantizer, prepared, images, list(float_units)
        self.output_quantizers_dropped = output_quantizers_dropped

    def describe(self) -> dict:
        return {"method": "minmax", "observer": "coremltools LinearQuantizer min_max (per tensor)",
                "images": self.images, "cache_hit": False}


class W8A8Recipe(Recipe):
    name = "coreml-w8a8"
    timed_here = False

    def __init__(self, module, spec, *, scheme: str = "affine", rounding: str = "gptq"):
        if scheme not in SCHEMES:
            raise ExportError(f"unknown W8A8 scheme {scheme!r}", hint=f"use one of {', '.join(SCHEMES)}")
        self.module, self.spec, self.scheme, self.rounding = module, spec, scheme, rounding
        self.model = None
        self.stripped = 0
        self.originals: Dict[str, object] = {}     # module name -> float weight, before rounding
        self.rounded: dict = {"method": "nearest"}
        self.calib = None                          # the whole calibration set, for ``finalize``
        self.tail: List[str] = []                  # classifier (INT8 weights, float output) + what follows it

    # ---------------------------------------------------------------- the engine's steps
    def prepare(self, say) -> dict:
        from ..int8.rounding import fold_batchnorm

        import_coremltools()
        self.model, self.stripped = strip_for_quantization(self.module)
        self.tail = classifier_tail(self.model)
        folded = False
        if self.rounding == "gptq":
            try:
                self.model = fold_batchnorm(self.model)
                folded = True
            except Exception as exc:  # torch.fx tracing raises many types
                raise ExportError(f"BatchNorm folding (torch.fx) failed before W8A8: {_first_line(exc)}",
                                  hint="use --target-option int8.weight_rounding=nearest") from exc
        return {"stochastic_depth_stripped": self.stripped, "batchnorm_folded": folded}

    def candidates(self) -> List[str]:
        from torch import nn

        units = []
        for name, mod in self.model.named_modules():
            if isinstance(mod, (nn.Conv2d, nn.Linear)) and _unit(name) not in units:
                units.append(_unit(name))
        return units

    def round_weights(self, calib, skip, say):
        from ..int8.rounding import round_module_weights

        batches = list(calib.iter_batches("calib", batch_size=16))
        report, self.originals = round_module_weights(self.model, batches, skip=skip, say=say,
                                                      grid="torch_affine" if self.scheme == "affine" else "torch_symmetric")
        self.rounded = {**report.to_dict(), "batchnorm_folded": True}
        return report

    def calibrate(self, calib, method: str, say) -> Calibrated:
        if method != "minmax":
            raise ExportError(f"Core ML W8A8 calibrates with min/max observers; int8.ranges={method!r} is not "
                              "available for it", hint="drop --calib-method / int8.ranges for --target coreml")
        if self.calib is None:
            self.calib = calib            # the first call is the whole calibration split
        return self._calibrate(calib, ())

    def _calibrate(self, calib, float_units: Sequence[str]) -> Calibrated:
        import torch

        from coremltools.optimize.torch.quantization import (LinearQuantizer, LinearQuantizerConfig,
                                                             ModuleLinearQuantizerConfig)

        def module_config(activations):
            # milestones: observers on at step 0, fake-quant never during calibration, BatchNorm frozen at step 0
            return ModuleLinearQuantizerConfig(quantization_scheme=self.scheme, weight_dtype=torch.qint8,
                                               weight_per_channel=True, activation_dtype=activations,
                                               activation_observer="min_max", weight_observer="min_max",
                                               milestones=[0, 10**9, 10**9, 0])

        names = {n: None for n in float_units}
        if self.tail and not any(_covers(unit, self.tail[0]) for unit in float_units):
            names[self.tail[0]] = module_config(torch.float32)   # the classifier: INT8 weights, float output
        config = LinearQuantizerConfig(global_config=module_config(torch.quint8), module_name_configs=names)
        quantizer = LinearQuantizer(self.model, config)
        example = torch.zeros(self.spec.batch_shape(1), dtype=torch.float32)
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            try:
                prepared = quantizer.prepare(example_inputs=(example,), inplace=False)
            except Exception as exc:  # torch.fx tracing raises many types
                raise ExportError(f"coremltools LinearQuantizer could not prepare the model: {_first_line(exc)}",
                                  hint="use --precision int8-weights (weight-only INT8) for this architecture") from exc
            dropped = drop_output_quantizers(prepared, self.tail)
            quantizer.step()
            prepared.eval()
            seen = 0
            with torch.no_grad(), one_thread():   # the observed min/max must not depend on the thread count
                for batch in calib.iter_batches("calib", batch_size=16):
                    if seen >= MAX_IMAGES:
                        break
                    batch = batch[: MAX_IMAGES - seen]
                    prepared(torch.from_numpy(np.ascontiguousarray(batch, dtype=np.float32)))
                    seen += len(batch)
        if seen == 0:
            raise ExportError("W8A8 calibration got no images", hint="pass CALIB=<folder of images>")
        return Calibrated(quantizer, prepared, seen, float_units, dropped)

    def space(self, ranges: Calibrated, base: Dict[str, str], speedup) -> Space:
        return UnitSpace(self, ranges, base)

    def reference(self, inputs: np.ndarray) -> np.ndarray:
        return _forward(self.module, inputs)

    # ---------------------------------------------------------------- the artefact
    def finalize(self, float_units: Sequence[str]):
        """The W8A8 module with ``float_units`` float, calibrated on the whole calibration split; and the
        quantizer's record for the manifest."""
        import torch

        floated = set(float_units)
        restored = [name for name in self.originals if _unit(name) in floated]
        if restored:   # float units compute with their float weights, not the grid values the rounding chose
            saved = {name: self.model.get_submodule(name).weight.detach().clone() for name in restored}
            with torch.no_grad():
                for name in restored:
                    self.model.get_submodule(name).weight.copy_(self.originals[name])
        try:
            calibrated = self._calibrate(self.calib, float_units)
        finally:
            with torch.no_grad():
                for name in restored:
                    self.model.get_submodule(name).weight.copy_(saved[name])
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            final = calibrated.quantizer.finalize(inplace=False).eval()
        info = {"method": "coremltools.optimize.torch LinearQuantizer, calibration only (no training)",
                "scheme": self.scheme, "weights": f"int8 {self.scheme}, per output channel (min/max)",
                "activations": f"8-bit {self.scheme} per tensor (quint8 in PyTorch, int8/uint8 quantize ops in the "
                               "program), ranges: min/max over the calibration images",
                "calibration_images": calibrated.images, "kept_float": list(float_units),
                "logits": (f"float, like the FP16 path: the classifier {self.tail[0]} has INT8 weights and a float "
                           "output; nothing after it is quantized" if self.tail else "float")}
        return final, info


def _forward(model, inputs: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(np.ascontiguousarray(inputs[i:i + 32], np.float32))).numpy()
                               for i in range(0, len(inputs), 32)])


def fake_quant_units(prepared, depth: int = UNIT_DEPTH) -> Dict[str, list]:
    """unit name -> the FakeQuantize modules that belong to it (weights of its modules, activations they feed)."""
    units: Dict[str, list] = {}
    for name, mod in prepared.named_modules():
        fq = getattr(mod, "weight_fake_quant", None)
        if fq is not None:
            units.setdefault(_unit(name, depth), []).append(fq)
    for node in prepared.graph.nodes:
        if node.op != "call_module" or not str(node.target).startswith("activation_post_process"):
            continue
        src = node.args[0] if node.args else None
        owner = None
        if getattr(src, "op", None) == "call_module":
            owner = str(src.target)
        elif src is not None and src.meta.get("nn_module_stack"):
            owner = list(src.meta["nn_module_stack"].values())[-1][0]
        if owner and _unit(owner, depth) in units:
            units[_unit(owner, depth)].append(prepared.get_submodule(str(node.target)))
    return units


class UnitSpace(Space):
    """Units of one calibrated model switched to float by turning their fake quantizers off (and giving
    their weights back the float values the rounding moved). ``write`` only records the choice: the
    artefact is ``W8A8Recipe.finalize``'s module, converted by the Core ML exporter."""

    def __init__(self, recipe: W8A8Recipe, ranges: Calibrated, base: Dict[str, str]):
        from torch.ao.quantization import disable_observer, enable_fake_quant

        self.recipe, self.prepared = recipe, ranges.prepared
        self.prepared.apply(disable_observer)
        self.prepared.apply(enable_fake_quant)
        self.units = fake_quant_units(self.prepared)
        self.candidates = [u for u in recipe.candidates() if u in self.units]
        self.default_float = dict(base)
        self.swaps: Dict[str, list] = {}
        for name, weight in recipe.originals.items():
            for path in (name, name + ".conv"):
                try:
                    param = self.prepared.get_submodule(path).weight
                except AttributeError:
                    continue
                if tuple(param.shape) == tuple(weight.shape):
                    self.swaps.setdefault(_unit(name), []).append((param, weight, param.detach().clone()))
        self._float: set = set()

    def _switch(self, float_units: Sequence[str]) -> None:
        import torch

        want = {u for u in float_units if u in self.units}
        for unit in self._float ^ want:
            on = unit not in want
            for fq in self.units[unit]:
                fq.enable_fake_quant() if on else fq.disable_fake_quant()
            with torch.no_grad():
                for param, float_weight, rounded_weight in self.swaps.get(unit, ()):
                    param.copy_(rounded_weight if on else float_weight)
        self._float = want

    def logits(self, float_layers, inputs):
        self._switch(float_layers)
        return _forward(self.prepared, np.asarray(inputs, np.float32))

    def write(self, float_layers) -> dict:
        return {"float_units": list(float_layers), "units": len(self.units)}
