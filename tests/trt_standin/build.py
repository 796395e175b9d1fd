"""Builder, builder config, optimization profiles and the engine build of the stand-in.

A build enforces what TensorRT documents and what it does when a rule is broken: precision flags only on
weakly typed networks (and, on 8.x / weakly typed 10.x, the INT8 flag for a Q/DQ network); an optimization
profile for a dynamic input; DLA only for FP16/INT8 layers, on an existing core, with static shapes (with
GPU fallback a dynamic-shape DLA build puts every layer on the GPU, as the developer guide warns); implicit
INT8 only through a calibrator whose cache header matches this version, with a static calibration profile
for a dynamic network. The serialized engine carries the ONNX model, the shapes, the layer placement and
whether TF32 stayed on; ``engine.py`` runs it.
"""
from __future__ import annotations

import json

from . import facts
from .api import Current, Logged, Versioned, trace

MAGIC = b"EDGECNN-TRT-STANDIN-ENGINE\n"


class IHostMemory(bytes):
    @property
    def nbytes(self):
        return len(self)


class ITimingCache(Versioned):
    API_NAME = "ITimingCache"

    def __init__(self, blob):
        self._blob = bytes(blob)

    def serialize(self):
        return IHostMemory(("standin-timing-cache %s\n" % Current.version_text).encode())


class IOptimizationProfile(Versioned):
    API_NAME = "IOptimizationProfile"

    def __init__(self):
        self._shapes = {}

    def set_shape(self, name, min, opt, max):  # noqa: A002 (the bindings' argument names)
        shapes = [tuple(int(d) for d in s) for s in (min, opt, max)]
        if not all(a <= b <= c for a, b, c in zip(*shapes)):
            raise ValueError("profile for %s must satisfy min <= opt <= max" % name)
        self._shapes[name] = shapes
        trace("profile.set_shape", [name] + [list(s) for s in shapes])

    def get_shape(self, name):
        return self._shapes[name]


class IBuilderConfig(Versioned):
    API_NAME = "IBuilderConfig"

    def __init__(self):
        self._flags = {"TF32"}                        # on by default in every version
        self._device_type = Current.trt.DeviceType.GPU
        self._dla_core = -1
        self._profiles, self._calibration_profile, self._calibrator = [], None, None
        self._timing_cache = None
        self._verbosity = Current.trt.ProfilingVerbosity.LAYER_NAMES_ONLY
        self._pools = {}

    def _flag_name(self, flag):
        if not (hasattr(flag, "enum") and flag.enum == "BuilderFlag"):
            raise TypeError("set_flag(): incompatible function arguments (a tensorrt.BuilderFlag is needed)")
        return flag.name

    def set_flag(self, flag):
        self._flags.add(self._flag_name(flag))
        trace("config.set_flag", flag.name)

    def clear_flag(self, flag):
        self._flags.discard(self._flag_name(flag))
        trace("config.clear_flag", flag.name)

    def get_flag(self, flag):
        return self._flag_name(flag) in self._flags

    def set_memory_pool_limit(self, pool, size):
        self._pools[pool.name] = int(size)

    def get_memory_pool_limit(self, pool):
        return self._pools.get(pool.name, 1 << 40)

    def add_optimization_profile(self, profile):
        self._profiles.append(profile)
        return len(self._profiles) - 1

    num_optimization_profiles = property(lambda self: len(self._profiles))

    def set_calibration_profile(self, profile):
        self._calibration_profile = profile
        trace("config.set_calibration_profile", {k: v for k, v in profile._shapes.items()})
        return True

    def get_calibration_profile(self):
        return self._calibration_profile

    def create_timing_cache(self, serialized_timing_cache):
        return ITimingCache(serialized_timing_cache)

    def set_timing_cache(self, cache, ignore_mismatch):
        if not isinstance(ignore_mismatch, bool):
            raise TypeError("set_timing_cache(): ignore_mismatch must be a bool")
        self._timing_cache = cache
        return True

    def get_timing_cache(self):
        return self._timing_cache

    def _set_device_type(self, value):
        self._device_type = value
        trace("config.default_device_type", value.name)

    def _set_dla_core(self, value):
        self._dla_core = int(value)
        trace("config.DLA_core", self._dla_core)

    def _set_calibrator(self, value):
        self._calibrator = value
        trace("config.int8_calibrator", type(value).__name__)

    def _set_verbosity(self, value):
        self._verbosity = value

    default_device_type = property(lambda self: self._device_type, _set_device_type)
    DLA_core = property(lambda self: self._dla_core, _set_dla_core)
    int8_calibrator = property(lambda self: self._calibrator, _set_calibrator)
    profiling_verbosity = property(lambda self: self._verbosity, _set_verbosity)
    max_workspace_size = property(lambda self: self._pools.get("WORKSPACE", 0),
                                  lambda self, v: self._pools.__setitem__("WORKSPACE", int(v)))


