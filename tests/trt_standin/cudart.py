"""A stand-in for libcudart, reached exactly as the tool reaches the real one: through ``ctypes.CDLL``.

``install()`` makes ``ctypes.CDLL`` answer a libcudart request as the dynamic loader would: an absolute path
to an existing ``libcudart.so*`` file, or a bare ``libcudart.so*`` name present in a folder on
``LD_LIBRARY_PATH``; anything else fails with ``OSError`` like a missing library. What it returns behaves like
a ``ctypes.CDLL`` of the CUDA runtime for the calls the tool makes: ``argtypes``/``restype`` are set on each
function and every call is converted by them as ctypes would (a wrong argument raises
``ctypes.ArgumentError``); device memory is host memory at real addresses, so ``cudaMemcpyAsync`` moves the
bytes a TensorRT stand-in engine then reads; streams and events are handles that must be created before use
and destroyed after (``STATE`` counts what is left at exit).
"""
from __future__ import annotations

import ctypes
import os
import time

from . import facts

SUCCESS, INVALID_VALUE, INVALID_HANDLE = 0, 1, 400
ERRORS = {SUCCESS: b"no error", INVALID_VALUE: b"invalid argument", INVALID_HANDLE: b"invalid resource handle"}


class State:
    """Device memory, streams and events of this process."""

    def __init__(self):
        self.allocations = {}      # address -> ctypes buffer
        self.streams = set()
        self.events = {}           # handle -> recorded time (s) or None
        self.next_handle = 0x1000
        self.calls = []            # (function, status) of failed calls
        self.device = None

    def handle(self):
        self.next_handle += 16
        return self.next_handle

    def region(self, address, nbytes):
        """The allocation holding [address, address + nbytes), or None."""
        for start, buf in self.allocations.items():
            if start <= address and address + nbytes <= start + ctypes.sizeof(buf):
                return buf
        return None

    def leftovers(self):
        return {"allocations": len(self.allocations), "streams": len(self.streams), "events": len(self.events)}


STATE = State()


class _Function:
    """One exported function: settable ``argtypes``/``restype``, arguments converted through them."""

    def __init__(self, name, impl):
        self.__name__, self.impl = name, impl
        self.argtypes, self.restype = None, ctypes.c_int

    def __call__(self, *args):
        if self.argtypes is None:
            raise AssertionError("%s called before its argtypes were set (the tool always sets them)" % self.__name__)
        if len(args) != len(self.argtypes):
            raise TypeError("this function takes %d arguments (%d given)" % (len(self.argtypes), len(args)))
        converted = []
        for i, (arg, kind) in enumerate(zip(args, self.argtypes)):
            try:
                kind.from_param(arg)
            except TypeError as exc:
                raise ctypes.ArgumentError("argument %d: %s" % (i + 1, exc))
            converted.append(arg)
        status = self.impl(*converted)
        if status:
            STATE.calls.append((self.__name__, status))
        return status


def _value(arg):
    """The integer behind a ctypes argument (c_void_p, c_size_t, int)."""
    value = arg.value if hasattr(arg, "value") else arg
    return int(value or 0)


def _target(ref):
    """The ctypes object a ``byref()`` or ``pointer()`` argument points at."""
    return ref._obj if hasattr(ref, "_obj") else ref.contents


