#!/usr/bin/env python3
"""edgecnn_trt.py: build, validate and benchmark an edgecnn TensorRT bundle on the device.

Shipped inside every ``trt-<precision>`` bundle. Needs only Python >= 3.8, NumPy and TensorRT's Python
bindings (JetPack installs them); no torch, no edgecnn, no polygraphy, no pycuda (CUDA through ctypes).

    python3 edgecnn_trt.py check                  # JetPack / L4T, TensorRT, Python, NumPy, GPU, DLA, power mode
    python3 edgecnn_trt.py build [--dla 0] [--batch 1] [--workspace-mb 1024] [--max-batch 8]
    python3 edgecnn_trt.py validate [--engine FILE]  # parity vs reference.npz + latency + GPU memory
    python3 edgecnn_trt.py all                    # check + build + validate + benchmark -> results JSON

Engines are tied to the GPU, the TensorRT version and the platform, so they are built here, on the device,
named ``model.<gpu>-trt<version>.engine`` with a ``.json`` sidecar describing them (metadata sits beside the
engine, never glued in front of it: trtexec and DeepStream load the file as is). An engine built for another
GPU or TensorRT version is refused with a message that says how to rebuild.

TensorRT API by version: <= 10 builds with builder flags (FP16; INT8 from the explicit Q/DQ model, or
implicit INT8 from ``calibration.cache`` for DLA); 11 removed implicit INT8 and the precision flags, so it
builds strongly typed networks from the typed ONNX files (Q/DQ for INT8, ``model.fp16.onnx`` for FP16).
FP32 builds clear TF32 on every version (TF32 is on by default and would blur the 1e-4 parity gate).
DLA engines are static-shape (batch ``--batch``, default 1) and validated at that shape only. Inference
uses the name-based API (num_io_tensors, set_input_shape, set_tensor_address, execute_async_v3).

The host (``edgecnn trt``, ``edgecnn export`` on a machine with TensorRT) imports this file as
``exporters.tensorrt.device`` and calls its functions directly: ``Bundle``, ``BuildSettings``,
``build_engine``, ``TrtRunner``, ``validate_engine``.

Exit codes: 0 ok, 1 parity gate failed, 2 usage, 3 environment (no TensorRT/GPU/DLA), 4 engine incompatible.
"""
from __future__ import print_function

import argparse
import ctypes
import ctypes.util
import datetime
import glob
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
TOOL_VERSION = "2"
RESULTS_SCHEMA = "edgecnn-trt-results/1"

PARITY_MODULE = "edgecnn_parity.py"   # exporters/parity.py, shipped beside this tool in every bundle

EXIT_OK, EXIT_GATE, EXIT_USAGE, EXIT_ENV, EXIT_ENGINE = 0, 1, 2, 3, 4

# L4T (Jetson Linux) release -> JetPack, for the releases this bundle targets.
L4T_TO_JETPACK = [
    ((35, 1), "5.0.2"), ((35, 2), "5.1"), ((35, 3), "5.1.1"), ((35, 4), "5.1.2"), ((35, 5), "5.1.3"),
    ((35, 6), "5.1.4"), ((36, 2), "6.0 DP"), ((36, 3), "6.0"), ((36, 4), "6.1/6.2"), ((38, 0), "7.0"),
]

# Where DLA exists, for the messages that refuse a DLA build elsewhere.
DLA_WHERE = ("DLA exists on Jetson AGX Orin, Orin NX and AGX Xavier / Xavier NX with TensorRT 8.5-10.x "
             "(JetPack 5.1-6.2); TensorRT 11.0-11.3 have no DLA; 11.4.1 and later only on AGX Orin with "
             "JetPack >= 7.2.2. Orin Nano, Thor and discrete GPUs have none")


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


def dla_version_problem(trt_version):
    """Why this TensorRT version cannot build for DLA at all, or None."""
    v = tuple(trt_version) + (0,)
    if v[0] == 11 and v[1] < 4:
        return "TensorRT %s has no DLA support (none in 11.0-11.3)" % version_str(trt_version)
    return None


# ------------------------------------------------------------------------------------------ build plan
class BuildSettings(object):
    """How ``build_engine`` builds: the ``build`` command's options, with the same defaults. ``batch``: a
    static-shape engine of that batch (DLA needs one; default 1 with ``dla``); otherwise the dynamic batch
    profile min/opt/max."""

    def __init__(self, dla=None, batch=None, int8_mode="auto", fp16_fallback=True, engine=None, timing_cache=None,
                 min_batch=1, opt_batch=1, max_batch=8, workspace_mb=1024, verbose=False):
        self.dla, self.batch, self.int8_mode, self.fp16_fallback = dla, batch, int8_mode, fp16_fallback
        self.engine, self.timing_cache = engine, timing_cache
        self.min_batch, self.opt_batch, self.max_batch = min_batch, opt_batch, max_batch
        self.workspace_mb, self.verbose = workspace_mb, verbose

    @classmethod
    def from_args(cls, args):
        return cls(dla=args.dla, batch=args.batch, int8_mode=args.int8_mode, fp16_fallback=not args.no_fp16_fallback,
                   engine=args.engine, timing_cache=args.timing_cache, min_batch=args.min_batch,
                   opt_batch=args.opt_batch, max_batch=args.max_batch, workspace_mb=args.workspace_mb,
                   verbose=args.verbose)

    def batch_profile(self):
        """(min, opt, max) batch of the optimization profile; equal for a static-shape (e.g. DLA) engine."""
        batch = self.batch if self.batch is not None else (1 if self.dla is not None else None)
        if batch is not None:
            if batch < 1:
                raise ToolError("--batch must be >= 1, not %d" % batch, EXIT_USAGE)
            return (batch, batch, batch)
        if not 1 <= self.min_batch <= self.opt_batch <= self.max_batch:
            raise ToolError("batch profile must satisfy 1 <= min <= opt <= max (got %d, %d, %d)"
                            % (self.min_batch, self.opt_batch, self.max_batch), EXIT_USAGE)
        return (self.min_batch, self.opt_batch, self.max_batch)


def _plan_fp32(plan, major):
    plan["clear_flags"].append("TF32")  # on by default on every version; FP32 means FP32 (1e-4 parity gate)
    if major >= 11:
        plan["strongly_typed"] = True


def _plan_fp16(plan, major, files, trt_version):
    if major < 11:
        plan["flags"].append("FP16")
        return
    if "model.fp16.onnx" not in files:
        raise ToolError("TensorRT %s builds strongly typed networks and this bundle has no model.fp16.onnx"
                        % version_str(trt_version), EXIT_USAGE, "re-export the bundle with a newer edgecnn")
    plan.update(onnx="model.fp16.onnx", strongly_typed=True)


