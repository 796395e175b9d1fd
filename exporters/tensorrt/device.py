#!/usr/bin/env python3
"""edgecnn_trt.py: build, validate and benchmark an edgecnn TensorRT bundle on the device.

Shipped inside every ``trt-<precision>`` bundle. Needs only Python >= 3.8, NumPy and TensorRT's Python
bindings (JetPack installs them); no torch, no edgecnn, no polygraphy, no pycuda (CUDA through ctypes).

    python3 edgecnn_trt.py check                  # JetPack / L4T, TensorRT, Python, NumPy, GPU, DLA, power mode
    python3 edgecnn_trt.py build [--dla 0] [--workspace-mb 1024] [--max-batch 8] [--timing-cache FILE]
    python3 edgecnn_trt.py validate [--engine FILE]  # parity vs reference.npz + latency + GPU memory
    python3 edgecnn_trt.py all                    # check + build + validate + benchmark -> results JSON

Engines are tied to the GPU, the TensorRT version and the platform, so they are built here, on the device,
named ``model.<gpu>-trt<version>.engine`` with a ``.json`` sidecar describing them (metadata sits beside the
engine, never glued in front of it: trtexec and DeepStream load the file as is). An engine built for another
GPU or TensorRT version is refused with a message that says how to rebuild.

TensorRT API by version: <= 10 builds with builder flags (FP16; INT8 from the explicit Q/DQ model, or
implicit INT8 from ``calibration.cache`` for DLA); 11 removed implicit INT8 and precision flags, so it
builds strongly typed networks from the typed ONNX files (Q/DQ for INT8, ``model.fp16.onnx`` for FP16).
Inference uses the name-based API (num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3).

Exit codes: 0 ok, 1 parity gate failed, 2 usage, 3 environment (no TensorRT/GPU), 4 engine incompatible.
"""
from __future__ import print_function

import argparse
import ctypes
import ctypes.util
import datetime
import hashlib
import json
import os
import platform
import re
import shlex
import subprocess
import sys
import time

TOOL_NAME = "edgecnn_trt.py"
TOOL_VERSION = "1"
RESULTS_SCHEMA = "edgecnn-trt-results/1"

PARITY_MODULE = "edgecnn_parity.py"   # exporters/parity.py, shipped beside this tool in every bundle

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_ENV, EXIT_ENGINE = 0, 1, 2, 3, 4

# L4T (Jetson Linux) release -> JetPack, for the releases this bundle targets.
L4T_TO_JETPACK = [
    ((35, 1), "5.0.2"), ((35, 2), "5.1"), ((35, 3), "5.1.1"), ((35, 4), "5.1.2"), ((35, 5), "5.1.3"),
    ((35, 6), "5.1.4"), ((36, 2), "6.0 DP"), ((36, 3), "6.0"), ((36, 4), "6.1/6.2"), ((38, 0), "7.0"),
]
# JetPack -> the TensorRT and Python it ships; printed by `check` as guidance.
JETPACK_MATRIX = {"5.1": ("8.5.2", "3.8"), "6.0": ("8.6.2", "3.10"), "6.1": ("10.3", "3.10"),
                  "6.2": ("10.3", "3.10"), "7.0": ("10.13+ / 11", "3.12")}


class ToolError(Exception):
    def __init__(self, message, code=EXIT_ENV, hint=""):
        Exception.__init__(self, message)
        self.code = code
        self.hint = hint


def _parity():
    """The parity module: ``exporters.parity`` inside the edgecnn package, else the copy shipped beside this
    file (``edgecnn_parity.py``). Imported on first use, so ``check`` works without NumPy."""
    try:
        from .. import parity  # exporters.tensorrt.device, inside the edgecnn package
    except ImportError:        # edgecnn_trt.py, standalone in a bundle
        sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
        import edgecnn_parity as parity
    return parity


# ------------------------------------------------------------------------------------------ versions
def parse_version(text):
    """'8.5.2.2' -> (8, 5, 2, 2); '10.3.0' -> (10, 3, 0). Non-numeric tails are ignored."""
    out = []
    for part in str(text).strip().split("."):
        m = re.match(r"^(\d+)", part)
        if not m:
            break
        out.append(int(m.group(1)))
    if not out:
        raise ValueError("not a version: %r" % (text,))
    return tuple(out)


def version_str(v, parts=3):
    return ".".join(str(x) for x in tuple(v)[:parts])


def cache_header_version(v):
    """TensorRT's integer version as written in calibration-cache headers (8.6.1 -> 8601, 10.3.0 -> 100300)."""
    v = tuple(v) + (0, 0, 0)
    return v[0] * 10000 + v[1] * 100 + v[2] if v[0] >= 10 else v[0] * 1000 + v[1] * 100 + v[2]