class Library:
    """The functions of libcudart the tool calls, with the CUDA runtime's semantics."""

    def __init__(self, device):
        self._device = facts.DEVICES[device]
        STATE.device = device
        for name in dir(self):
            if name.startswith("_cuda"):
                setattr(self, name[1:], _Function(name[1:], getattr(self, name)))

    def _cudaGetErrorString(self, status):
        return ERRORS.get(status, b"unknown error")

    def _cudaGetDeviceCount(self, out):
        _target(out).value = 1
        return SUCCESS

    def _cudaSetDevice(self, device):
        return SUCCESS if device == 0 else INVALID_VALUE

    def _cudaDeviceGetAttribute(self, out, attr, device):
        values = {75: self._device["cc"][0], 76: self._device["cc"][1], 18: int(self._device["integrated"])}
        if device != 0 or attr not in values:
            return INVALID_VALUE
        _target(out).value = values[attr]
        return SUCCESS

    def _cudaGetDeviceProperties(self, buf, device):
        return self._cudaGetDeviceProperties_v2(buf, device)

    def _cudaGetDeviceProperties_v2(self, buf, device):
        ctypes.memmove(buf, self._device["name"].encode() + b"\x00", len(self._device["name"]) + 1)
        return SUCCESS

    def _cudaRuntimeGetVersion(self, out):
        _target(out).value = 12020
        return SUCCESS

    def _cudaDriverGetVersion(self, out):
        _target(out).value = 12020
        return SUCCESS

    def _cudaMemGetInfo(self, free, total):
        used = sum(ctypes.sizeof(b) for b in STATE.allocations.values())
        total_bytes = self._device["memory_mb"] << 20
        _target(total).value = total_bytes
        _target(free).value = total_bytes // 2 - used
        return SUCCESS

    def _cudaMalloc(self, out, nbytes):
        n = _value(nbytes)
        if n <= 0:
            return INVALID_VALUE
        buf = (ctypes.c_char * n)()
        address = ctypes.addressof(buf)
        STATE.allocations[address] = buf
        _target(out).value = address
        return SUCCESS

    def _cudaFree(self, ptr):
        return SUCCESS if STATE.allocations.pop(_value(ptr), None) is not None else INVALID_VALUE

    def _cudaMemcpyAsync(self, dst, src, nbytes, kind, stream):
        if _value(stream) not in STATE.streams:
            return INVALID_HANDLE
        return self._copy(dst, src, nbytes, kind)

    def _cudaMemcpy(self, dst, src, nbytes, kind):
        return self._copy(dst, src, nbytes, kind)

    def _copy(self, dst, src, nbytes, kind):
        n, d, s = _value(nbytes), _value(dst), _value(src)
        device_side = (d, n) if kind == 1 else (s, n) if kind == 2 else None
        if device_side is None or STATE.region(*device_side) is None:
            return INVALID_VALUE
        ctypes.memmove(d, s, n)
        return SUCCESS

    def _cudaDeviceSynchronize(self):
        return SUCCESS

    def _cudaStreamCreate(self, out):
        h = STATE.handle()
        STATE.streams.add(h)
        _target(out).value = h
        return SUCCESS

    def _cudaStreamSynchronize(self, stream):
        return SUCCESS if _value(stream) in STATE.streams else INVALID_HANDLE

    def _cudaStreamDestroy(self, stream):
        h = _value(stream)
        if h not in STATE.streams:
            return INVALID_HANDLE
        STATE.streams.discard(h)
        return SUCCESS

    def _cudaEventCreate(self, out):
        h = STATE.handle()
        STATE.events[h] = None
        _target(out).value = h
        return SUCCESS

    def _cudaEventRecord(self, event, stream):
        e = _value(event)
        if e not in STATE.events or _value(stream) not in STATE.streams:
            return INVALID_HANDLE
        STATE.events[e] = time.perf_counter()
        return SUCCESS

    def _cudaEventSynchronize(self, event):
        return SUCCESS if _value(event) in STATE.events else INVALID_HANDLE

    def _cudaEventElapsedTime(self, out, start, end):
        a, b = STATE.events.get(_value(start)), STATE.events.get(_value(end))
        if a is None or b is None:
            return INVALID_HANDLE
        _target(out).value = (b - a) * 1000.0
        return SUCCESS

    def _cudaEventDestroy(self, event):
        return SUCCESS if STATE.events.pop(_value(event), "gone") != "gone" else INVALID_HANDLE


def _resolves(name: str) -> bool:
    """Whether the dynamic loader of the emulated device would find ``name`` (a libcudart path or bare name).
    The device's file system is the folder ``EDGECNN_TRT_STANDIN_LIBROOT``: a libcudart of the machine running
    the tests (a CUDA toolkit without a GPU) is not the device's."""
    base = os.path.basename(name)
    root = os.environ.get("EDGECNN_TRT_STANDIN_LIBROOT")
    if not base.startswith("libcudart.so") or not root:
        return False
    root = os.path.realpath(root)
    if os.path.isabs(name):
        return os.path.isfile(name) and os.path.realpath(name).startswith(root + os.sep)
    dirs = [d for d in os.environ.get("LD_LIBRARY_PATH", "").split(os.pathsep) if d]
    return any(os.path.isfile(os.path.join(d, base)) and os.path.realpath(d).startswith(root + os.sep) for d in dirs)


def install(device: str) -> None:
    """Make ``ctypes.CDLL`` load this stand-in for libcudart (and the real library for anything else)."""
    real = ctypes.CDLL
    if getattr(real, "standin", False):
        return

    class CDLL(real):
        standin = True

        def __new__(cls, name, *args, **kwargs):
            base = os.path.basename(str(name))
            if base.startswith("libcudart"):
                if not _resolves(str(name)):
                    raise OSError("%s: cannot open shared object file: No such file or directory" % name)
                return Library(device)
            return real(name, *args, **kwargs)

    ctypes.CDLL = CDLL