def _plan_int8(plan, major, files, trt_version, settings):
    mode = settings.int8_mode
    if mode == "auto":
        mode = "implicit" if (settings.dla is not None and major <= 10) else "explicit"
    fallback = ["FP16"] if settings.fp16_fallback else []
    if mode == "implicit":
        if major >= 11:
            raise ToolError("TensorRT %s removed implicit INT8 calibration" % version_str(trt_version), EXIT_USAGE,
                            "use --int8-mode explicit (the Q/DQ model)")
        if "calibration.cache" not in files:
            raise ToolError("implicit INT8 needs calibration.cache, which this bundle lacks", EXIT_USAGE)
        plan.update(onnx="model.onnx", calibration_cache="calibration.cache")
        plan["flags"] += ["INT8"] + fallback
        if major == 10:
            plan["notes"].append("implicit INT8 is deprecated since TensorRT 10.1 (kept for DLA)")
    else:
        if "model.int8.qdq.onnx" not in files:
            raise ToolError("this bundle has no model.int8.qdq.onnx", EXIT_USAGE)
        plan["onnx"] = "model.int8.qdq.onnx"
        if major >= 11:
            plan["strongly_typed"] = True
            plan["notes"].append("strongly typed: layers without Q/DQ run in FP32"
                                 + (" on the GPU (DLA runs FP16/INT8 only)" if settings.dla is not None else ""))
        else:
            plan["flags"] += ["INT8"] + fallback
    plan["int8_mode"] = mode


def build_plan(trt_version, precision, files, settings=None):
    """Which ONNX file, network flags, builder flags and batch profile to use for this TensorRT version.

    ``files``: names present in the bundle; ``settings``: ``BuildSettings`` (defaults when None). A pure
    function (no TensorRT needed), so it is tested anywhere. Returns a dict: onnx, strongly_typed,
    explicit_batch_flag, flags (builder flags to set), clear_flags, calibration_cache (or None), int8_mode,
    dla_core, gpu_fallback, batch_profile [min, opt, max], static_shape, notes.
    """
    settings = settings or BuildSettings()
    major = tuple(trt_version)[0]
    files = set(files)
    profile = settings.batch_profile()
    plan = {"onnx": "model.onnx", "strongly_typed": False, "explicit_batch_flag": major < 10, "flags": [],
            "clear_flags": [], "calibration_cache": None, "int8_mode": None, "notes": [],
            "dla_core": settings.dla, "gpu_fallback": settings.dla is not None,
            "batch_profile": list(profile), "static_shape": profile[0] == profile[2]}
    if precision not in ("fp32", "fp16", "int8"):
        raise ToolError("unknown precision %r" % precision, EXIT_USAGE)
    if settings.dla is not None:
        _check_dla_request(trt_version, precision, settings)
    if precision == "fp32":
        _plan_fp32(plan, major)
    elif precision == "fp16":
        _plan_fp16(plan, major, files, trt_version)
    else:
        _plan_int8(plan, major, files, trt_version, settings)
    if settings.dla is not None:
        plan["flags"].append("GPU_FALLBACK")
        plan["notes"].append("DLA needs static shapes: batch %d only (min = opt = max); layers DLA cannot run "
                             "fall back to the GPU" % profile[0])
    return plan


def _check_dla_request(trt_version, precision, settings):
    if settings.dla < 0:
        raise ToolError("--dla takes a core number >= 0, not %d" % settings.dla, EXIT_USAGE)
    problem = dla_version_problem(trt_version)
    if problem:
        raise ToolError(problem, EXIT_ENV, DLA_WHERE)
    if precision == "fp32":
        raise ToolError("DLA runs FP16 or INT8 only; this bundle is FP32", EXIT_USAGE,
                        "export with PRECISION=fp16 or int8 for DLA, or drop --dla")
    if settings.batch is None and (settings.min_batch, settings.opt_batch, settings.max_batch) != (1, 1, 8):
        raise ToolError("DLA engines are static-shape: use --batch N, not --min/--opt/--max-batch", EXIT_USAGE)


def engine_name(gpu_tag, trt_version):
    return "model.%s-trt%s.engine" % (gpu_tag, version_str(trt_version))


def device_cache_name(trt_version):
    """The bundle's calibration cache with the header of this TensorRT version (what trtexec --calib reads)."""
    return "calibration.trt%s.cache" % version_str(trt_version)


def slug(text):
    return re.sub(r"[^a-z0-9]+", "-", str(text).lower()).strip("-") or "gpu"


def trtexec_command(plan, engine, input_name, shape, workspace_mb=1024, timing_cache="timing.cache",
                    calibration_cache=None):
    """The trtexec command line equivalent to ``build`` with ``plan`` (for users who prefer trtexec).
    ``calibration_cache``: the file ``--calib`` reads (the copy whose header matches the device's TensorRT)."""
    dims = "x".join(str(d) for d in shape)
    lo, opt, hi = plan["batch_profile"]
    args = ["trtexec", "--onnx=" + plan["onnx"], "--saveEngine=" + engine]
    if plan["static_shape"]:
        args.append("--shapes=%s:%dx%s" % (input_name, lo, dims))
    else:
        for flag, b in (("--minShapes", lo), ("--optShapes", opt), ("--maxShapes", hi)):
            args.append("%s=%s:%dx%s" % (flag, input_name, b, dims))
    if plan["strongly_typed"]:
        args.append("--stronglyTyped")
    args += ["--" + f.lower() for f in plan["flags"] if f in ("FP16", "INT8")]
    if "TF32" in plan["clear_flags"]:
        args.append("--noTF32")
    if plan["calibration_cache"]:
        args.append("--calib=" + (calibration_cache or plan["calibration_cache"]))
    if plan["dla_core"] is not None:
        args += ["--useDLACore=%d" % plan["dla_core"], "--allowGPUFallback"]
    args += ["--memPoolSize=workspace:%d" % workspace_mb, "--profilingVerbosity=detailed"]
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


def _clock(text):
    return int(text) if text and text.isdigit() else text


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
            out["gpu_clock_hz"] = _clock(cur)
            mx = _read(os.path.join(folder, "max_freq"))
            if mx:
                out["gpu_max_clock_hz"] = _clock(mx)
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


def _builder_facts(trt):
    """DLA cores and fast-precision flags from a TensorRT Builder; each read on its own, so a name a version
    lacks costs only that fact."""
    out = {}
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
    except Exception as exc:
        return {"builder_error": "%s: %s" % (type(exc).__name__, exc)}
    for key, attr in (("dla_cores", "num_DLA_cores"), ("fast_fp16", "platform_has_fast_fp16"),
                      ("fast_int8", "platform_has_fast_int8")):
        try:
            value = getattr(builder, attr)
        except Exception:  # an attribute a TensorRT version does not have
            continue
        out[key] = int(value) if key == "dla_cores" else bool(value)
    return out


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
    try:
        info["gpu"] = (cuda or Cuda()).device_info()
    except ToolError as exc:
        info["cuda_error"] = str(exc)
    if trt is not None and info.get("gpu"):
        info.update(_builder_facts(trt))
        problem = dla_version_problem(parse_version(trt.__version__))
        info["dla"] = problem or ("%d core(s)" % info["dla_cores"] if info.get("dla_cores") else
                                  "none on this device")
    info["power"] = detect_power()
    return info


def gpu_tag(info):
    gpu = info.get("gpu") or {}
    return "%s-sm%s" % (slug(gpu.get("name", "gpu")), gpu.get("compute_capability", "").replace(".", ""))