def build_plan(trt_version, precision, files, dla_core=None, int8_mode="auto", fp16_fallback=True):
    """Which ONNX file, network flags and builder flags to use for this TensorRT version.

    ``files``: names present in the bundle. Pure function (no TensorRT needed), so it is tested anywhere.
    Returns a dict: onnx, strongly_typed, explicit_batch_flag, flags (builder flags to set), clear_flags,
    calibration_cache (or None), int8_mode, notes.
    """
    major = tuple(trt_version)[0]
    files = set(files)
    notes = []
    plan = {"onnx": "model.onnx", "strongly_typed": False, "explicit_batch_flag": major < 10, "flags": [],
            "clear_flags": [], "calibration_cache": None, "int8_mode": None, "notes": notes,
            "dla_core": dla_core, "gpu_fallback": dla_core is not None}
    if precision not in ("fp32", "fp16", "int8"):
        raise ToolError("unknown precision %r" % precision, EXIT_USAGE)
    if dla_core is not None and precision == "fp32":
        raise ToolError("DLA runs FP16 or INT8 only; this bundle is FP32", EXIT_USAGE,
                        "export with PRECISION=fp16 or int8 for DLA, or drop --dla")
    if precision == "fp32":
        if major >= 11:
            plan["strongly_typed"] = True
        else:
            plan["clear_flags"].append("TF32")  # FP32 means FP32: TF32 would blur the 1e-4 parity gate
    elif precision == "fp16":
        if major >= 11:
            if "model.fp16.onnx" not in files:
                raise ToolError("TensorRT %s builds strongly typed networks and this bundle has no model.fp16.onnx"
                                % version_str(trt_version), EXIT_USAGE, "re-export the bundle with a newer edgecnn")
            plan.update(onnx="model.fp16.onnx", strongly_typed=True)
        else:
            plan["flags"].append("FP16")
    else:
        mode = int8_mode
        if mode == "auto":
            mode = "implicit" if (dla_core is not None and major <= 10) else "explicit"
        if mode == "implicit":
            if major >= 11:
                raise ToolError("TensorRT %s removed implicit INT8 calibration" % version_str(trt_version), EXIT_USAGE,
                                "use --int8-mode explicit (the Q/DQ model)")
            if "calibration.cache" not in files:
                raise ToolError("implicit INT8 needs calibration.cache, which this bundle lacks", EXIT_USAGE)
            plan.update(onnx="model.onnx", calibration_cache="calibration.cache")
            plan["flags"] += ["INT8"] + (["FP16"] if fp16_fallback else [])
            if major == 10:
                notes.append("implicit INT8 is deprecated since TensorRT 10.1 (kept for DLA)")
        else:
            if "model.int8.qdq.onnx" not in files:
                raise ToolError("this bundle has no model.int8.qdq.onnx", EXIT_USAGE)
            plan["onnx"] = "model.int8.qdq.onnx"
            if major >= 11:
                plan["strongly_typed"] = True
                notes.append("strongly typed: layers without Q/DQ run in FP32")
            else:
                plan["flags"] += ["INT8"] + (["FP16"] if fp16_fallback else [])
        plan["int8_mode"] = mode
    if dla_core is not None:
        plan["flags"].append("GPU_FALLBACK")
    return plan


def engine_name(gpu_tag, trt_version):
    return "model.%s-trt%s.engine" % (gpu_tag, version_str(trt_version))


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "gpu"


def trtexec_command(plan, engine, input_name, shape, min_batch=1, opt_batch=1, max_batch=8, workspace_mb=1024,
                    timing_cache="timing.cache", dynamic=True):
    """The trtexec command line equivalent to ``build`` with ``plan`` (for users who prefer trtexec)."""
    c, h, w = shape
    args = ["trtexec", "--onnx=" + plan["onnx"], "--saveEngine=" + engine]
    if dynamic:
        for flag, b in (("--minShapes", min_batch), ("--optShapes", opt_batch), ("--maxShapes", max_batch)):
            args.append("%s=%s:%dx%dx%dx%d" % (flag, input_name, b, c, h, w))
    if plan["strongly_typed"]:
        args.append("--stronglyTyped")
    for f in plan["flags"]:
        if f in ("FP16", "INT8"):
            args.append("--" + f.lower())
    if "TF32" in plan["clear_flags"]:
        args.append("--noTF32")
    if plan["calibration_cache"]:
        args.append("--calib=" + plan["calibration_cache"])
    if plan["dla_core"] is not None:
        args.append("--useDLACore=%d" % plan["dla_core"])
        args.append("--allowGPUFallback")
    args.append("--memPoolSize=workspace:%d" % workspace_mb)
    if timing_cache:
        args.append("--timingCacheFile=" + timing_cache)
    return " ".join(shlex.quote(a) for a in args)


# ------------------------------------------------------------------------------------------ device facts
def _read(path):
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8", "replace").replace("\x00", "").strip()
    except (IOError, OSError):
        return None


def _run(cmd, timeout=10):
    try:
        out = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=timeout)
        return out.stdout.decode("utf-8", "replace").strip() if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def parse_l4t(text):
    """'# R35 (release), REVISION: 3.1, GCID: ...' -> (35, 3, 1)."""
    m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text or "")
    if not m:
        return None
    return (int(m.group(1)),) + parse_version(m.group(2))


def jetpack_for_l4t(l4t):
    if not l4t:
        return None
    best = None
    for key, jp in L4T_TO_JETPACK:
        if tuple(l4t[:2]) >= key and key[0] == l4t[0]:
            best = jp
    return best


def detect_jetson():
    info = {"is_jetson": False}
    release = _read("/etc/nv_tegra_release")
    model = _read("/proc/device-tree/model")
    if release or (model and "jetson" in model.lower()):
        info["is_jetson"] = True
        info["model"] = model
        l4t = parse_l4t(release)
        if l4t:
            info["l4t"] = version_str(l4t)
            info["jetpack"] = jetpack_for_l4t(l4t)
        pkg = _run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"])
        if pkg:
            info["jetpack_package"] = pkg
    return info


def _gpu_devfreq_dirs():
    """devfreq folders of a Jetson's integrated GPU (gp10b/gv11b/ga10b/gb10b), where the kernel exposes them."""
    out = []
    for base in ("/sys/devices/gpu.0/devfreq", "/sys/class/devfreq"):
        try:
            names = sorted(os.listdir(base))
        except OSError:
            continue
        for name in names:
            if base.startswith("/sys/devices/gpu.0") or re.search(r"gpu|g[pvab]\d+b", name):
                out.append(os.path.join(base, name))
    return out


def detect_power():
    """Jetson power mode and clocks, where readable without root (recorded with latency numbers)."""
    out = {}
    q = _run(["nvpmodel", "-q"])
    if q:
        m = re.search(r"Power Mode:\s*(\S+)", q)
        out["nvpmodel"] = m.group(1) if m else q.splitlines()[0]
    for folder in _gpu_devfreq_dirs():
        cur = _read(os.path.join(folder, "cur_freq"))
        if cur:
            out["gpu_clock_hz"] = int(cur) if cur.isdigit() else cur
            mx = _read(os.path.join(folder, "max_freq"))
            if mx:
                out["gpu_max_clock_hz"] = int(mx) if mx.isdigit() else mx
            out["gpu_clock_source"] = folder
            break
    emc = _read("/sys/kernel/debug/bpmp/debug/clk/emc/rate")
    if emc:
        out["emc_clock_hz"] = emc
    return out