class Builder(Versioned):
    API_NAME = "Builder"

    def __init__(self, logger):
        self._log = Logged(logger, Current.trt.ILogger.Severity)

    num_DLA_cores = property(lambda self: facts.dla_cores(Current.version, Current.device))
    platform_has_fast_fp16 = property(lambda self: True)
    platform_has_fast_int8 = property(lambda self: True)
    max_batch_size = property(lambda self: 1)

    def create_network(self, flags=0):
        from .network import INetworkDefinition

        trt = Current.trt
        known = dict((int(v), k) for k, v in trt.NetworkDefinitionCreationFlag.__members__.items())
        names = [known.get(bit) for bit in range(32) if flags & (1 << bit)]
        if None in names:
            self._log("ERROR", "create_network: unknown NetworkDefinitionCreationFlag bits in %#x" % flags)
            return None
        trace("builder.create_network", sorted(names))
        explicit = "EXPLICIT_BATCH" in names or Current.version[0] >= 10
        strongly_typed = "STRONGLY_TYPED" in names or Current.version[0] >= 11   # 11: weak typing is gone
        return INetworkDefinition(explicit, strongly_typed, trt)

    def create_builder_config(self):
        return IBuilderConfig()

    def create_optimization_profile(self):
        return IOptimizationProfile()

    def build_engine(self, network, config):
        raise AssertionError("Builder.build_engine is not modelled: the tool builds with build_serialized_network")

    def build_serialized_network(self, network, config):
        try:
            header = _build(network, config, self._log)
        except BuildError as exc:
            self._log("ERROR", str(exc))
            return None
        return IHostMemory(MAGIC + json.dumps(header).encode() + b"\n" + network._onnx)


class BuildError(Exception):
    pass


def _build(network, config, log):
    if network._onnx is None or not network._outputs:
        raise BuildError("Network must have at least one output (was the ONNX model parsed?)")
    _check_typing(network, config)
    profiles = _profiles(network, config)
    precisions = _precisions(network, config)
    calibration = _calibrate(network, config, precisions, log) if _implicit_int8(network, config) else None
    placement = _placement(network, config, profiles, precisions, log)
    fp32 = any(p == "FP32" for p in precisions.values())
    tf32 = "TF32" in config._flags and fp32 and facts.DEVICES[Current.device]["cc"] >= (8, 0)
    inp = network.get_input(0)
    return {"version": Current.version_text, "device": Current.device, "input": inp.name, "dims": list(inp.shape),
            "outputs": [t.name for t in network._outputs], "profiles": profiles, "tf32": tf32,
            "dla_core": config._dla_core if placement["dla"] else None, "placement": placement["layers"],
            "strongly_typed": network._strongly_typed, "calibration": calibration,
            "verbosity": config._verbosity.name}


def _check_typing(network, config):
    weak = {"FP16", "INT8", "BF16", "FP8"} & config._flags
    if network._strongly_typed and weak:
        raise BuildError("BuilderFlag %s cannot be set for a strongly typed network" % ", ".join(sorted(weak)))
    has_qdq = any(layer._op in ("QuantizeLinear", "DequantizeLinear") for layer in network._layers)
    if has_qdq and not network._strongly_typed and "INT8" not in config._flags:
        raise BuildError("the network has Q/DQ layers: explicit quantization needs BuilderFlag.INT8 on this "
                         "weakly typed network")


def _profiles(network, config):
    """[min, opt, max] shapes of the input per profile; refuses a dynamic input without one."""
    inp = network.get_input(0)
    if -1 not in inp.shape:
        return [[list(inp.shape)] * 3]
    if not config._profiles:
        raise BuildError("Network has dynamic or shape inputs, but no optimization profile has been defined.")
    out = []
    for p in config._profiles:
        if inp.name not in p._shapes:
            raise BuildError("optimization profile has no shape for input %s" % inp.name)
        shapes = p._shapes[inp.name]
        for s in shapes:
            if len(s) != len(inp.shape) or any(d != -1 and d != e for d, e in zip(inp.shape, s)):
                raise BuildError("profile shape %s does not fit input %s %s" % (s, inp.name, inp.shape))
        out.append([list(s) for s in shapes])
    return out