# ------------------------------------------------------------------------------------------ CUDA via ctypes
CUDART_NAMES = ("libcudart.so", "libcudart.so.13", "libcudart.so.12", "libcudart.so.11.0", "libcudart.so.10.2")
CUDA_DIRS = ("/usr/local/cuda/lib64", "/usr/local/cuda/targets/aarch64-linux/lib",
             "/usr/local/cuda/targets/x86_64-linux/lib", "/usr/local/cuda-*/lib64",
             "/usr/local/cuda-*/targets/*-linux/lib", "/usr/lib/aarch64-linux-gnu", "/usr/lib/x86_64-linux-gnu",
             "/usr/lib64")


def cudart_candidates(environ=None):
    """Where libcudart may be, in the order tried: the loader's own answer, CUDA_HOME / CUDA_PATH, the
    folders on LD_LIBRARY_PATH, then the usual JetPack, CUDA-installer and container folders. Containers
    often ship only a versioned ``libcudart.so.12`` (no dev symlink), so every folder is tried with each
    versioned name too."""
    environ = os.environ if environ is None else environ
    out = []
    found = ctypes.util.find_library("cudart")
    if found:
        out.append(found)
    out += list(CUDART_NAMES)      # bare names: the dynamic loader searches LD_LIBRARY_PATH and its cache
    dirs = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if environ.get(var):
            dirs += [os.path.join(environ[var], "lib64"), os.path.join(environ[var], "lib")]
    dirs += [d for d in environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    for pattern in CUDA_DIRS:
        dirs += sorted(glob.glob(pattern), reverse=True) if "*" in pattern else [pattern]
    for d in dirs:
        out += [os.path.join(d, n) for n in CUDART_NAMES]
        out += sorted(glob.glob(os.path.join(d, "libcudart.so.*")), reverse=True)
    seen = set()
    return [c for c in out if not (c in seen or seen.add(c))]


def load_cudart(environ=None):
    tried = []
    for name in cudart_candidates(environ):
        try:
            return ctypes.CDLL(name)
        except OSError:
            tried.append(name)
    raise ToolError("CUDA runtime (libcudart) not found (tried the loader, CUDA_HOME/CUDA_PATH, LD_LIBRARY_PATH "
                    "and %d usual paths)" % len(tried), EXIT_ENV,
                    "install CUDA (JetPack does), or set CUDA_HOME or LD_LIBRARY_PATH to its lib folder")


_CUDA_SIGNATURES = (
    ("cudaMalloc", ["pp", "sz"]), ("cudaFree", ["p"]), ("cudaMemcpyAsync", ["p", "p", "sz", "i", "p"]),
    ("cudaStreamCreate", ["pp"]), ("cudaStreamSynchronize", ["p"]), ("cudaStreamDestroy", ["p"]),
    ("cudaEventCreate", ["pp"]), ("cudaEventRecord", ["p", "p"]), ("cudaEventSynchronize", ["p"]),
    ("cudaEventElapsedTime", ["pf", "p", "p"]), ("cudaEventDestroy", ["p"]), ("cudaMemGetInfo", ["psz", "psz"]),
    ("cudaGetDeviceCount", ["pi"]), ("cudaDeviceGetAttribute", ["pi", "i", "i"]), ("cudaRuntimeGetVersion", ["pi"]),
    ("cudaDriverGetVersion", ["pi"]), ("cudaSetDevice", ["i"]),
)


def _ctype(code):
    vp, sz = ctypes.c_void_p, ctypes.c_size_t
    return {"p": vp, "pp": ctypes.POINTER(vp), "sz": sz, "psz": ctypes.POINTER(sz), "i": ctypes.c_int,
            "pi": ctypes.POINTER(ctypes.c_int), "pf": ctypes.POINTER(ctypes.c_float)}[code]


class Cuda(object):
    """The few libcudart calls we need (malloc/copy/stream/event/memory info), through ctypes. ``lib``: an
    already loaded libcudart (``ctypes.CDLL``); found with ``load_cudart`` when None."""

    H2D, D2H = 1, 2

    def __init__(self, lib=None):
        self.lib = lib if lib is not None else load_cudart()
        for name, codes in _CUDA_SIGNATURES:
            fn = getattr(self.lib, name)
            fn.argtypes = [_ctype(c) for c in codes]
            fn.restype = ctypes.c_int
        self.lib.cudaGetErrorString.argtypes = [ctypes.c_int]
        self.lib.cudaGetErrorString.restype = ctypes.c_char_p

    def check(self, status, what):
        if status != 0:
            msg = self.lib.cudaGetErrorString(status)
            raise ToolError("%s failed: CUDA error %d (%s)" % (what, status, msg.decode() if msg else "?"), EXIT_ENV)

    def _attr(self, code, device):
        v = ctypes.c_int(0)
        self.check(self.lib.cudaDeviceGetAttribute(ctypes.byref(v), code, device), "cudaDeviceGetAttribute")
        return v.value

    def device_info(self, device=0):
        n = ctypes.c_int(0)
        self.check(self.lib.cudaGetDeviceCount(ctypes.byref(n)), "cudaGetDeviceCount")
        if n.value < 1:
            raise ToolError("no CUDA device visible", EXIT_ENV)
        self.check(self.lib.cudaSetDevice(device), "cudaSetDevice")
        # cudaDevAttrComputeCapabilityMajor / Minor, cudaDevAttrIntegrated
        major, minor, integrated = self._attr(75, device), self._attr(76, device), self._attr(18, device)
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
            self.check(self.lib.cudaFree(ctypes.c_void_p(ptr)), "cudaFree")

    def _call(self, name, *args):
        self.check(getattr(self.lib, name)(*args), name)

    def _new_handle(self, name):
        handle = ctypes.c_void_p()
        self._call(name, ctypes.byref(handle))
        return handle.value

    def stream(self):
        return self._new_handle("cudaStreamCreate")

    def destroy_stream(self, stream):
        self._call("cudaStreamDestroy", ctypes.c_void_p(stream))

    def sync(self, stream):
        self._call("cudaStreamSynchronize", ctypes.c_void_p(stream))

    def h2d(self, dst, array, stream):
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(dst), ctypes.c_void_p(array.ctypes.data), array.nbytes,
                                            self.H2D, ctypes.c_void_p(stream)), "cudaMemcpyAsync H2D")

    def d2h(self, array, src, stream):
        self.check(self.lib.cudaMemcpyAsync(ctypes.c_void_p(array.ctypes.data), ctypes.c_void_p(src), array.nbytes,
                                            self.D2H, ctypes.c_void_p(stream)), "cudaMemcpyAsync D2H")

    def event(self):
        return self._new_handle("cudaEventCreate")

    def destroy_event(self, event):
        self._call("cudaEventDestroy", ctypes.c_void_p(event))

    def record(self, event, stream):
        self._call("cudaEventRecord", ctypes.c_void_p(event), ctypes.c_void_p(stream))

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
        try:
            with open(path, "r") as f:
                manifest = json.load(f)
        except ValueError as exc:
            raise ToolError("%s is not valid JSON (%s)" % (path, exc), EXIT_USAGE, "copy the bundle again")
        if not isinstance(manifest, dict) or manifest.get("target") != "trt":
            target = manifest.get("target") if isinstance(manifest, dict) else None
            raise ToolError("%s is a %r bundle, not a TensorRT one" % (root, target), EXIT_USAGE)
        return cls(root, manifest["precision"], manifest["input"], manifest.get("files", {}), manifest)

    def path(self, name):
        return name if os.path.isabs(name) else os.path.join(self.root, name)

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

    def input_shape(self):
        """(name, (C, H, W)) of the model input."""
        s = self.spec
        return s.get("name", "input"), (int(s["channels"]), int(s["height"]), int(s["width"]))

    def reference(self):
        import numpy as np

        path = self.path(self.manifest.get("reference_file", "reference.npz"))
        if not os.path.isfile(path):
            raise ToolError("%s is missing: cannot check parity" % path, EXIT_USAGE)
        with np.load(path, allow_pickle=False) as z:
            pixels, reference = z["pixels"], z["reference"]
            spec = json.loads(str(z["input_spec"])) if "input_spec" in z.files else self.spec
        return normalize(pixels, spec), reference.astype(np.float32)

    def labels(self):
        """The reference images' class indices when the export's evaluation set was labelled, else None."""
        import numpy as np

        path = self.path(self.manifest.get("reference_file", "reference.npz"))
        with np.load(path, allow_pickle=False) as z:
            return z["labels"] if "labels" in z.files else None

    def gate(self, max_drop=None, min_agreement=None):
        """The INT8 gate the export was judged by (the manifest's ``recipe.gate``), with the given overrides."""
        recorded = dict((self.manifest.get("recipe") or {}).get("gate") or {})
        if max_drop is not None:
            recorded["max_drop"] = max_drop / 100.0
        if min_agreement is not None:
            recorded["min_agreement"] = min_agreement
        return _parity().Gate.from_dict(recorded)


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