def import_tensorrt():
    """(module, None) or (None, reason)."""
    try:
        import tensorrt as trt  # noqa: F401
        return trt, None
    except Exception as exc:  # ImportError, or a broken install raising OSError
        return None, "%s: %s" % (type(exc).__name__, exc)


def detect(trt=None, cuda=None):
    """Everything `check` reports, as a dict; never raises."""
    info = {"python": platform.python_version(), "platform": platform.platform(), "machine": platform.machine()}
    try:
        import numpy
        info["numpy"] = numpy.__version__
    except ImportError as exc:
        info["numpy"] = None
        info["numpy_error"] = str(exc)
    info["jetson"] = detect_jetson()
    if trt is None:
        trt, why = import_tensorrt()
        if why:
            info["tensorrt"] = None
            info["tensorrt_error"] = why
    if trt is not None:
        info["tensorrt"] = trt.__version__
    if cuda is None:
        try:
            cuda = Cuda()
        except ToolError as exc:
            info["cuda_error"] = str(exc)
    if cuda is not None:
        try:
            info["gpu"] = cuda.device_info()
        except ToolError as exc:
            info["cuda_error"] = str(exc)
    if trt is not None and info.get("gpu"):
        try:
            logger = trt.Logger(trt.Logger.ERROR)
            builder = trt.Builder(logger)
            info["dla_cores"] = int(builder.num_DLA_cores)
            info["fast_fp16"] = bool(builder.platform_has_fast_fp16)
            info["fast_int8"] = bool(builder.platform_has_fast_int8)
        except Exception as exc:
            info["builder_error"] = str(exc)
    info["power"] = detect_power()
    return info


def gpu_tag(info):
    gpu = info.get("gpu") or {}
    return "%s-sm%s" % (slug(gpu.get("name", "gpu")), gpu.get("compute_capability", "").replace(".", ""))


# ------------------------------------------------------------------------------------------ CUDA via ctypes
class Cuda(object):
    """The few libcudart calls we need (malloc/copy/stream/event/memory info), through ctypes."""

    H2D, D2H = 1, 2

    def __init__(self):
        self.lib = self._load()
        L = self.lib
        vp, sz = ctypes.c_void_p, ctypes.c_size_t
        for name, args in (("cudaMalloc", [ctypes.POINTER(vp), sz]), ("cudaFree", [vp]),
                           ("cudaMemcpy", [vp, vp, sz, ctypes.c_int]),
                           ("cudaMemcpyAsync", [vp, vp, sz, ctypes.c_int, vp]),
                           ("cudaStreamCreate", [ctypes.POINTER(vp)]), ("cudaStreamSynchronize", [vp]),
                           ("cudaStreamDestroy", [vp]), ("cudaEventCreate", [ctypes.POINTER(vp)]),
                           ("cudaEventRecord", [vp, vp]), ("cudaEventSynchronize", [vp]),
                           ("cudaEventElapsedTime", [ctypes.POINTER(ctypes.c_float), vp, vp]),
                           ("cudaEventDestroy", [vp]), ("cudaMemGetInfo", [ctypes.POINTER(sz), ctypes.POINTER(sz)]),
                           ("cudaGetDeviceCount", [ctypes.POINTER(ctypes.c_int)]),
                           ("cudaDeviceGetAttribute", [ctypes.POINTER(ctypes.c_int), ctypes.c_int, ctypes.c_int]),
                           ("cudaRuntimeGetVersion", [ctypes.POINTER(ctypes.c_int)]),
                           ("cudaDriverGetVersion", [ctypes.POINTER(ctypes.c_int)]), ("cudaSetDevice", [ctypes.c_int])):
            fn = getattr(L, name)
            fn.argtypes = args
            fn.restype = ctypes.c_int
        L.cudaGetErrorString.argtypes = [ctypes.c_int]
        L.cudaGetErrorString.restype = ctypes.c_char_p

    @staticmethod
    def _load():
        names = ["libcudart.so", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.13", "libcudart.so.10.2"]
        found = ctypes.util.find_library("cudart")
        if found:
            names.insert(0, found)
        for d in ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib",
                  "/usr/local/cuda/targets/x86_64-linux/lib"):
            names.append(os.path.join(d, "libcudart.so"))
        errors = []
        for n in names:
            try:
                return ctypes.CDLL(n)
            except OSError as exc:
                errors.append(str(exc))
        raise ToolError("CUDA runtime (libcudart) not found", EXIT_ENV,
                        "install CUDA (JetPack does) or add its lib folder to LD_LIBRARY_PATH")

    def check(self, status, what):
        if status != 0:
            msg = self.lib.cudaGetErrorString(status)
            raise ToolError("%s failed: CUDA error %d (%s)" % (what, status, msg.decode() if msg else "?"), EXIT_ENV)

    def device_info(self, device=0):
        n = ctypes.c_int(0)
        self.check(self.lib.cudaGetDeviceCount(ctypes.byref(n)), "cudaGetDeviceCount")
        if n.value < 1:
            raise ToolError("no CUDA device visible", EXIT_ENV)
        self.check(self.lib.cudaSetDevice(device), "cudaSetDevice")

        def attr(code):
            v = ctypes.c_int(0)
            self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(v), code, device), "cudaDeviceGetAttribute")
            return v.value
        major, minor, integrated = attr(75), attr(76), attr(18)  # ComputeCapabilityMajor/Minor, Integrated
        rt, drv = ctypes.c_int(0), ctypes.c_int(0)
        self.lib.cudaRuntimeGetVersion(ctypes.byref(rt))
        self.lib.cudaDriverGetVersion(ctypes.byref(drv))
        free, total = self.mem_info()
        return {"name": self._name(device), "compute_capability": "%d.%d" % (major, minor), "devices": n.value,
                "integrated": bool(integrated), "memory_total_mb": round(total / 2.0 ** 20, 1),
                "memory_free_mb": round(free / 2.0 ** 20, 1),
                "cuda_runtime": "%d.%d" % (rt.value // 1000, rt.value % 1000 // 10),
                "cuda_driver": "%d.%d" % (drv.value // 1000, drv.value % 1000 // 10)}

    def _name(self, device):
        # cudaDeviceProp starts with char name[256] in every CUDA version; the rest of its layout varies,
        # so a generous buffer is passed and only the name is read.
        buf = ctypes.create_string_buffer(16384)
        for fn in ("cudaGetDeviceProperties_v2", "cudaGetDeviceProperties"):
            f = getattr(self.lib, fn, None)
            if f is None:
                continue
            f.argtypes = [ctypes.c_void_p, ctypes.c_int]
            f.restype = ctypes.c_int
            if f(buf, device) == 0:
                return buf.raw[:256].split(b"\x00", 1)[0].decode("utf-8", "replace")
        return "cuda-device-%d" % device

    def mem_info(self):
        free, total = ctypes.c_size_t(0), ctypes.c_size_t(0)
        self.check(self.lib.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total)), "cudaMemGetInfo")
        return free.value, total.value

    def malloc(self, nbytes):
        p = ctypes.c_void_p()
        self.check(self.lib.cudaMalloc(ctypes.byref(p), max(int(nbytes), 1)), "cudaMalloc(%d)" % nbytes)
        return p.value

    def free(self, ptr):
        if ptr:
            self.lib.cudaFree(ctypes.c_void_p(ptr))

    def stream(self):
        s = ctypes.c_void_p()
        self.check(self.lib.cudaStreamCreate(ctypes.byref(s)), "cudaStreamCreate")
        return s.value

    def sync(self, stream):
        self.check(self.lib.cudaStreamSynchronize(ctypes.c_void_p(stream)), "cudaStreamSynchronize")

    def h2d(self, dst, array, stream):
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(array.ctypes.data), array.nbytes,
                                            self.H2D, ctypes.c_void_p(stream)), "cudaMemcpyAsync H2D")

    def d2h(self, array, src, stream):
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(array.ctypes.data), ctypes.c_void_p(src), array.nbytes,
                                            self.D2H, ctypes.c_void_p(stream)), "cudaMemcpyAsync D2H")

    def event(self):
        e = ctypes.c_void_p()
        self.check(self.lib.cudaEventCreate(ctypes.byref(e)), "cudaEventCreate")
        return e.value

    def record(self, event, stream):
        self.check(self.lib.cudaEventRecord(ctypes.c_void_p(event), ctypes.c_void_p(stream)), "cudaEventRecord")

    def elapsed_ms(self, start, end):
        self.check(self.lib.cudaEventSynchronize(ctypes.c_void_p(end)), "cudaEventSynchronize")
        ms = ctypes.c_float(0.0)
        self.check(self.lib.cudaEventElapsedTime(ctypes.byref(ms), ctypes.c_void_p(start), ctypes.c_void_p(end)),
                   "cudaEventElapsedTime")
        return ms.value


