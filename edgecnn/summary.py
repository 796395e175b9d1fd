"""The few lines ``edgecnn export`` prints about a finished bundle, read from its manifest."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from exporters import parity as parity_mod


def _int8_line(recipe: dict) -> str:
    """One line on the INT8 recipe: what stayed float, the probe before and after the float-layer search (by the
    figure the search aims at), what runs in INT8."""
    fb = recipe.get("fallback") or {}
    before, after = fb.get("before") or {}, fb.get("after") or {}
    probe = "probe not run"
    if "estimated_drop" in before and "estimated_drop" in after:   # what the search aims at on trained weights
        probe = (f"probe estimated drop {100 * before['estimated_drop']:.2f} -> {100 * after['estimated_drop']:.2f} pt "
                 f"(agreement {before.get('top1_agreement', 0):.1%} -> {after.get('top1_agreement', 0):.1%})")
    elif "sqnr_db" in before and "sqnr_db" in after:                # random init: the SQNR structure check
        probe = f"probe SQNR {before['sqnr_db']:.1f} -> {after['sqnr_db']:.1f} dB"
    report = recipe.get("report") or {}
    if "fused" in report:
        ops = f"{report['fused']} fused INT8 kernels, {report['float']} float ops"
    elif "quantized_layers" in report:
        ops = f"{report['quantized_layers']} INT8 Conv/Gemm"
    else:
        ops = "W8A8 simulated in PyTorch"
    ranges = (recipe.get("ranges") or {}).get("method", "?")
    return (f"  int8     {recipe.get('recipe')} recipe, {ranges} ranges, {len(fb.get('layers_float') or {})} layer(s) "
            f"float; {probe}; {ops}")


def _parity(d: dict) -> parity_mod.Parity:
    names = {f.name for f in dataclasses.fields(parity_mod.Parity)}
    return parity_mod.Parity(**{k: v for k, v in d.items() if k in names})


def summary_text(m: dict, status: str, path: Path, seconds: float) -> str:
    lines = [f"{m['arch']} -> {m['target']} {m['precision']}: {status.upper()}  ({seconds:.1f} s)",
             f"  folder   {path}"]
    model = m.get("model_file")
    files = m.get("files", {})
    if model and model in files:
        size = f"  model    {model}  ({files[model]['bytes'] / 1e6:.2f} MB"
        if (m.get("int8") or {}).get("fp32_bytes"):
            size += f", {files[model]['bytes'] / m['int8']['fp32_bytes']:.0%} of FP32"
        lines.append(size + ")")
    if (m.get("recipe") or {}).get("fallback") is not None:
        lines.append(_int8_line(m["recipe"]))
    w = m.get("weights", {})
    lines.append(f"  weights  {w.get('source')}" + ("" if w.get("pretrained") else "  (RANDOM INIT: accuracy not meaningful)"))
    p = m.get("parity")
    if p:
        lines.append(f"  parity   {p['gate']}: {'PASS' if p['passed'] else 'FAIL'} | max rel err {p['max_rel_error']:.2e}, "
                     f"cosine {p['cosine']:.6f}, SQNR {p['sqnr_db']:.1f} dB, top-1 agree {p['top1_agreement']:.1%} "
                     f"on {p['samples']} held-out images")
        if "drop" in (p.get("criterion") or ""):   # the INT8 gate: the accuracy figure that judged
            lines.append(f"  judged   {p['criterion']}: {parity_mod.drop_text(_parity(p))}")
        elif p.get("ref_accuracy") is not None:
            lines.append(f"  accuracy torch FP32 {p['ref_accuracy']:.1%}, artefact {p['accuracy']:.1%} "
                         f"(labelled held-out images)")
        if p.get("reason"):
            lines.append(f"  reason   {p['reason']}")
    lat = m.get("latency")
    if lat and "batch1" in lat:
        b1, tp = lat["batch1"], lat["throughput"]
        lines.append(f"  latency  batch 1 p50 {b1['p50_ms']:.2f} ms, p90 {b1['p90_ms']:.2f} ms; batch {tp['batch']} "
                     f"{tp['throughput_ips']:.0f} img/s ({lat['runtime'].get('runtime')}, "
                     f"{lat['runtime'].get('threads', '?')} thread(s))")
        if lat.get("speedup_vs_fp32"):
            lines.append(f"  speed-up vs FP32 (batch 1, same run): {lat['speedup_vs_fp32']:.2f}x")
    elif lat and lat.get("not_measured"):
        lines.append(f"  latency  {lat['not_measured']}")
    if p and p.get("runtime"):
        lines.append(f"  runtime  parity measured with {p['runtime']}")
    if m.get("target") == "coreml":   # package names, executor modes, Neural Engine report
        from .targets.coreml import summary_lines
        lines += summary_lines(m)
    for check in m.get("local_checks") or []:  # checks run here for a bundle validated elsewhere
        lines.append(f"  check    {check['name']}: {'PASS' if check['passed'] else 'FAIL'} | {check['detail']}")
    if m.get("pending") and not (lat and "batch1" in lat):
        lines.append(f"  pending  {m['pending']}")
    return "\n".join(lines)