# ------------------------------------------------------------------------------------------ TensorRT helpers
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

    def tail(self, n=5):
        return "\n".join(self.lines[-n:])


# TensorRT data type name -> NumPy dtype name. Our own table: ``trt.nptype`` of TensorRT 8.5 builds its
# dictionary with ``np.bool``, which NumPy >= 1.24 (the NumPy of JetPack 5.1's Python 3.8) removed.
_NUMPY_DTYPES = (("FLOAT", "float32"), ("HALF", "float16"), ("INT8", "int8"), ("INT32", "int32"),
                 ("INT64", "int64"), ("UINT8", "uint8"), ("BOOL", "bool"))


def numpy_dtype(trt, dtype):
    """The NumPy dtype of a TensorRT tensor data type, without ``trt.nptype``."""
    import numpy as np

    for trt_name, np_name in _NUMPY_DTYPES:
        member = getattr(trt.DataType, trt_name, None)
        if member is not None and member == dtype:
            return np.dtype(np_name)
    raise ToolError("engine tensor type %s has no NumPy equivalent here" % (dtype,), EXIT_ENGINE,
                    "the bundle's models have FP32 inputs and outputs; rebuild the engine from them")


def _cache_calibrator(trt, cache_bytes, batch):
    """An IInt8EntropyCalibrator2 that only serves the bundle's calibration cache (no data on the device)."""

    class CacheCalibrator(trt.IInt8EntropyCalibrator2):
        def __init__(self):
            trt.IInt8EntropyCalibrator2.__init__(self)

        def get_batch_size(self):
            return batch

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


# Layers that pass values through unchanged: their output has the input's range.
_RANGE_PRESERVING = ("SHUFFLE", "IDENTITY")


def complete_cache(trt, network, data):
    """Scales for the tensors TensorRT's ONNX parser creates itself (not in the ONNX file, so not in the
    cache): a layer that only moves values (Shuffle, Identity) gets its input's scale; the others are named,
    as TensorRT then runs their layers in higher precision. Returns (cache bytes, added, missing)."""
    lines = data.decode("ascii").rstrip("\n").split("\n")
    scales = dict((n, v.strip()) for n, _, v in (ln.rpartition(":") for ln in lines[1:]) if n)
    kinds = [getattr(trt.LayerType, k, None) for k in _RANGE_PRESERVING]
    added, missing = [], []
    for i in range(network.num_layers):
        layer = network.get_layer(i)
        if layer.type == trt.LayerType.CONSTANT:
            continue  # weights, not activations
        src = layer.get_input(0) if layer.num_inputs else None
        for j in range(layer.num_outputs):
            out = layer.get_output(j).name
            if out in scales:
                continue
            if layer.type in kinds and src is not None and src.name in scales:
                scales[out] = scales[src.name]
                lines.append("%s: %s" % (out, scales[out]))
                added.append(out)
            elif layer.get_output(j).dtype == trt.DataType.FLOAT:
                missing.append(out)
    return ("\n".join(lines) + "\n").encode("ascii"), added, missing


# ------------------------------------------------------------------------------------------ build steps
def create_network(trt, builder, plan):
    flags = 0
    if plan["explicit_batch_flag"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    if plan["strongly_typed"]:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    return builder.create_network(flags)


def parse_onnx(trt, network, tlog, onnx_path):
    """Parse the ONNX file into ``network``; returns the parser (it owns the weights: keep it until built)."""
    parser = trt.OnnxParser(network, tlog.logger)
    with open(onnx_path, "rb") as f:
        ok = parser.parse(f.read(), onnx_path)
    if not ok:
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise ToolError("TensorRT could not parse %s: %s" % (os.path.basename(onnx_path), "; ".join(errs[:3])),
                        EXIT_ENV)
    return parser


def _set_flags(trt, config, plan):
    for name in plan["flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is None:
            raise ToolError("this TensorRT has no builder flag %s" % name, EXIT_ENV)
        config.set_flag(flag)
    for name in plan["clear_flags"]:
        flag = getattr(trt.BuilderFlag, name, None)
        if flag is not None:
            config.clear_flag(flag)


def make_config(trt, builder, plan, settings):
    """Builder config: workspace, precision flags (TF32 cleared for FP32), DLA core, layer detail."""
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, settings.workspace_mb << 20)
    _set_flags(trt, config, plan)
    if plan["dla_core"] is not None:
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = plan["dla_core"]
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED   # layer placement in the engine inspector
    return config


def check_dla(builder, plan, info):
    """Refuse a DLA build on a device without that DLA core, naming the devices that have one."""
    core = plan["dla_core"]
    if core is None:
        return
    cores = int(builder.num_DLA_cores)
    if cores == 0:
        gpu = (info.get("gpu") or {}).get("name", "this GPU")
        model = (info.get("jetson") or {}).get("model") or gpu
        raise ToolError("DLA core %d requested, but TensorRT %s reports no DLA core on this device (%s)"
                        % (core, info.get("tensorrt", "?"), model), EXIT_ENV, DLA_WHERE + "; build without --dla")
    if core >= cores:
        raise ToolError("DLA core %d requested, this device has %d (cores 0..%d)" % (core, cores, cores - 1),
                        EXIT_USAGE)


def add_profiles(trt, builder, config, network, plan):
    """The batch profile of the (dynamic-batch) input; returns whether the network input is dynamic."""
    inp = network.get_input(0)
    dims = tuple(inp.shape)
    if dims[0] != -1:
        return False
    lo, opt, hi = plan["batch_profile"]
    sample = dims[1:]
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, (lo,) + sample, (opt,) + sample, (hi,) + sample)
    config.add_optimization_profile(profile)
    return True