# ------------------------------------------------------------------------------------------ bundle
class Bundle(object):
    """The files of a TensorRT bundle: its folder, precision and input spec, and the sha256 the manifest
    recorded for each file (``Bundle.open`` reads them from manifest.json; the host passes them in)."""

    def __init__(self, root, precision, spec, hashes=None, manifest=None):
        self.root = os.path.abspath(root)
        self.precision = str(precision)
        self.spec = spec
        self.hashes = dict(hashes or {})          # {file: {"sha256": ...}}
        self.manifest = manifest or {}

    @classmethod
    def open(cls, root):
        path = os.path.join(os.path.abspath(root), "manifest.json")
        if not os.path.isfile(path):
            raise ToolError("%s has no manifest.json: not an edgecnn bundle" % root, EXIT_USAGE,
                            "run from inside the bundle folder or pass --bundle DIR")
        with open(path, "r") as f:
            manifest = json.load(f)
        if manifest.get("target") != "trt":
            raise ToolError("%s is a %r bundle, not a TensorRT one" % (root, manifest.get("target")), EXIT_USAGE)
        return cls(root, manifest["precision"], manifest["input"], manifest.get("files", {}), manifest)

    def path(self, name):
        return os.path.join(self.root, name)

    def files(self):
        return sorted(os.listdir(self.root))

    def sha256(self, name):
        return _sha256(self.path(name))

    def check_hashes(self, names):
        """Refuse to build from a file that differs from what the manifest recorded at export."""
        for n in names:
            meta = self.hashes.get(n)
            if meta and meta.get("sha256") != self.sha256(n):
                raise ToolError("%s differs from the manifest's sha256: the bundle was modified after export" % n,
                                EXIT_USAGE, "copy the bundle again")

    def reference(self):
        import numpy as np

        path = self.path(self.manifest.get("reference_file", "reference.npz"))
        if not os.path.isfile(path):
            raise ToolError("%s is missing: cannot check parity" % path, EXIT_USAGE)
        with np.load(path, allow_pickle=False) as z:
            pixels, reference = z["pixels"], z["reference"]
            spec = json.loads(str(z["input_spec"])) if "input_spec" in z.files else self.spec
        return normalize(pixels, spec), reference.astype(np.float32)


class BuildSettings(object):
    """How ``build_engine`` builds: the ``build`` command's options, with the same defaults."""

    def __init__(self, dla=None, int8_mode="auto", fp16_fallback=True, engine=None, timing_cache=None,
                 min_batch=1, opt_batch=1, max_batch=8, workspace_mb=1024, verbose=False):
        self.dla, self.int8_mode, self.fp16_fallback = dla, int8_mode, fp16_fallback
        self.engine, self.timing_cache = engine, timing_cache
        self.min_batch, self.opt_batch, self.max_batch = min_batch, opt_batch, max_batch
        self.workspace_mb, self.verbose = workspace_mb, verbose

    @classmethod
    def from_args(cls, args):
        return cls(dla=args.dla, int8_mode=args.int8_mode, fp16_fallback=not args.no_fp16_fallback,
                   engine=args.engine, timing_cache=args.timing_cache, min_batch=args.min_batch,
                   opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_mb=args.workspace_mb,
                   verbose=args.verbose)


