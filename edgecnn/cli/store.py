"""``edgecnn publish | pull | ls | lock``: the artefact store on the command line (see ``edgecnn.store``)."""
from __future__ import annotations

import os

from ..errors import UsageError
from ..safe_files import dump_json
from ..safe_text import printable

_STORE_HELP = ("a folder (default ./artefact-store, or $EDGECNN_STORE), http(s)://… (read-only) or "
               "s3://bucket[/prefix]")


def _store_args(p, flag: str) -> None:
    p.add_argument(flag, dest="store", default=None, metavar="STORE", help=_STORE_HELP)
    p.add_argument("--s3-endpoint", default=None, metavar="URL",
                   help="S3-compatible endpoint (MinIO, Ceph, R2 …); default $AWS_ENDPOINT_URL_S3 / $AWS_ENDPOINT_URL")


def register(sub) -> dict:
    p = sub.add_parser("publish", help="publish artefact folders to a store (folder, s3://)")
    p.add_argument("dirs", nargs="+", metavar="DIR", help="artefact folder(s) holding manifest.json")
    _store_args(p, "--to")
    p.add_argument("--version", dest="art_version", default=None,
                   help="version to publish as (immutable; default: the next one, or a no-op if unchanged)")
    p.add_argument("--allow-unvalidated", action="store_true", help="also publish a bundle whose status is failed")
    p.add_argument("--json", action="store_true", help="print the index entries as JSON")

    q = sub.add_parser("pull", help="fetch a published artefact, verify every sha256, extract it safely")
    q.add_argument("arch", nargs="?", help="architecture (omit with --lock)")
    q.add_argument("--target", "-t", default="onnx", help="onnx | trt | coreml (default onnx)")
    q.add_argument("--precision", "-p", default=None, help="fp32 | fp16 | int8 … (default: fp32; coreml fp16)")
    q.add_argument("--version", dest="art_version", default=None, help="exact version (default: latest validated)")
    _store_args(q, "--from")
    q.add_argument("--to", "-o", default="artefacts", help="destination root (default ./artefacts); the bundle "
                                                            "lands in <to>/<arch>/<target>-<precision>")
    q.add_argument("--allow-pending", action="store_true",
                   help="take the latest pending bundle when none is validated (TensorRT / Core ML validate on device)")
    q.add_argument("--lock", default=None, metavar="FILE", help="pull exactly what this lock file pins")
    q.add_argument("--write-lock", nargs="?", const="edgecnn.lock", default=None, metavar="FILE",
                   help="pin what was pulled in a lock file (default ./edgecnn.lock)")
    q.add_argument("--quiet", "-q", action="store_true", help="no progress bar")

    ls = sub.add_parser("ls", help="list what a store holds")
    _store_args(ls, "--from")
    ls.add_argument("--arch", default=None, help="only this architecture")
    ls.add_argument("--json", action="store_true")

    k = sub.add_parser("lock", help="manage an edgecnn.lock (pin artefacts for an app project)")
    ksub = k.add_subparsers(dest="lock_command")
    a = ksub.add_parser("add", help="pin an artefact from a store")
    a.add_argument("arch")
    a.add_argument("--target", "-t", default="onnx")
    a.add_argument("--precision", "-p", default=None)
    a.add_argument("--version", dest="art_version", default=None, help="exact version (default: latest validated)")
    a.add_argument("--allow-pending", action="store_true")
    _store_args(a, "--from")
    a.add_argument("--lock", default="edgecnn.lock", metavar="FILE", help="lock file (default ./edgecnn.lock)")
    return {"publish": _cmd_publish, "pull": _cmd_pull, "ls": _cmd_ls, "lock": _cmd_lock}


def _open(args):
    from ..store import open_store

    return open_store(args.store, endpoint_url=args.s3_endpoint)


def _precision(target: str, precision):
    from ..store.index import normalize_target

    return (precision or ("fp16" if normalize_target(target) == "coreml" else "fp32")).strip().lower()