def attach_calibrator(trt, builder, config, network, cache_bytes, plan):
    """Implicit INT8: the cache served by a calibrator, and a static calibration profile at the opt batch
    (TensorRT calibrates a dynamic network at one shape). Returns the scales added and still missing."""
    cache_bytes, added, missing = complete_cache(trt, network, cache_bytes)
    opt = plan["batch_profile"][1]
    config.int8_calibrator = _cache_calibrator(trt, cache_bytes, opt)
    inp = network.get_input(0)
    if tuple(inp.shape)[0] == -1:
        shape = (opt,) + tuple(inp.shape)[1:]
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, shape, shape, shape)
        config.set_calibration_profile(profile)
    return {"scales_added_for_parser_tensors": added, "tensors_without_scale": missing}


def attach_timing_cache(config, path):
    blob = b""
    if os.path.isfile(path):
        with open(path, "rb") as f:
            blob = f.read()
    config.set_timing_cache(config.create_timing_cache(blob), False)  # (cache, ignore_mismatch)


def serialize(builder, network, config, tlog):
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise ToolError("TensorRT failed to build the engine:\n" + tlog.tail(), EXIT_ENV)
    return serialized


def layer_placement(trt, serialized, tlog, dla_core):
    """Which layers run on DLA and which on the GPU, as TensorRT's engine inspector reports them (DLA
    subgraphs appear as ``{ForeignNode[...]}`` layers); None where the version has no inspector."""
    runtime = trt.Runtime(tlog.logger)
    if dla_core is not None:
        runtime.DLA_core = dla_core
    engine = runtime.deserialize_cuda_engine(serialized)
    if engine is None or not hasattr(engine, "create_engine_inspector"):
        return None
    text = engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON)
    layers = json.loads(text).get("Layers", [])
    out = []
    for layer in layers:
        name = layer if isinstance(layer, str) else layer.get("Name", "")
        kind = "" if isinstance(layer, str) else str(layer.get("LayerType", ""))
        on_dla = "ForeignNode" in name or "ForeignNode" in kind or "DLA" in kind
        out.append({"name": name, "device": "DLA" if on_dla else "GPU"})
    return {"reported_by": "IEngineInspector (JSON, detailed)", "layers": out,
            "dla_layers": sum(1 for x in out if x["device"] == "DLA"),
            "gpu_layers": sum(1 for x in out if x["device"] == "GPU")}


def _device_cache(bundle, plan, trt_version):
    """The bundle's calibration cache with the header of this TensorRT (bytes), or None."""
    if not plan["calibration_cache"]:
        return None
    with open(bundle.path(plan["calibration_cache"]), "rb") as f:
        return reheader_cache(f.read(), trt_version)


def _network_and_config(trt, builder, tlog, bundle, plan, settings, cache_bytes):
    """Steps 1-4 of a build: network, parse, config, profiles (and calibrator); returns what the build needs."""
    network = create_network(trt, builder, plan)
    parser = parse_onnx(trt, network, tlog, bundle.path(plan["onnx"]))
    config = make_config(trt, builder, plan, settings)
    dynamic = add_profiles(trt, builder, config, network, plan)
    calibration = attach_calibrator(trt, builder, config, network, cache_bytes, plan) if cache_bytes else None
    return network, parser, config, dynamic, calibration


def build_engine(bundle, trt, info, settings, log):
    """Build the engine for this device from ``bundle``'s files with ``settings`` (``BuildSettings``);
    returns a dict describing the build (also written as the engine's ``.json`` sidecar)."""
    trt_version = parse_version(trt.__version__)
    plan = build_plan(trt_version, bundle.precision, bundle.files(), settings)
    bundle.check_hashes([plan["onnx"]] + ([plan["calibration_cache"]] if plan["calibration_cache"] else []))
    tag = gpu_tag(info)
    engine_file = settings.engine or engine_name(tag, trt_version)
    timing_cache = settings.timing_cache or "timing.%s-trt%s.cache" % (tag, version_str(trt_version))
    tlog = _Logger(trt, verbose=settings.verbose)
    builder = trt.Builder(tlog.logger)
    check_dla(builder, plan, info)
    cache_bytes = _device_cache(bundle, plan, trt_version)
    cache_file = device_cache_name(trt_version) if cache_bytes else None
    input_name, shape = bundle.input_shape()
    cmd = trtexec_command(plan, engine_file, input_name, shape, settings.workspace_mb, timing_cache, cache_file)
    log("equivalent trtexec command:\n  " + cmd)

    t0 = time.time()
    network, parser, config, dynamic, calibration = _network_and_config(trt, builder, tlog, bundle, plan, settings,
                                                                        cache_bytes)
    attach_timing_cache(config, bundle.path(timing_cache))
    log("building %s engine with TensorRT %s (%s) ..." % (bundle.precision, trt.__version__,
        "strongly typed" if plan["strongly_typed"] else "flags " + ",".join(plan["flags"] or ["none"])))
    serialized = serialize(builder, network, config, tlog)
    seconds = time.time() - t0
    del parser
    placement = layer_placement(trt, serialized, tlog, plan["dla_core"]) if plan["dla_core"] is not None else None
    _check_placement(placement, plan)
    with open(bundle.path(timing_cache), "wb") as f:
        f.write(config.get_timing_cache().serialize())
    if cache_file:  # the copy trtexec --calib reads: same scales, this TensorRT's header
        with open(bundle.path(cache_file), "wb") as f:
            f.write(cache_bytes)
    meta = {"engine": os.path.basename(engine_file), "tensorrt": trt.__version__, "gpu": info.get("gpu"),
            "gpu_tag": tag, "jetson": info.get("jetson"), "precision": bundle.precision, "onnx": plan["onnx"],
            "onnx_sha256": bundle.sha256(plan["onnx"]), "plan": plan, "dynamic_batch": dynamic and not plan["static_shape"],
            "batch_profile": plan["batch_profile"], "dla_core": plan["dla_core"], "placement": placement,
            "calibration_cache": cache_file, "calibration": calibration, "workspace_mb": settings.workspace_mb,
            "timing_cache": os.path.basename(timing_cache), "build_seconds": round(seconds, 2),
            "trtexec_equivalent": cmd, "tool": TOOL_NAME + " " + TOOL_VERSION, "created": _now()}
    write_engine(bundle.path(engine_file), serialized, meta, tlog.lines)
    log("engine written: %s (%.1f MB, built in %.1f s); log %s%s" % (
        meta["engine"], meta["engine_bytes"] / 1e6, seconds, meta["build_log"],
        "; DLA core %d: %d layer(s) on DLA, %d on the GPU" % (plan["dla_core"], placement["dla_layers"],
                                                              placement["gpu_layers"]) if placement else ""))
    return meta


def _check_placement(placement, plan):
    """A DLA build where TensorRT put every layer on the GPU is not a DLA engine: refuse to call it one."""
    if placement is not None and plan["dla_core"] is not None and placement["dla_layers"] == 0:
        raise ToolError("TensorRT placed no layer on DLA core %d (all %d fell back to the GPU)"
                        % (plan["dla_core"], placement["gpu_layers"]), EXIT_ENV,
                        "see the build log for why; build without --dla for a GPU engine")