def normalize(pixels, spec):
    """8-bit N x H x W x C pixels -> float32 N x C x H x W, exactly as calibration.normalize does."""
    import numpy as np

    arr = np.asarray(pixels, dtype=np.float32) * np.float32(spec.get("scale", 1.0 / 255.0))
    if arr.ndim == 3:
        arr = arr[..., None]
    arr = arr.transpose(0, 3, 1, 2)
    mean = np.asarray(spec["mean"], dtype=np.float32)[None, :, None, None]
    std = np.asarray(spec["std"], dtype=np.float32)[None, :, None, None]
    return np.ascontiguousarray((arr - mean) / std, dtype=np.float32)


def percentiles(times_ms):
    import numpy as np

    a = np.asarray(times_ms, dtype=np.float64)
    return {"runs": int(a.size), "p50_ms": round(float(np.percentile(a, 50)), 4),
            "p90_ms": round(float(np.percentile(a, 90)), 4), "p99_ms": round(float(np.percentile(a, 99)), 4),
            "mean_ms": round(float(a.mean()), 4), "min_ms": round(float(a.min()), 4)}


# ------------------------------------------------------------------------------------------ TensorRT
class _Logger(object):
    """Collects TensorRT's log lines for the build log (and echoes warnings and errors)."""

    def __init__(self, trt, verbose=False):
        base = trt.ILogger
        lines = self.lines = []
        names = {}
        for n in ("INTERNAL_ERROR", "ERROR", "WARNING", "INFO", "VERBOSE"):
            names[getattr(base.Severity, n)] = n

        class L(base):
            def __init__(self):
                base.__init__(self)

            def log(self, severity, msg):
                name = names.get(severity, str(severity))
                lines.append("[%s] %s" % (name, msg))
                if name in ("INTERNAL_ERROR", "ERROR") or (verbose and name == "WARNING"):
                    sys.stderr.write("TensorRT %s: %s\n" % (name, msg))

        self.logger = L()


def _cache_calibrator(trt, cache_bytes):
    """An IInt8EntropyCalibrator2 that only serves the bundle's calibration cache (no data on the device)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return 1

        def get_batch(self, names):
            return None  # no images on the device: TensorRT must take every range from the cache

        def read_calibration_cache(self):
            return cache_bytes

        def write_calibration_cache(self, cache):
            return None

    return CacheCalibrator()


def reheader_cache(data, trt_version):
    """The bundle's cache with its header set to the running TensorRT version (values are portable)."""
    text = data.decode("ascii")
    first, _, rest = text.partition("\n")
    m = re.match(r"^TRT-(\d+)-(\w+)$", first.strip())
    if not m:
        raise ToolError("calibration.cache has no TensorRT header", EXIT_USAGE)
    return ("TRT-%d-%s\n" % (cache_header_version(trt_version), m.group(2)) + rest).encode("ascii")


def build_engine(bundle, trt, info, args, log):
    """Build the engine for this device from ``bundle``'s files with ``args`` (``BuildSettings``); returns a
    dict describing the build (also written as a sidecar)."""
    """Build the engine for this device; returns a dict describing the build (also written as a sidecar)."""
    trt_version = parse_version(trt.__version__)
    plan = build_plan(trt_version, bundle.precision, bundle.files(), dla_core=args.dla, int8_mode=args.int8_mode,
                      fp16_fallback=args.fp16_fallback)
    onnx_path = bundle.path(plan["onnx"])
    bundle.check_hashes([plan["onnx"]] + ([plan["calibration_cache"]] if plan["calibration_cache"] else []))
    tag = gpu_tag(info)
    engine_file = args.engine or engine_name(tag, trt_version)
    spec = bundle.spec
    shape = (int(spec["channels"]), int(spec["height"]), int(spec["width"]))
    input_name = spec.get("name", "input")
    timing_cache = args.timing_cache or "timing.%s-trt%s.cache" % (tag, version_str(trt_version))
    cmd = trtexec_command(plan, engine_file, input_name, shape, args.min_batch, args.opt_batch, args.max_batch,
                          args.workspace_mb, timing_cache)
    log("equivalent trtexec command:\n  " + cmd)

    tlog = _Logger(trt, verbose=args.verbose)
    builder = trt.Builder(tlog.logger)
    flags = 0
    if plan["explicit_batch_flag"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, tlog.logger)
    t0 = time.time()
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read(), onnx_path)
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ToolError("TensorRT could not parse %s: %s" % (plan["onnx"], "; ".join(errs[:3])), EXIT_ENV)
    config = builder.create_builder_config()
    if hasattr(config, "set_memory_pool_limit"):
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, args.workspace_mb << 20)
    else:  # TensorRT < 8.4
        config.max_workspace_size = args.workspace_mb << 20
    for name in plan["flags"]:
        if not hasattr(trt.BuilderFlag, name):
            raise ToolError("this TensorRT has no builder flag %s" % name, EXIT_ENV)
        config.set_flag(getattr(trt.BuilderFlag, name))
    for name in plan["clear_flags"]:
        if hasattr(trt.BuilderFlag, name):
            config.clear_flag(getattr(trt.BuilderFlag, name))
    if plan["dla_core"] is not None:
        cores = int(builder.num_DLA_cores)
        if plan["dla_core"] >= cores:
            raise ToolError("DLA core %d requested, this device has %d" % (plan["dla_core"], cores), EXIT_USAGE,
                            "Orin NX / AGX Orin have DLA cores; Orin Nano has none")
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan["dla_core"]
    if plan["calibration_cache"]:
        with open(bundle.path(plan["calibration_cache"]), "rb") as f:
            cache = reheader_cache(f.read(), trt_version)
        config.int8_calibrator = _cache_calibrator(trt, cache)
    timing_path = timing_cache if os.path.isabs(timing_cache) else bundle.path(timing_cache)
    if timing_cache:
        blob = b""
        if os.path.isfile(timing_path):
            with open(timing_path, "rb") as f:
                blob = f.read()
        tc = config.create_timing_cache(blob)
        config.set_timing_cache(tc, False)  # (cache, ignore_mismatch)
    inp = network.get_input(0)
    dynamic = tuple(inp.shape)[0] == -1
    if dynamic:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, (args.min_batch,) + shape, (args.opt_batch,) + shape, (args.max_batch,) + shape)
        config.add_optimization_profile(profile)
    log("building %s engine with TensorRT %s (%s) ..." % (bundle.precision, trt.__version__,
        "strongly typed" if plan["strongly_typed"] else "flags " + ",".join(plan["flags"] or ["none"])))
    serialized = builder.build_serialized_network(network, config)
    seconds = time.time() - t0
    if serialized is None:
        tail = "\n".join(tlog.lines[-5:])
        raise ToolError("TensorRT failed to build the engine:\n" + tail, EXIT_ENV)
    engine_path = engine_file if os.path.isabs(engine_file) else bundle.path(engine_file)
    with open(engine_path, "wb") as f:
        f.write(serialized)
    if timing_cache:
        with open(timing_path, "wb") as f:
            f.write(config.get_timing_cache().serialize())
    meta = {"engine": os.path.basename(engine_path), "tensorrt": trt.__version__, "gpu": info.get("gpu"),
            "gpu_tag": tag, "jetson": info.get("jetson"), "precision": bundle.precision, "onnx": plan["onnx"],
            "onnx_sha256": bundle.sha256(plan["onnx"]), "plan": plan, "dynamic_batch": dynamic,
            "batch_profile": [args.min_batch, args.opt_batch, args.max_batch] if dynamic else None,
            "workspace_mb": args.workspace_mb, "timing_cache": os.path.basename(timing_path) if timing_cache else None,
            "build_seconds": round(seconds, 2), "engine_bytes": os.path.getsize(engine_path),
            "engine_sha256": _sha256(engine_path), "trtexec_equivalent": cmd, "tool": TOOL_NAME + " " + TOOL_VERSION,
            "created": _now()}
    with open(engine_path + ".json", "w") as f:
        json.dump(meta, f, indent=2)
    log_path = engine_path[:-len(".engine")] + ".build.log"
    with open(log_path, "w") as f:
        f.write("# %s build, %s\n# trtexec equivalent: %s\n" % (TOOL_NAME, meta["created"], cmd))
        f.write(json.dumps({k: v for k, v in meta.items() if k != "trtexec_equivalent"}, indent=2) + "\n")
        f.write("\n".join(tlog.lines) + "\n")
    meta["build_log"] = os.path.basename(log_path)
    log("engine written: %s (%.1f MB, built in %.1f s); log %s" % (meta["engine"], meta["engine_bytes"] / 1e6,
                                                                   seconds, meta["build_log"]))
    return meta


