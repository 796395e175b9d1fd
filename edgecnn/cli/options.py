"""The export options both ``edgecnn export`` and ``edgecnn matrix`` take, defined once: the flags, and the
``ExportOptions`` they build (``--target-option`` applied last, so it wins over the flag it shadows)."""
from __future__ import annotations

import argparse
import os

from exporters.int8.options import RANGE_METHODS

from ..options import MAX_THREADS_PER_CORE, ExportOptions, apply_target_options, help_text, max_threads
from ..safe_text import printable


def count(minimum: int):
    """argparse type: an integer >= ``minimum`` (a negative image count or 0 threads is a usage error)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid integer {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, not {value}")
        return value
    parse.__name__ = f"integer >= {minimum}"
    return parse


def fraction(text: str) -> float:
    """argparse type: a number in [0, 1]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not 0.0 <= value <= 1.0:   # also refuses nan
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, not {text}")
    return value


def points(text: str) -> float:
    """argparse type: percentage points in [0, 100]."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number {text!r}") from None
    if not (0.0 <= value <= 100.0):   # also refuses NaN
        raise argparse.ArgumentTypeError(f"must be percentage points between 0 and 100, not {text}")
    return value


def threads(text: str) -> int:
    """argparse type: a thread count from 1 to ``MAX_THREADS_PER_CORE`` per core of this machine (more only measures
    the scheduler: 4000 threads on 2 cores gave a load average of 505)."""
    value = count(1)(text)
    most = max_threads()
    if value > most:
        raise argparse.ArgumentTypeError(f"must be <= {most} ({MAX_THREADS_PER_CORE} per core on this "
                                         f"{os.cpu_count() or 1}-core machine), not {value}")
    return value


def utf8_path(text: str) -> str:
    """argparse type: a path whose name is UTF-8 (onnxruntime, Core ML and TensorRT open paths as UTF-8; a name with
    other bytes would fail deep inside them as if the model were damaged)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise argparse.ArgumentTypeError(f"{printable(text)} is not a UTF-8 path: the runtimes cannot open it; choose "
                                         f"a name in UTF-8") from None
    return text


def opset(text: str) -> int:
    """argparse type: an ONNX opset the installed onnx knows (7 is the oldest any exporter writes)."""
    value = count(7)(text)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if value > newest:
        raise argparse.ArgumentTypeError(f"opset {value} is newer than this onnx knows ({newest})")
    return value


def add_export_options(p: argparse.ArgumentParser) -> None:
    """The flags that set ``ExportOptions`` fields, with their defaults in the help."""
    d = ExportOptions()
    p.add_argument("--calib-size", type=count(0), default=d.calib_size,
                   help=f"calibration images to use (default {d.calib_size}; 0: all)")
    p.add_argument("--eval-size", type=count(0), default=d.eval_size,
                   help=f"held-out images for parity (default {d.eval_size}; 0: all)")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed for sampling and splitting (default {d.seed})")
    p.add_argument("--opset", type=opset, default=d.opset,
                   help=f"ONNX opset (default {d.opset}: TensorRT 8.5/8.6 parse <= 17)")
    p.add_argument("--onnx-exporter", default=d.onnx_exporter, choices=("auto", "torchscript", "dynamo"),
                   help=f"ONNX exporter (default {d.onnx_exporter}: TorchScript, dynamo where it fails)")
    p.add_argument("--no-simplify", action="store_true", help="skip onnxslim graph simplification")
    p.add_argument("--threads", type=threads, default=d.threads,
                   help=f"threads for latency measurement (default {d.threads})")
    p.add_argument("--no-latency", action="store_true", help="skip latency measurement")
    p.add_argument("--int8-max-drop", type=points, default=d.int8.max_drop, metavar="POINTS",
                   help=f"INT8 gate on trained weights: the most top-1 accuracy INT8 may lose, in percentage points, "
                        f"measured with labels or estimated from FP32's confidence without (default {d.int8.max_drop})")
    p.add_argument("--int8-min-agreement", type=fraction, default=d.int8.min_agreement, metavar="FRACTION",
                   help="opt-in stricter INT8 gate: top-1 agreement with FP32 on held-out images, e.g. 0.99 "
                        "(default: none, agreement is reported as a diagnostic)")
    p.add_argument("--calib-method", default=d.int8.ranges, choices=RANGE_METHODS,
                   help=f"INT8 activation range estimation (default {d.int8.ranges}; cached per model and images)")
    p.add_argument("--no-int8-fallback", action="store_true",
                   help="INT8: skip the per-layer sensitivity analysis and float fallback")
    p.add_argument("--weight-rounding", default=d.int8.weight_rounding, choices=("gptq", "nearest"),
                   help=f"INT8 weights: gptq = rounded with error compensation, nearest = plain (default "
                        f"{d.int8.weight_rounding})")
    p.add_argument("--ios", type=int, default=None, choices=(16, 17, 18),
                   help="coreml: iOS deployment target (default: 16; 17 for int8 W8A8, 18 for int4-weights)")
    p.add_argument("--target-option", action="append", default=[], metavar="SECTION.NAME=VALUE",
                   help="a target option (listed below); repeatable; applied after the flags above, so it wins")


def options_from_args(args) -> ExportOptions:
    d = ExportOptions()
    options = ExportOptions(opset=args.opset, onnx_exporter=args.onnx_exporter, simplify=not args.no_simplify,
                            seed=args.seed, calib_size=args.calib_size, eval_size=args.eval_size,
                            threads=args.threads, latency=not args.no_latency)
    options.int8.min_agreement = args.int8_min_agreement
    options.int8.max_drop = args.int8_max_drop
    options.int8.ranges = args.calib_method
    options.int8.fallback = not args.no_int8_fallback
    options.int8.weight_rounding = args.weight_rounding
    options.coreml.ios = args.ios if args.ios is not None else d.coreml.ios
    return apply_target_options(options, args.target_option).check()


EPILOG = help_text()
