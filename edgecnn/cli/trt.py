"""CLI for the TensorRT path: ``check-qdq``, ``trt {check,build,validate,all}`` and ``merge-results``.

``edgecnn trt ...`` runs the very code shipped in bundles as ``edgecnn_trt.py`` (``exporters/tensorrt/device.py``),
so a machine with edgecnn and TensorRT builds engines exactly as a bare Jetson does.
"""
from __future__ import annotations

import json

from ..errors import GateFailed, InputError, IntegrityError, ToolchainError, UsageError


def register(sub) -> dict:
    q = sub.add_parser("check-qdq", help="check an INT8 Q/DQ ONNX model against TensorRT's rules: errors (refused by "
                                         "its parser) and warnings (slower than it could be)")
    q.add_argument("model", nargs="?", help="a Q/DQ .onnx file (e.g. a trt-int8 bundle's model.int8.qdq.onnx)")
    q.add_argument("--max-opset", type=int, default=17, help="highest opset the target TensorRT parses (default 17)")
    q.add_argument("--rules", action="store_true", help="list the rules and exit")
    q.add_argument("--json", action="store_true")

    t = sub.add_parser("trt", help="TensorRT on this machine: check | build | validate | all <bundle> (same code as "
                                   "the bundle's edgecnn_trt.py)")
    t.add_argument("action", choices=("check", "build", "validate", "all"))
    t.add_argument("bundle", nargs="?", default=None, help="a trt-<precision> bundle folder (not needed for check)")
    t.add_argument("tool_args", nargs="*", help="options passed to edgecnn_trt.py after `--`, e.g. -- --dla 0")

    m = sub.add_parser("merge-results", help="merge a device results JSON (edgecnn_trt.py all) into a bundle's manifest")
    m.add_argument("bundle")
    m.add_argument("results", help="results.<gpu>-trt<version>.json from the device")
    m.add_argument("--int8-max-drop", type=float, default=None, metavar="POINTS",
                   help="INT8 gate: most top-1 accuracy lost, percentage points (default: the bundle's own gate)")
    m.add_argument("--int8-min-agreement", type=float, default=None, metavar="FRACTION",
                   help="opt-in stricter INT8 gate on top-1 agreement (default: the bundle's own gate)")
    m.add_argument("--json", action="store_true")
    return {"check-qdq": _cmd_check_qdq, "trt": _cmd_trt, "merge-results": _cmd_merge}


def _cmd_check_qdq(args) -> int:
    from pathlib import Path

    from exporters.tensorrt import qdq_check

    if args.rules:
        print(qdq_check.rules_text())
        return 0
    if not args.model:
        raise UsageError("check-qdq needs a model file", hint="edgecnn check-qdq model.int8.qdq.onnx")
    path = Path(args.model)
    if not path.is_file():
        raise InputError(f"{path}: no such file", hint="pass a .onnx model")
    try:
        report = qdq_check.check_file(path, max_opset=args.max_opset)
    except Exception as exc:  # onnx raises DecodeError and friends for non-ONNX files
        raise InputError(f"{path} is not a readable ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    print(json.dumps(report.to_dict(), indent=2) if args.json else report.summary())
    if not report.ok:
        raise GateFailed(f"{path}: {len(report.errors)} error(s): TensorRT's ONNX parser would refuse it",
                         hint="see the errors above (rule, node, tensor, and the TensorRT requirement)")
    return 0


def _cmd_trt(args) -> int:
    from exporters.tensorrt import device as trt_device

    argv = []
    if args.bundle:
        argv += ["--bundle", args.bundle]
    elif args.action != "check":
        raise UsageError(f"edgecnn trt {args.action} needs a bundle folder", hint="edgecnn trt build artefacts/<arch>/trt-int8")
    argv += [args.action] + list(args.tool_args)
    if args.action != "check":
        trt, why = trt_device.import_tensorrt()
        if trt is None:
            raise ToolchainError(f"TensorRT is not installed here ({why})",
                                 hint="copy the bundle to the device and run `python3 edgecnn_trt.py all` there")
    ns = trt_device.build_parser().parse_args(argv)
    try:
        code = trt_device.run_command(ns)
    except trt_device.ToolError as exc:
        family = {trt_device.EXIT_USAGE: UsageError, trt_device.EXIT_ENGINE: IntegrityError,
                  trt_device.EXIT_GATE: GateFailed}.get(exc.code, ToolchainError)
        raise family(str(exc), hint=exc.hint) from None
    if ns.command == "check" and code != 0:
        raise ToolchainError("this machine cannot build TensorRT engines (see NOT READY above)",
                             hint="run on a Jetson or a machine with an NVIDIA GPU and TensorRT")
    if code == trt_device.EXIT_GATE:
        raise GateFailed("TensorRT parity gate failed on this device", hint="see the results JSON")
    return code


def _cmd_merge(args) -> int:
    from .. import coreml_results
    from ..device_results import merge_results

    if coreml_results.is_results_file(args.results):   # `edgecnn validate` of a Core ML bundle on a Mac
        return coreml_results.cmd_merge(args)
    gate = None
    if args.int8_max_drop is not None or args.int8_min_agreement is not None:
        from exporters.parity import Gate

        gate = Gate(max_drop=(1.0 if args.int8_max_drop is None else args.int8_max_drop) / 100.0,
                    min_agreement=args.int8_min_agreement)
    manifest = merge_results(args.bundle, args.results, gate=gate)
    if args.json:
        print(json.dumps(manifest, indent=2))
    else:
        p = manifest.get("parity") or {}
        print(f"{args.bundle}: {manifest['status'].upper()} — engine {manifest['tensorrt']['engine_status']}")
        if p:
            print(f"  parity   {p['gate']}: {'PASS' if p['passed'] else 'FAIL'} | {p.get('runtime', '')}")
        lat = manifest.get("latency") or {}
        timed = lat.get("batch1") or lat.get("throughput")
        if timed:
            print(f"  latency  batch {timed['batch']} p50 {timed['p50_ms']:.3f} ms (GPU time, CUDA events)")
    return 0

