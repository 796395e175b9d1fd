"""Shared by the stand-in's modules: the version and device this process emulates, version-gated objects,
enums, logging through the caller's ``ILogger``, and the record of calls written out at exit."""
from __future__ import annotations

import atexit
import json
import os

from . import facts


class Current:
    version = None        # tuple, e.g. (8, 5, 2, 2)
    version_text = ""
    device = None         # a key of facts.DEVICES
    trace = []            # calls worth asserting on: (what, detail)


def trace(what, detail=None):
    Current.trace.append([what, detail])


class Versioned:
    """An API object whose version-dependent members (``facts.OBJECT_MEMBERS``) exist only in the versions
    that have them: elsewhere reading or setting one raises AttributeError, as the bindings do."""

    API_NAME = ""

    def _gate(self, name):
        span = facts.OBJECT_MEMBERS.get("%s.%s" % (type(self).API_NAME, name))
        if span is not None and not facts.has(span, Current.version):
            raise AttributeError("'tensorrt.%s' object has no attribute '%s' (TensorRT %s)"
                                 % (type(self).API_NAME, name, Current.version_text))

    def __getattribute__(self, name):
        if not name.startswith("_"):
            object.__getattribute__(self, "_gate")(name)
        return object.__getattribute__(self, name)

    def __setattr__(self, name, value):
        if not name.startswith("_"):
            self._gate(name)
            if not hasattr(type(self), name):
                raise AttributeError("'tensorrt.%s' object has no attribute '%s'" % (type(self).API_NAME, name))
        object.__setattr__(self, name, value)


class EnumValue:
    def __init__(self, enum, name, value):
        self.enum, self.name, self.value = enum, name, value

    def __int__(self):
        return self.value

    __index__ = __int__

    def __eq__(self, other):
        return isinstance(other, EnumValue) and (other.enum, other.value) == (self.enum, self.value)

    def __hash__(self):
        return hash((self.enum, self.value))

    def __repr__(self):
        return "<%s.%s: %d>" % (self.enum, self.name, self.value)

    __str__ = lambda self: "%s.%s" % (self.enum, self.name)  # noqa: E731


def make_enum(name, version):
    """The enum ``name`` as this version's bindings have it: absent members are not attributes at all."""
    members = {}
    for i, (member, span) in enumerate(facts.ENUM_MEMBERS[name].items()):
        if facts.has(span, version):
            members[member] = EnumValue(name, member, facts.FLAG_VALUES.get(member, i) if
                                        name == "NetworkDefinitionCreationFlag" else i)
    cls = type(name, (), dict(members))
    cls.__members__ = members
    return cls


class Logged:
    """Sends messages to the ``ILogger`` the caller gave, with that version's severities."""

    def __init__(self, logger, severity_enum):
        if not getattr(logger, "_standin_init", False):
            raise TypeError("tensorrt.ILogger.__init__() must be called when overriding __init__")
        self._logger, self._sev = logger, severity_enum

    def __call__(self, level, msg):
        self._logger.log(getattr(self._sev, level), msg)


def write_report():
    """At exit: the trace and the CUDA handles left over, for the tests (EDGECNN_TRT_STANDIN_REPORT)."""
    path = os.environ.get("EDGECNN_TRT_STANDIN_REPORT")
    if not path:
        return
    from .cudart import STATE

    with open(path, "w") as f:
        json.dump({"version": Current.version_text, "device": Current.device, "trace": Current.trace,
                   "cuda_leftovers": STATE.leftovers(), "cuda_failed_calls": STATE.calls}, f, indent=1)


atexit.register(write_report)