def _quantized(network, layer):
    """A layer TensorRT runs in INT8 in explicit quantization: Q/DQ, or a Conv/Gemm fed by a DQ."""
    if layer._op in ("QuantizeLinear", "DequantizeLinear"):
        return True
    if layer._op in ("Conv", "Gemm") and layer.num_inputs:
        src = network._producer.get(layer.get_input(0).name)
        return src is not None and src._op == "DequantizeLinear"
    return False


def _precisions(network, config):
    """{layer name: FP32 | FP16 | INT8} as the build would choose them."""
    trt, out = Current.trt, {}
    implicit = _implicit_int8(network, config)
    for layer in network._layers:
        if layer.num_outputs and layer.get_output(0).dtype == trt.DataType.HALF:
            out[layer.name] = "FP16"
        elif _quantized(network, layer) or (implicit and layer._op in ("Conv", "Gemm")):
            out[layer.name] = "INT8"
        elif not network._strongly_typed and "FP16" in config._flags:
            out[layer.name] = "FP16"
        else:
            out[layer.name] = "FP32"
    return out


def _implicit_int8(network, config):
    return (not network._strongly_typed and "INT8" in config._flags and config._calibrator is not None
            and not any(layer._op == "QuantizeLinear" for layer in network._layers))


def _calibrate(network, config, precisions, log):
    """Implicit INT8 from the calibrator: a cache of this version's header, or calibration data."""
    cal = config._calibrator
    if not getattr(cal, "_standin_init", False):
        raise BuildError("IInt8EntropyCalibrator2.__init__() was not called by the calibrator subclass")
    if -1 in network.get_input(0).shape:
        if config._calibration_profile is None:
            log("WARNING", "Calibration Profile is not defined. Calibrating with Profile 0")
        else:
            shapes = list(config._calibration_profile._shapes.values())[0]
            if not shapes[0] == shapes[1] == shapes[2]:
                raise BuildError("the calibration profile must be static (min = opt = max)")
    cache = cal.read_calibration_cache()
    header = "TRT-%d-" % facts.cache_header_version(Current.version)
    text = bytes(cache).decode("ascii") if cache else ""
    if not text.startswith(header):
        log("WARNING", "calibration cache header %r does not match this TensorRT (%s...): cache ignored"
            % (text.split("\n", 1)[0], header))
        if cal.get_batch([network.get_input(0).name]) is None:
            raise BuildError("Calibration failure occurred with no scaling factors detected. This could be due to "
                             "no int8 calibrator or insufficient custom scales for network layers.")
        raise BuildError("calibration from data is not modelled by the stand-in")
    scales = {ln.rpartition(":")[0] for ln in text.splitlines()[1:] if ":" in ln}
    missing = [t.name for layer in network._layers for t in layer._outputs
               if t.name not in scales and t.dtype == Current.trt.DataType.FLOAT]
    for name in missing:
        log("WARNING", "Missing scale and zero-point for tensor %s, expect fall back to non-int8 implementation "
                       "for any layer consuming or producing given tensor" % name)
    trace("calibration.cache", {"tensors": len(scales), "missing": len(missing)})
    return {"tensors": len(scales), "missing": missing}


def _placement(network, config, profiles, precisions, log):
    """{"dla": bool, "layers": [[name, device, precision, op]]}: DLA for FP16/INT8 layers of DLA ops with
    static shapes, the rest on the GPU with GPU fallback (a build error without it)."""
    dla = config._device_type == Current.trt.DeviceType.DLA
    fallback = "GPU_FALLBACK" in config._flags
    if dla:
        cores = facts.dla_cores(Current.version, Current.device)
        if not 0 <= config._dla_core < cores:
            raise BuildError("Cannot create DLA engine, DLA core %d not available (%d core(s))" % (config._dla_core, cores))
        static = all(p[0] == p[2] for p in profiles)
        if not static:
            if not fallback:
                raise BuildError("DLA requires static shapes (min = opt = max) for every input")
            log("WARNING", "DLA does not support dynamic shapes: every layer falls back to the GPU")
            dla = False
    layers = []
    for layer in network._layers:
        on_dla = dla and layer._op in facts.DLA_OPS and precisions[layer.name] in ("FP16", "INT8")
        if dla and not on_dla and not fallback:
            raise BuildError("layer %s cannot run on DLA and GPU fallback is off" % layer.name)
        layers.append([layer.name, "DLA" if on_dla else "GPU", precisions[layer.name], layer._op])
    return {"dla": dla and any(entry[1] == "DLA" for entry in layers), "layers": layers}
