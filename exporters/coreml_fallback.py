"""Sensitivity fallback for Core ML W8A8: which blocks to leave in float so INT8 agrees with FP32.

The W8A8 model is ``coremltools.optimize.torch``'s LinearQuantizer, calibrated (``exporters.coreml.
prepare_w8a8``). Re-calibrating once per candidate would cost a calibration pass each (tens of seconds
per pass for EfficientNet-Lite0 on these machines), so the search runs on *one* calibrated model in
PyTorch simulation and switches fake-quantization off per unit instead:

1. units are blocks (a module path cut to ``unit_depth`` components, e.g. ``features.2.0``); a unit's
   fake quantizers are its modules' weight quantizers and the activation quantizers fed by its modules;
2. sensitivity = the probe SQNR gain from switching one unit's quantizers off (continuous; top-1 flips
   on a few dozen images are too coarse to rank);
3. units are added most sensitive first until the probe top-1 agreement (and, for random-init nets whose
   agreement means nothing, the logit SQNR ``min_sqnr_db``) reaches the bar or
   ``max_float_fraction`` of the units are float; the curve (agreement vs float units) is returned.

The chosen unit names go to ``quantize_w8a8(keep_float=...)`` (coremltools ``module_name_configs``
set to None), which re-quantizes for real; the artefact is then judged by the pipeline's own gate on
held-out images. Probe images must come from the calibration split, so that gate stays unseen.
Simulation with a unit's fake quantizers off approximates, but is not identical to, coremltools leaving
that module unquantized (its input may still be quantized for other consumers): the gate decides.
"""
from __future__ import annotations

import time
from typing import Dict, List, Sequence

import numpy as np

from .coreml import prepare_w8a8
from .quant_fallback import compare


def _score(reference: np.ndarray, out: np.ndarray, **extra) -> dict:
    """Top-1 agreement and logit SQNR, as the Q/DQ fallback measures them (finite, JSON-safe)."""
    m = compare(out, reference)
    return {"top1_agreement": m.top1_agreement, "sqnr_db": m.sqnr_db, **extra}


def _unit(name: str, depth: int) -> str:
    return ".".join(name.split(".")[:depth])


def fake_quant_units(prepared, depth: int) -> Dict[str, list]:
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


def w8a8_fallback(module, spec, calib_batches, probe: np.ndarray, reference: np.ndarray, *,
                  min_agreement: float = 0.99, min_sqnr_db: float = -999.0, max_float_fraction: float = 0.5, rank_images: int = 32,
                  unit_depth: int = 3, scheme: str = "affine", max_images: int = 512, rounding: str = "gptq",
                  say=None) -> dict:
    """Search the float units; returns {"keep_float", "curve", "sensitivity", "before", "after", "seconds"}."""
    import torch
    from torch.ao.quantization import disable_observer, enable_fake_quant

    say = say or (lambda msg: None)
    t0 = time.perf_counter()
    _, prepared, seen, _, (_, originals) = prepare_w8a8(module, spec, calib_batches, max_images=max_images,
                                                         scheme=scheme, rounding=rounding)
    prepared.apply(disable_observer)
    prepared.apply(enable_fake_quant)
    units = fake_quant_units(prepared, unit_depth)
    # a unit switched off gets its float weights back (the rounding moved them onto the INT8 grid)
    swaps: Dict[str, list] = {}
    for name, weight in originals.items():
        for path in (name, name + ".conv"):
            try:
                param = prepared.get_submodule(path).weight
            except AttributeError:
                continue
            if tuple(param.shape) == tuple(weight.shape):
                swaps.setdefault(_unit(name, unit_depth), []).append((param, weight, param.detach().clone()))

    def run(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return np.concatenate([prepared(torch.from_numpy(np.ascontiguousarray(x[i:i + 32], np.float32))).numpy()
                                   for i in range(0, len(x), 32)])

    def switch(names: Sequence[str], on: bool) -> None:
        for n in names:
            for fq in units[n]:
                fq.enable_fake_quant() if on else fq.disable_fake_quant()
            with torch.no_grad():
                for param, float_weight, rounded_weight in swaps.get(n, ()):
                    param.copy_(rounded_weight if on else float_weight)

    probe, reference = np.asarray(probe, np.float32), np.asarray(reference, np.float32)
    full = run(probe)
    before = _score(reference, full, float_units=0)
    result = {"units": len(units), "calibration_images": seen, "probe_images": len(probe), "before": before,
              "keep_float": [], "curve": [before], "sensitivity": []}
    def meets(m: dict) -> bool:
        return m["top1_agreement"] >= min_agreement and m["sqnr_db"] >= min_sqnr_db

    if meets(before):
        result.update(after=before, seconds=round(time.perf_counter() - t0, 1))
        return result
    rp, rr = probe[:rank_images], reference[:rank_images]
    base = _score(rr, run(rp))["sqnr_db"]
    gains = []
    for n in units:
        switch([n], False)
        gains.append((_score(rr, run(rp))["sqnr_db"] - base, n))
        switch([n], True)
    gains.sort(reverse=True)
    result["sensitivity"] = [{"unit": n, "sqnr_gain_db": round(g, 3)} for g, n in gains]
    say(f"W8A8 fallback: ranked {len(units)} units by probe SQNR gain ({len(rp)} images)")
    budget = max(1, int(max_float_fraction * len(units)))
    kept: List[str] = []
    after = before
    for g, n in gains[:budget]:
        kept.append(n)
        switch([n], False)
        out = run(probe)
        after = _score(reference, out, float_units=len(kept), added=n)
        result["curve"].append(after)
        say(f"W8A8 fallback: {len(kept)} float units -> probe top-1 {after['top1_agreement']:.1%}, "
            f"SQNR {after['sqnr_db']:.1f} dB")
        if meets(after):
            break
    result.update(keep_float=kept, after=after, seconds=round(time.perf_counter() - t0, 1))
    return result