def check_engine_compatible(engine_path, trt_version, info):
    """Refuse, with a clear message, an engine built for another GPU or TensorRT version."""
    sidecar = engine_path + ".json"
    here = "%s with TensorRT %s" % (gpu_tag(info), version_str(trt_version))
    if os.path.isfile(sidecar):
        with open(sidecar) as f:
            meta = json.load(f)
        built_v = parse_version(meta.get("tensorrt", "0"))
        built_gpu = meta.get("gpu_tag")
    else:
        m = re.match(r"^model\.(.+)-trt([\d.]+)\.engine$", os.path.basename(engine_path))
        if not m:
            return  # a user-supplied engine without our metadata: TensorRT itself will judge it
        built_gpu, built_v = m.group(1), parse_version(m.group(2))
    if tuple(built_v[:3]) != tuple(trt_version[:3]) or built_gpu != gpu_tag(info):
        raise ToolError("%s was built for %s with TensorRT %s; this device is %s. Engines are tied to the GPU and "
                        "the TensorRT version" % (os.path.basename(engine_path), built_gpu, version_str(built_v), here),
                        EXIT_ENGINE, "rebuild it here: python3 %s build" % TOOL_NAME)


class TrtRunner(object):
    """Runs a serialized engine with the name-based API; ``run(x) -> logits``, ``describe()``, ``close()``:
    the call shape of edgecnn's runners (``exporters.runner``), written for Python 3.8 without edgecnn."""

    latency_reason = None   # timed where it runs: this is the device

    def __init__(self, engine_path, trt, cuda, max_batch=None):
        import numpy as np

        self.np, self.trt, self.cuda = np, trt, cuda
        self.tlog = _Logger(trt)
        free0, _ = cuda.mem_info()
        t0 = time.time()
        with open(engine_path, "rb") as f:
            data = f.read()
        self.runtime = trt.Runtime(self.tlog.logger)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ToolError("TensorRT could not load %s: %s" % (os.path.basename(engine_path),
                            " ".join(self.tlog.lines[-2:]) or "incompatible engine"), EXIT_ENGINE,
                            "rebuild it on this device: python3 %s build" % TOOL_NAME)
        self.context = self.engine.create_execution_context()
        self.load_seconds = time.time() - t0
        self.inputs, self.outputs = [], []
        for i in range(self.engine.num_io_tensors):
            name = self.engine.get_tensor_name(i)
            if self.engine.get_tensor_mode(name) == trt.TensorIOMode.INPUT:
                self.inputs.append(name)
            else:
                self.outputs.append(name)
        if len(self.inputs) != 1:
            raise ToolError("expected one input tensor, the engine has %d" % len(self.inputs), EXIT_ENGINE)
        self.input = self.inputs[0]
        shape = tuple(self.engine.get_tensor_shape(self.input))
        self.dynamic = shape[0] == -1
        if self.dynamic:
            prof = self.engine.get_tensor_profile_shape(self.input, 0)
            self.max_batch = int(prof[2][0])
        else:
            self.max_batch = int(shape[0])
        if max_batch:
            self.max_batch = min(self.max_batch, int(max_batch))
        self.sample_shape = shape[1:]
        self.stream = cuda.stream()
        self.buffers = {}
        self.dtypes = {n: np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))) for n in self.inputs + self.outputs}
        self._set_batch(self.max_batch)
        for name in self.inputs + self.outputs:
            shp = tuple(self.context.get_tensor_shape(name))
            nbytes = int(np.prod(shp)) * self.dtypes[name].itemsize
            self.buffers[name] = cuda.malloc(nbytes)
            self.context.set_tensor_address(name, self.buffers[name])
        free1, _ = cuda.mem_info()
        dm = getattr(self.engine, "device_memory_size_v2", None)
        if dm is None:
            dm = getattr(self.engine, "device_memory_size", 0)
        self.memory = {"engine_device_memory_mb": round(int(dm) / 2.0 ** 20, 2),
                       "gpu_memory_used_by_runner_mb": round((free0 - free1) / 2.0 ** 20, 2),
                       "note": "free-memory delta around engine load, context and buffers (cudaMemGetInfo); on "
                               "Jetson GPU and CPU share memory, so other processes move it too"}
        self.batch = self.max_batch

    def _set_batch(self, b):
        if self.dynamic:
            if not self.context.set_input_shape(self.input, (b,) + tuple(self.sample_shape)):
                raise ToolError("set_input_shape(%s, batch %d) rejected" % (self.input, b), EXIT_ENGINE)
        self.batch = b

    def enqueue(self):
        if not self.context.execute_async_v3(self.stream):
            raise ToolError("execute_async_v3 failed", EXIT_ENGINE)

    def run(self, x):
        np = self.np
        outs = []
        for i in range(0, len(x), self.max_batch):
            chunk = np.ascontiguousarray(x[i:i + self.max_batch], dtype=self.dtypes[self.input])
            if len(chunk) != self.batch:
                if not self.dynamic:
                    raise ToolError("engine has a fixed batch %d" % self.batch, EXIT_ENGINE)
                self._set_batch(len(chunk))
            self.cuda.h2d(self.buffers[self.input], chunk, self.stream)
            self.enqueue()
            name = self.outputs[0]
            out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
            self.cuda.d2h(out, self.buffers[name], self.stream)
            self.cuda.sync(self.stream)
            outs.append(out.astype(np.float32).reshape(len(chunk), -1))
        return np.concatenate(outs)

    def time_gpu(self, batch, warmup=20, runs=200, max_seconds=20.0):
        """GPU time of execute_async_v3 at ``batch``, measured with CUDA events; and end-to-end with copies."""
        np = self.np
        x = np.random.default_rng(0).standard_normal((batch,) + tuple(self.sample_shape)).astype(self.dtypes[self.input])
        self._set_batch(batch)
        self.cuda.h2d(self.buffers[self.input], x, self.stream)
        for _ in range(warmup):
            self.enqueue()
        self.cuda.sync(self.stream)
        start, end = self.cuda.event(), self.cuda.event()
        gpu, e2e = [], []
        deadline = time.time() + max_seconds
        while len(gpu) < runs and time.time() < deadline:
            self.cuda.record(start, self.stream)
            self.enqueue()
            self.cuda.record(end, self.stream)
            gpu.append(self.cuda.elapsed_ms(start, end))
        while len(e2e) < max(10, runs // 4) and time.time() < deadline + max_seconds / 2:
            t0 = time.perf_counter()
            self.run(x)
            e2e.append((time.perf_counter() - t0) * 1000.0)
        g = percentiles(gpu)
        g["batch"] = batch
        g["throughput_ips"] = round(batch / (g["p50_ms"] / 1000.0), 1) if g["p50_ms"] > 0 else 0.0
        g["end_to_end_with_copies"] = percentiles(e2e) if e2e else None
        g["timer"] = "CUDA events around execute_async_v3 (GPU time); end_to_end_with_copies: host clock, H2D+run+D2H"
        return g

    def describe(self):
        return {"runtime": "tensorrt", "version": self.trt.__version__, "api": "name-based (execute_async_v3)",
                "max_batch": self.max_batch}

    def close(self):
        for p in self.buffers.values():
            self.cuda.free(p)
        self.buffers = {}


def validate_engine(bundle, trt, cuda, info, engine_path, args, log):
    import numpy as np

    trt_version = parse_version(trt.__version__)
    if not os.path.isfile(engine_path):
        raise ToolError("no engine at %s" % engine_path, EXIT_USAGE, "build it first: python3 %s build" % TOOL_NAME)
    check_engine_compatible(engine_path, trt_version, info)
    runner = TrtRunner(engine_path, trt, cuda)
    try:
        inputs, reference = bundle.reference()
        out = runner.run(inputs)
        trained = bool(bundle.manifest.get("weights", {}).get("pretrained"))
        floor = (bundle.manifest.get("parity") or {}).get("fp32_noise_floor")
        parity = _parity().judge(reference, out, bundle.precision, trained, min_agreement=args.min_agreement,
                                 noise_floor=floor).to_dict()
        log("parity %s: %s | max rel err %.2e, cosine %.6f, SQNR %.1f dB, top-1 agree %.1f%% on %d reference images"
            % (parity["gate"], "PASS" if parity["passed"] else "FAIL", parity["max_rel_error"], parity["cosine"],
               parity["sqnr_db"], parity["top1_agreement"] * 100, parity["samples"]))
        latency = None
        if not args.no_latency:
            b1 = runner.time_gpu(1, runs=args.runs)
            tb = min(args.throughput_batch, runner.max_batch)
            tp = runner.time_gpu(tb, runs=max(20, args.runs // 4)) if tb > 1 else None
            latency = {"batch1": b1, "throughput": tp, "load_seconds": round(runner.load_seconds, 4),
                       "runtime": runner.describe(), "memory": runner.memory, "power": detect_power(),
                       "machine": {"gpu": info.get("gpu"), "jetson": info.get("jetson")}}
            log("latency batch 1 (GPU) p50 %.3f ms, p90 %.3f ms, p99 %.3f ms%s" % (
                b1["p50_ms"], b1["p90_ms"], b1["p99_ms"],
                "; batch %d %.0f img/s" % (tb, tp["throughput_ips"]) if tp else ""))
        return {"engine": os.path.basename(engine_path), "engine_sha256": _sha256(engine_path), "parity": parity,
                "latency": latency, "runtime": runner.describe()}
    finally:
        runner.close()


# ------------------------------------------------------------------------------------------ CLI
def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def build_parser():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(prog=TOOL_NAME, description="Build, validate and benchmark an edgecnn TensorRT bundle "
                                "on this device (Python >= 3.8, NumPy, TensorRT; no torch).")
    p.add_argument("--bundle", default=here, help="bundle folder (default: the folder this script is in)")
    p.add_argument("--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("check", help="JetPack / TensorRT / Python / GPU detection")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", default=None, help="engine file (default model.<gpu>-trt<version>.engine)")
    b = argparse.ArgumentParser(add_help=False)
    b.add_argument("--dla", type=int, default=None, metavar="CORE", help="build for DLA core N, with GPU fallback")
    b.add_argument("--int8-mode", choices=("auto", "explicit", "implicit"), default="auto",
                   help="INT8: explicit Q/DQ model (default), or implicit from calibration.cache (TensorRT <= 10; "
                        "the default with --dla)")
    b.add_argument("--no-fp16-fallback", action="store_true", help="INT8: keep float layers in FP32, not FP16")
    b.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace in MiB (default 1024)")
    b.add_argument("--timing-cache", default=None, help="timing cache file (default timing.<gpu>-trt<ver>.cache)")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=1)
    b.add_argument("--max-batch", type=int, default=8, help="optimization profile maximum batch (default 8)")
    v = argparse.ArgumentParser(add_help=False)
    v.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    v.add_argument("--throughput-batch", type=int, default=8)
    v.add_argument("--no-latency", action="store_true")
    v.add_argument("--min-agreement", type=float, default=0.99)
    v.add_argument("--results", default=None, help="results JSON path (default results.<gpu>-trt<ver>.json)")
    sub.add_parser("build", parents=[common, b], help="build the engine for this GPU and TensorRT")
    sub.add_parser("validate", parents=[common, v], help="parity vs reference.npz, latency, GPU memory")
    sub.add_parser("all", parents=[common, b, v], help="check + build + validate + benchmark, write results JSON")
    return p


def _log(msg):
    print(msg)
    sys.stdout.flush()


def _require_trt():
    trt, why = import_tensorrt()
    if trt is None:
        raise ToolError("TensorRT's Python bindings are not importable (%s)" % why, EXIT_ENV,
                        "on Jetson: sudo apt install python3-libnvinfer (JetPack); elsewhere: the TensorRT wheel "
                        "matching your CUDA")
    return trt


def cmd_check(args):
    info = detect()
    _log(json.dumps(info, indent=2))
    problems = []
    if sys.version_info < (3, 8):
        problems.append("Python %s < 3.8" % platform.python_version())
    if not info.get("numpy"):
        problems.append("NumPy missing")
    if not info.get("tensorrt"):
        problems.append("TensorRT missing (%s)" % info.get("tensorrt_error"))
    if not info.get("gpu"):
        problems.append("no CUDA GPU (%s)" % info.get("cuda_error", "?"))
    if problems:
        _log("NOT READY: " + "; ".join(problems))
        return EXIT_ENV
    _log("READY: TensorRT %s on %s (%s)" % (info["tensorrt"], info["gpu"]["name"], gpu_tag(info)))
    return EXIT_OK


def cmd_build(args, bundle=None, info=None, trt=None):
    trt = trt or _require_trt()
    bundle = bundle or Bundle.open(args.bundle)
    info = info or detect(trt)
    if not info.get("gpu"):
        raise ToolError("no CUDA GPU usable (%s)" % info.get("cuda_error", "?"), EXIT_ENV)
    return build_engine(bundle, trt, info, BuildSettings.from_args(args), _log)


def _results_path(bundle, args, info, trt):
    if args.results:
        return args.results
    return bundle.path("results.%s-trt%s.json" % (gpu_tag(info), version_str(parse_version(trt.__version__))))


def _results(bundle, info, build, validation):
    files = bundle.manifest.get("files", {})
    return {"schema": RESULTS_SCHEMA, "tool": TOOL_NAME + " " + TOOL_VERSION, "created": _now(),
            "bundle": {"arch": bundle.manifest.get("arch"), "target": "trt", "precision": bundle.precision,
                       "onnx_sha256": dict((k, v.get("sha256")) for k, v in files.items() if k.endswith(".onnx"))},
            "device": info, "build": build, "validation": validation,
            "status": ("validated" if validation and validation["parity"]["passed"] else
                       "failed" if validation else "built")}


def cmd_validate(args, bundle=None, info=None, trt=None, build=None):
    trt = trt or _require_trt()
    bundle = bundle or Bundle.open(args.bundle)
    info = info or detect(trt)
    cuda = Cuda()
    engine = args.engine or engine_name(gpu_tag(info), parse_version(trt.__version__))
    engine_path = engine if os.path.isabs(engine) else bundle.path(engine)
    validation = validate_engine(bundle, trt, cuda, info, engine_path, args, _log)
    res = _results(bundle, info, build, validation)
    path = _results_path(bundle, args, info, trt)
    with open(path, "w") as f:
        json.dump(res, f, indent=2)
    _log("results: %s (status %s). Bring it back and run: edgecnn merge-results <bundle> %s"
         % (path, res["status"], os.path.basename(path)))
    return EXIT_OK if validation["parity"]["passed"] else EXIT_GATE


def cmd_all(args):
    trt = _require_trt()
    bundle = Bundle.open(args.bundle)
    info = detect(trt)
    _log("device: %s | TensorRT %s | Python %s | JetPack %s" % (
        (info.get("gpu") or {}).get("name"), info.get("tensorrt"), info.get("python"),
        info.get("jetson", {}).get("jetpack", "n/a (not a Jetson)")))
    build = cmd_build(args, bundle, info, trt)
    if not args.engine:
        args.engine = build["engine"]
    return cmd_validate(args, bundle, info, trt, build)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        if args.command == "check":
            return cmd_check(args)
        if args.command == "build":
            cmd_build(args)
            return EXIT_OK
        if args.command == "validate":
            return cmd_validate(args)
        return cmd_all(args)
    except ToolError as exc:
        sys.stderr.write("error: %s%s\n" % (exc, (" (" + exc.hint + ")") if exc.hint else ""))
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