def write_engine(engine_path, serialized, meta, log_lines):
    """The engine, its ``.json`` sidecar and its build log; adds engine_bytes/engine_sha256/build_log to meta."""
    with open(engine_path, "wb") as f:
        f.write(serialized)
    meta["engine_bytes"] = os.path.getsize(engine_path)
    meta["engine_sha256"] = _sha256(engine_path)
    log_path = engine_path[:-len(".engine")] + ".build.log" if engine_path.endswith(".engine") else engine_path + ".log"
    meta["build_log"] = os.path.basename(log_path)
    write_json(engine_path + ".json", meta)
    with open(log_path, "w") as f:
        f.write("# %s build, %s\n# trtexec equivalent: %s\n" % (TOOL_NAME, meta["created"], meta["trtexec_equivalent"]))
        f.write(json.dumps(plain(dict((k, v) for k, v in meta.items() if k != "trtexec_equivalent")), indent=2) + "\n")
        f.write("\n".join(log_lines) + "\n")


# ------------------------------------------------------------------------------------------ engines
def read_sidecar(engine_path):
    """The ``.json`` sidecar written beside an engine by ``build``, or {}."""
    sidecar = engine_path + ".json"
    if not os.path.isfile(sidecar):
        return {}
    with open(sidecar) as f:
        return json.load(f)


def check_engine_compatible(engine_path, trt_version, info):
    """Refuse, with a clear message, an engine built for another GPU or TensorRT version; returns its sidecar."""
    meta = read_sidecar(engine_path)
    here = "%s with TensorRT %s" % (gpu_tag(info), version_str(trt_version))
    if meta:
        built_v, built_gpu = parse_version(meta.get("tensorrt", "0")), meta.get("gpu_tag")
    else:
        m = re.match(r"^model\.(.+)-trt([\d.]+)\.engine$", os.path.basename(engine_path))
        if not m:
            return meta  # a user-supplied engine without our metadata: TensorRT itself will judge it
        built_gpu, built_v = m.group(1), parse_version(m.group(2))
    if tuple(built_v[:3]) != tuple(trt_version[:3]) or built_gpu != gpu_tag(info):
        raise ToolError("%s was built for %s with TensorRT %s; this device is %s. Engines are tied to the GPU and "
                        "the TensorRT version" % (os.path.basename(engine_path), built_gpu, version_str(built_v), here),
                        EXIT_ENGINE, "rebuild it here: python3 %s build" % TOOL_NAME)
    return meta