def _cmd_publish(args) -> int:
    from ..store import publish

    store = _open(args)
    results = [publish(d, store, args.art_version, allow_unvalidated=args.allow_unvalidated) for d in args.dirs]
    if args.json:
        print(dump_json([r.entry for r in results], indent=2, sort_keys=True))
    else:
        print("\n".join(r.summary() for r in results))
    return 0


def _cmd_pull(args) -> int:
    from ..store import index as idx, lockfile, pull, pull_entry
    from ..store.backends import open_store

    if args.lock:
        if args.arch or args.art_version or args.write_lock:
            raise UsageError("--lock pulls exactly what the lock file pins",
                             hint="leave out ARCH, --version and --write-lock")
        lock = lockfile.read(args.lock)
        store = open_store(args.store or lockfile.store_of(lock, args.lock), endpoint_url=args.s3_endpoint)
        index = store.read_index()
        for pin in lock["artefacts"]:
            entry = idx.resolve(index, pin["arch"], pin["target"], pin["precision"], pin["version"], where=store.url)
            print(pull_entry(store, entry, to=args.to, expect_sha256=pin["sha256"],
                             expect_manifest_sha256=pin.get("manifest_sha256"), quiet=args.quiet).summary())
        return 0
    if not args.arch:
        raise UsageError("name the architecture to pull, or pass --lock FILE", hint="e.g. edgecnn pull lenet5 --from STORE")
    if args.write_lock:
        lockfile.check_writable(args.write_lock)   # before anything in the destination is replaced
    store = _open(args)
    result = pull(store, args.arch, args.target, _precision(args.target, args.precision), args.art_version,
                  to=args.to, allow_pending=args.allow_pending, quiet=args.quiet)
    print(result.summary())
    if args.write_lock:
        lockfile.add(args.write_lock, result.entry, store=args.store)
        print(f"  pinned   in {printable(args.write_lock)}")
    return 0


def _cmd_ls(args) -> int:
    from ..store import index as idx

    store = _open(args)
    entries = [e for e in store.read_index()["artefacts"] if args.arch in (None, e["arch"])]
    entries.sort(key=lambda e: (idx.key_of(e), idx.version_key(e)))
    if args.json:
        print(dump_json(entries, indent=2, sort_keys=True))
        return 0
    if not entries:
        print(printable(f"{store.url}: no artefacts" + (f" for {args.arch}" if args.arch else "")))
        return 0
    headers = ("arch", "target", "precision", "version", "status", "size", "sha256", "parity", "p50 ms", "created")
    rows = [tuple(printable(c) for c in _ls_row(e)) for e in entries]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    print("  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip())
    print("  ".join("-" * w for w in widths))
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _ls_row(e: dict) -> tuple:
    """One row of ``edgecnn ls``; the optional summary fields are shown only when they are what they claim."""
    p = e.get("parity") or {}
    parity = f"{'PASS' if p.get('passed') is True else 'FAIL'} cos {p['cosine']:.6f}" if _number(p.get("cosine")) else "-"
    lat = (e.get("latency") or {}).get("batch1_p50_ms")
    return (e["arch"], e["target"], e["precision"], e["version"], e["status"], f"{e['bytes'] / 1e6:.2f} MB",
            e["sha256"][:12], parity, f"{lat:.2f}" if _number(lat) else "-", e.get("created", "-"))


def _cmd_lock(args) -> int:
    from ..store import index as idx, lockfile

    if args.lock_command != "add":
        raise UsageError("say what to do with the lock file", hint="edgecnn lock add ARCH --target … --from STORE")
    store = _open(args)
    entry = idx.resolve(store.read_index(), args.arch, args.target, _precision(args.target, args.precision),
                        args.art_version, allow_pending=args.allow_pending, where=store.url)
    lockfile.add(args.lock, entry, store=args.store or os.environ.get("EDGECNN_STORE"))
    print(f"pinned {entry['arch']} {entry['target']} {entry['precision']} version {entry['version']} "
          f"({entry['status']}, sha256 {entry['sha256'][:12]}…) in {printable(args.lock)}")
    return 0