class TrtRunner(object):
    """Runs a serialized engine with the name-based API; ``run(x) -> logits``, ``describe()``, ``close()``:
    the call shape of edgecnn's runners (``exporters.runner``), written for Python 3.8 without edgecnn.
    ``dla_core``: the core a DLA engine was built for (the runtime must load it there)."""

    latency_reason = None   # timed where it runs: this is the device

    def __init__(self, engine_path, trt, cuda, max_batch=None, dla_core=None):
        import numpy as np

        self.np, self.trt, self.cuda = np, trt, cuda
        self.buffers, self.stream = {}, None
        free0, _ = cuda.mem_info()
        self._load(engine_path, dla_core)
        self._find_io()
        self._batch_limits(max_batch)
        self.stream = cuda.stream()
        self._allocate()
        self.memory = self._memory(free0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _load(self, engine_path, dla_core):
        t0 = time.time()
        self.tlog = _Logger(self.trt)
        with open(engine_path, "rb") as f:
            data = f.read()
        self.runtime = self.trt.Runtime(self.tlog.logger)
        self.dla_core = dla_core
        if dla_core is not None:
            self.runtime.DLA_core = int(dla_core)
        self.engine = self.runtime.deserialize_cuda_engine(data)
        if self.engine is None:
            raise ToolError("TensorRT could not load %s: %s" % (os.path.basename(engine_path),
                            self.tlog.tail(2).replace("\n", " ") or "incompatible engine"), EXIT_ENGINE,
                            "rebuild it on this device: python3 %s build" % TOOL_NAME)
        self.context = self.engine.create_execution_context()
        self.load_seconds = time.time() - t0

    def _find_io(self):
        mode = self.trt.TensorIOMode.INPUT
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in names if self.engine.get_tensor_mode(n) == mode]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) != mode]
        if len(self.inputs) != 1:
            raise ToolError("expected one input tensor, the engine has %d" % len(self.inputs), EXIT_ENGINE)
        self.input = self.inputs[0]
        self.dtypes = dict((n, numpy_dtype(self.trt, self.engine.get_tensor_dtype(n))) for n in names)

    def _batch_limits(self, max_batch):
        """The batches this engine runs: the profile's [min, max] (one value for a static-shape engine)."""
        shape = tuple(self.engine.get_tensor_shape(self.input))
        self.sample_shape = shape[1:]
        self.dynamic = shape[0] == -1
        if self.dynamic:
            lo, _, hi = self.engine.get_tensor_profile_shape(self.input, 0)
            self.min_batch, self.max_batch = int(lo[0]), int(hi[0])
        else:
            self.min_batch = self.max_batch = int(shape[0])
        if max_batch and self.min_batch < self.max_batch:
            self.max_batch = max(self.min_batch, min(self.max_batch, int(max_batch)))
        self.static_batch = self.max_batch if self.min_batch == self.max_batch else None
        self.batch = None

    def _allocate(self):
        self._set_batch(self.max_batch)
        for name in self.inputs + self.outputs:
            shp = tuple(self.context.get_tensor_shape(name))
            nbytes = int(self.np.prod(shp)) * self.dtypes[name].itemsize
            self.buffers[name] = self.cuda.malloc(nbytes)
            self.context.set_tensor_address(name, self.buffers[name])

    def _memory(self, free_before):
        free1, _ = self.cuda.mem_info()
        dm = getattr(self.engine, "device_memory_size_v2", None)
        if dm is None:
            dm = getattr(self.engine, "device_memory_size", 0)
        return {"engine_device_memory_mb": round(int(dm) / 2.0 ** 20, 2),
                "gpu_memory_used_by_runner_mb": round((free_before - free1) / 2.0 ** 20, 2),
                "note": "free-memory delta around engine load, context and buffers (cudaMemGetInfo); on "
                        "Jetson GPU and CPU share memory, so other processes move it too"}

    def _set_batch(self, b):
        if self.batch == b:
            return
        if self.dynamic and not self.context.set_input_shape(self.input, (b,) + tuple(self.sample_shape)):
            raise ToolError("set_input_shape(%s, batch %d) rejected" % (self.input, b), EXIT_ENGINE)
        self.batch = b

    def enqueue(self):
        if not self.context.execute_async_v3(self.stream):
            raise ToolError("execute_async_v3 failed: %s" % self.tlog.tail(1), EXIT_ENGINE)

    def _run_chunk(self, chunk):
        np = self.np
        self._set_batch(len(chunk))
        self.cuda.h2d(self.buffers[self.input], chunk, self.stream)
        self.enqueue()
        name = self.outputs[0]
        out = np.empty(tuple(self.context.get_tensor_shape(name)), dtype=self.dtypes[name])
        self.cuda.d2h(out, self.buffers[name], self.stream)
        self.cuda.sync(self.stream)
        return out.astype(np.float32).reshape(len(chunk), -1)

    def run(self, x):
        """Logits of ``x`` (N x C x H x W), in chunks of the engine's batch; a static-shape engine's last chunk
        is padded with copies of its last image and the padding's outputs dropped."""
        np = self.np
        outs = []
        for i in range(0, len(x), self.max_batch):
            chunk = np.ascontiguousarray(x[i:i + self.max_batch], dtype=self.dtypes[self.input])
            n = len(chunk)
            if n < self.min_batch:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.min_batch - n, axis=0)])
            outs.append(self._run_chunk(chunk)[:n])
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
        try:
            gpu = self._event_times(start, end, runs, time.time() + max_seconds)
        finally:
            self.cuda.destroy_event(start)
            self.cuda.destroy_event(end)
        e2e, deadline = [], time.time() + max_seconds / 2
        while len(e2e) < max(min(runs, 10), runs // 4) and time.time() < deadline:
            t0 = time.perf_counter()
            self.run(x)
            e2e.append((time.perf_counter() - t0) * 1000.0)
        g = percentiles(gpu)
        g["batch"] = batch
        g["throughput_ips"] = round(batch / (g["p50_ms"] / 1000.0), 1) if g["p50_ms"] > 0 else 0.0
        g["end_to_end_with_copies"] = percentiles(e2e) if e2e else None
        g["timer"] = "CUDA events around execute_async_v3 (GPU time); end_to_end_with_copies: host clock, H2D+run+D2H"
        return g

    def _event_times(self, start, end, runs, deadline):
        times = []
        while len(times) < runs and (not times or time.time() < deadline):
            self.cuda.record(start, self.stream)
            self.enqueue()
            self.cuda.record(end, self.stream)
            times.append(self.cuda.elapsed_ms(start, end))
        return times

    def describe(self):
        return {"runtime": "tensorrt", "version": self.trt.__version__, "api": "name-based (execute_async_v3)",
                "max_batch": self.max_batch, "static_batch": self.static_batch, "dla_core": self.dla_core}

    def close(self):
        for p in self.buffers.values():
            self.cuda.free(p)
        self.buffers = {}
        if self.stream is not None:
            self.cuda.destroy_stream(self.stream)
            self.stream = None
        self.context = self.engine = None


# ------------------------------------------------------------------------------------------ validate
class ValidateSettings(object):
    """How ``validate_engine`` validates and times: the ``validate`` command's options, same defaults."""

    def __init__(self, max_drop=None, min_agreement=None, latency=True, runs=200, warmup=20, throughput_batch=8,
                 max_seconds=20.0):
        # max_drop (percentage points) and min_agreement: None keeps the gate the bundle was exported with
        self.max_drop, self.min_agreement, self.latency, self.runs = max_drop, min_agreement, latency, runs
        self.warmup, self.throughput_batch, self.max_seconds = warmup, throughput_batch, max_seconds

    @classmethod
    def from_args(cls, args):
        return cls(max_drop=args.max_drop, min_agreement=args.min_agreement, latency=not args.no_latency,
                   runs=args.runs, warmup=args.warmup, throughput_batch=args.throughput_batch)


def check_parity(bundle, runner, settings, log):
    inputs, reference = bundle.reference()
    out = runner.run(inputs)
    trained = bool(bundle.manifest.get("weights", {}).get("pretrained"))
    floor = (bundle.manifest.get("parity") or {}).get("fp32_noise_floor")
    p = _parity().judge(reference, out, bundle.precision, trained, labels=bundle.labels(),
                        gate=bundle.gate(settings.max_drop, settings.min_agreement), noise_floor=floor).to_dict()
    log("parity %s: %s | max rel err %.2e, cosine %.6f, SQNR %.1f dB, top-1 agree %.1f%% on %d reference images%s"
        % (p["gate"], "PASS" if p["passed"] else "FAIL", p["max_rel_error"], p["cosine"], p["sqnr_db"],
           p["top1_agreement"] * 100, p["samples"],
           " (static batch %d)" % runner.static_batch if runner.static_batch else ""))
    return p


def measure_latency(runner, settings, info, log):
    """Batch 1 (where the engine runs batch 1) and a throughput batch; a static-shape engine is timed at its
    one batch only."""
    timed = {}
    if runner.min_batch == 1:
        timed[1] = runner.time_gpu(1, warmup=settings.warmup, runs=settings.runs, max_seconds=settings.max_seconds)
    tb = runner.static_batch or min(settings.throughput_batch, runner.max_batch)
    if tb not in timed:
        timed[tb] = runner.time_gpu(tb, warmup=settings.warmup, runs=max(min(settings.runs, 20), settings.runs // 4),
                                    max_seconds=settings.max_seconds)
    latency = {"throughput": timed[tb], "load_seconds": round(runner.load_seconds, 4), "runtime": runner.describe(),
               "memory": runner.memory, "power": detect_power(),
               "machine": {"gpu": info.get("gpu"), "jetson": info.get("jetson")}}
    if 1 in timed:
        latency["batch1"] = timed[1]
        log("latency batch 1 (GPU) p50 %.3f ms, p90 %.3f ms, p99 %.3f ms; batch %d %.0f img/s"
            % (timed[1]["p50_ms"], timed[1]["p90_ms"], timed[1]["p99_ms"], tb, timed[tb]["throughput_ips"]))
    else:
        latency["not_measured"] = "batch 1: this engine runs batch %d only (static shape)" % tb
        log("latency batch %d (GPU) p50 %.3f ms, %.0f img/s" % (tb, timed[tb]["p50_ms"], timed[tb]["throughput_ips"]))
    return latency


def validate_engine(bundle, trt, cuda, info, engine_path, settings, log):
    """Parity of the engine on the bundle's reference images, then (``settings.latency``) its latency."""
    if not os.path.isfile(engine_path):
        raise ToolError("no engine at %s" % engine_path, EXIT_USAGE, "build it first: python3 %s build" % TOOL_NAME)
    meta = check_engine_compatible(engine_path, parse_version(trt.__version__), info)
    with TrtRunner(engine_path, trt, cuda, dla_core=meta.get("dla_core")) as runner:
        parity = check_parity(bundle, runner, settings, log)
        latency = measure_latency(runner, settings, info, log) if settings.latency else None
        return {"engine": os.path.basename(engine_path), "engine_sha256": _sha256(engine_path), "parity": parity,
                "latency": latency, "runtime": runner.describe(), "onnx": meta.get("onnx"),
                "dla_core": meta.get("dla_core"), "placement": meta.get("placement")}


# ------------------------------------------------------------------------------------------ results
def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _now():
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def plain(obj):
    """``obj`` with every NumPy scalar or array turned into plain Python (strict JSON has no NumPy types)."""
    if isinstance(obj, dict):
        return dict((str(k), plain(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return [plain(v) for v in obj]
    if type(obj).__module__ == "numpy":
        return plain(obj.tolist())
    return obj


def write_json(path, obj):
    """Write ``obj`` as JSON atomically (a temporary file renamed over ``path``): never half a file."""
    text = json.dumps(plain(obj), indent=2, allow_nan=False)
    tmp = "%s.%d.tmp" % (path, os.getpid())
    with open(tmp, "w") as f:
        f.write(text + "\n")
    os.replace(tmp, path)


def results_record(bundle, info, build, validation):
    files = bundle.manifest.get("files", {})
    return {"schema": RESULTS_SCHEMA, "tool": TOOL_NAME + " " + TOOL_VERSION, "created": _now(),
            "bundle": {"arch": bundle.manifest.get("arch"), "target": "trt", "precision": bundle.precision,
                       "onnx_sha256": dict((k, v.get("sha256")) for k, v in files.items() if k.endswith(".onnx"))},
            "device": info, "build": build, "validation": validation,
            "status": ("validated" if validation and validation["parity"]["passed"] else
                       "failed" if validation else "built")}


# ------------------------------------------------------------------------------------------ CLI
def _build_options():
    b = argparse.ArgumentParser(add_help=False)
    b.add_argument("--dla", type=int, default=None, metavar="CORE",
                   help="build for DLA core N, with GPU fallback (static shape: see --batch)")
    b.add_argument("--batch", type=int, default=None, help="static-shape engine of this batch (DLA: default 1)")
    b.add_argument("--int8-mode", choices=("auto", "explicit", "implicit"), default="auto",
                   help="INT8: explicit Q/DQ model (default), or implicit from calibration.cache (TensorRT <= 10; "
                        "the default with --dla)")
    b.add_argument("--no-fp16-fallback", action="store_true", help="INT8: keep float layers in FP32, not FP16")
    b.add_argument("--workspace-mb", type=int, default=1024, help="builder workspace in MiB (default 1024)")
    b.add_argument("--timing-cache", default=None, help="timing cache file (default timing.<gpu>-trt<ver>.cache)")
    b.add_argument("--min-batch", type=int, default=1)
    b.add_argument("--opt-batch", type=int, default=1)
    b.add_argument("--max-batch", type=int, default=8, help="optimization profile maximum batch (default 8)")
    return b


def _validate_options():
    v = argparse.ArgumentParser(add_help=False)
    v.add_argument("--runs", type=int, default=200, help="timed batch-1 runs (default 200)")
    v.add_argument("--warmup", type=int, default=20, help="untimed runs before timing (default 20)")
    v.add_argument("--throughput-batch", type=int, default=8)
    v.add_argument("--no-latency", action="store_true")
    v.add_argument("--max-drop", type=float, default=None, metavar="POINTS",
                   help="INT8 gate: most top-1 accuracy lost, percentage points (default: the bundle's, 1.0)")
    v.add_argument("--min-agreement", type=float, default=None, metavar="FRACTION",
                   help="opt-in stricter INT8 gate on top-1 agreement (default: the bundle's, none)")
    v.add_argument("--results", default=None, help="results JSON path (default results.<gpu>-trt<ver>.json)")
    return v


def build_parser():
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(prog=TOOL_NAME, description="Build, validate and benchmark an edgecnn TensorRT bundle "
                                "on this device (Python >= 3.8, NumPy, TensorRT; no torch).")
    p.add_argument("--bundle", default=here, help="bundle folder (default: the folder this script is in)")
    p.add_argument("--verbose", action="store_true")
    sub = p.add_subparsers(dest="command")
    sub.add_parser("check", help="JetPack / TensorRT / Python / GPU / DLA detection")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--engine", default=None, help="engine file (default model.<gpu>-trt<version>.engine)")
    b, v = _build_options(), _validate_options()
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


def readiness_problems(info):
    problems = []
    if sys.version_info < (3, 8):
        problems.append("Python %s < 3.8" % platform.python_version())
    if not info.get("numpy"):
        problems.append("NumPy missing")
    if not info.get("tensorrt"):
        problems.append("TensorRT missing (%s)" % info.get("tensorrt_error"))
    if not info.get("gpu"):
        problems.append("no CUDA GPU (%s)" % info.get("cuda_error", "?"))
    return problems


def cmd_check(args):
    info = detect()
    _log(json.dumps(plain(info), indent=2))
    problems = readiness_problems(info)
    if problems:
        _log("NOT READY: " + "; ".join(problems))
        return EXIT_ENV
    _log("READY: TensorRT %s on %s (%s); DLA: %s" % (info["tensorrt"], info["gpu"]["name"], gpu_tag(info),
                                                    info.get("dla", "?")))
    return EXIT_OK


class _Session(object):
    """What build and validate share in one command: TensorRT, CUDA, the bundle and the device facts."""

    def __init__(self, args):
        self.trt = _require_trt()
        self.bundle = Bundle.open(args.bundle)
        self.cuda = Cuda()
        self.info = detect(self.trt, self.cuda)
        if not self.info.get("gpu"):
            raise ToolError("no CUDA GPU usable (%s)" % self.info.get("cuda_error", "?"), EXIT_ENV)
        self.version = parse_version(self.trt.__version__)

    def engine_path(self, engine):
        return self.bundle.path(engine or engine_name(gpu_tag(self.info), self.version))


def cmd_build(args, session=None):
    s = session or _Session(args)
    return build_engine(s.bundle, s.trt, s.info, BuildSettings.from_args(args), _log)


def cmd_validate(args, session=None, build=None):
    s = session or _Session(args)
    validation = validate_engine(s.bundle, s.trt, s.cuda, s.info, s.engine_path(args.engine),
                                 ValidateSettings.from_args(args), _log)
    res = results_record(s.bundle, s.info, build, validation)
    path = args.results or s.bundle.path("results.%s-trt%s.json" % (gpu_tag(s.info), version_str(s.version)))
    write_json(path, res)
    _log("results: %s (status %s). Bring it back and run: edgecnn merge-results <bundle> %s"
         % (path, res["status"], os.path.basename(path)))
    return EXIT_OK if validation["parity"]["passed"] else EXIT_GATE


def cmd_all(args):
    s = _Session(args)
    _log("device: %s | TensorRT %s | Python %s | JetPack %s | DLA %s" % (
        s.info["gpu"].get("name"), s.info.get("tensorrt"), s.info.get("python"),
        s.info.get("jetson", {}).get("jetpack", "n/a (not a Jetson)"), s.info.get("dla", "?")))
    build = cmd_build(args, s)
    args.engine = args.engine or build["engine"]
    return cmd_validate(args, s, build)


def run_command(args):
    """Run the parsed command; returns the exit code (ToolError propagates)."""
    if args.command == "check":
        return cmd_check(args)
    if args.command == "build":
        cmd_build(args)
        return EXIT_OK
    if args.command == "validate":
        return cmd_validate(args)
    return cmd_all(args)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return EXIT_USAGE
    try:
        return run_command(args)
    except ToolError as exc:
        sys.stderr.write("error: %s%s\n" % (exc, (" (" + exc.hint + ")") if exc.hint else ""))
        return exc.code
    except KeyboardInterrupt:
        sys.stderr.write("interrupted\n")
        return 130


if __name__ == "__main__":
    sys.exit(main())
