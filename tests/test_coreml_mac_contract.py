"""CONTRACT TEST of the macOS validation path (``edgecnn validate`` of a Core ML bundle on a Mac, then
``edgecnn merge-results``) against coremltools' documented runtime API. Not a validation of Core ML.

The Core ML runtime exists only on macOS, and this path has not been run on a Mac by us. What is tested here:

1. our calls bind to the signatures and data classes of the installed coremltools (``MLModel``, ``predict``,
   ``get_compiled_model_path``, ``MLComputePlan`` and its structure/usage/cost classes, ``ComputeUnit``);
2. with stand-ins that have exactly those members (checked against the real classes in this file), the whole
   path runs: three compute units, the results file next to the bundle, the merge that re-judges the raw
   outputs with ``exporters.parity`` and refuses results of another bundle or outputs that miss the gate.

The stand-ins compute with the reference executor, so any "validated" here is the executor's, never Core ML's;
they live only in this test and are never shipped.
"""
from __future__ import annotations

import dataclasses
import inspect
import json

import numpy as np
import pytest

from edgecnn import artefact, coreml_results, pipeline
from edgecnn.cli import main as cli_main
from edgecnn.errors import GateFailed, IntegrityError
from edgecnn.options import CoreMLOptions
from edgecnn.targets import ExportOptions
from exporters.coreml import runner as coreml_runner
from exporters.coreml.export import import_coremltools
from exporters.coreml.mil_reference import CoreMLProgram

ct = import_coremltools()
from coremltools.models import compute_device, compute_plan  # noqa: E402


# ------------------------------------------------------------------ 1. the documented API our calls bind to
def test_our_calls_bind_to_coremltools_signatures():
    inspect.signature(ct.models.MLModel.__init__).bind(object(), "Model.mlpackage",
                                                       compute_units=ct.ComputeUnit.CPU_AND_NE)
    inspect.signature(ct.models.MLModel.predict).bind(object(), {"image": None})
    inspect.signature(ct.models.MLModel.get_compiled_model_path).bind(object())
    inspect.signature(compute_plan.MLComputePlan.load_from_path).bind(path="Model.mlmodelc",
                                                                     compute_units=ct.ComputeUnit.CPU_ONLY)
    for name in ("get_compute_device_usage_for_mlprogram_operation", "get_estimated_cost_for_mlprogram_operation"):
        inspect.signature(getattr(compute_plan.MLComputePlan, name)).bind(object(), object())
    assert isinstance(compute_plan.MLComputePlan.model_structure, property)
    for unit in coreml_results.MAC_COMPUTE_UNITS + ("ALL",):
        assert coreml_runner.compute_unit(ct, unit) is getattr(ct.ComputeUnit, unit)
    fields = {cls: {f.name for f in dataclasses.fields(cls)} for cls in (
        compute_plan.MLComputePlanDeviceUsage, compute_plan.MLComputePlanCost, compute_plan.MLModelStructure,
        compute_plan.MLModelStructureProgram, compute_plan.MLModelStructureProgramFunction,
        compute_plan.MLModelStructureProgramBlock, compute_plan.MLModelStructureProgramOperation,
        compute_plan.MLModelStructureProgramNamedValueType)}
    assert fields[compute_plan.MLComputePlanDeviceUsage] >= {"preferred_compute_device", "supported_compute_devices"}
    assert fields[compute_plan.MLComputePlanCost] >= {"weight"}
    assert fields[compute_plan.MLModelStructure] >= {"program"}
    assert fields[compute_plan.MLModelStructureProgram] >= {"functions"}
    assert fields[compute_plan.MLModelStructureProgramFunction] >= {"block"}
    assert fields[compute_plan.MLModelStructureProgramBlock] >= {"operations"}
    assert fields[compute_plan.MLModelStructureProgramOperation] >= {"operator_name", "outputs"}
    assert fields[compute_plan.MLModelStructureProgramNamedValueType] >= {"name"}
    for cls in ("MLCPUComputeDevice", "MLGPUComputeDevice", "MLNeuralEngineComputeDevice"):
        assert issubclass(getattr(compute_device, cls), compute_device.MLComputeDevice)


# ------------------------------------------------------------------ 2. stand-ins with exactly those members
def _device(name):
    """A device object of the real class (its proxy check skipped: there is no native runtime here)."""
    real = getattr(compute_device, name)
    return type(name, (real,), {"__init__": lambda self: None})()


class StandInMLModel:
    """The members of ``coremltools.models.MLModel`` our runner uses; computes with the reference executor."""

    def __init__(self, model, is_temp_package=False, mil_program=None, skip_model_load=False,
                 compute_units=ct.ComputeUnit.ALL, weights_dir=None, function_name=None, optimization_hints=None):
        self.path, self.compute_unit = str(model), compute_units
        self.program = CoreMLProgram(model)

    def predict(self, data, state=None):
        (name, value), = data.items()
        if hasattr(value, "mode"):   # a PIL image, as Core ML takes an image input
            a = np.asarray(value, np.float32)
            value = (a[None, None] if a.ndim == 2 else a.transpose(2, 0, 1)[None]).astype(np.float32)
        return self.program.run({name: np.asarray(value, np.float32)})

    def get_compiled_model_path(self):
        return self.path


class StandInComputePlan:
    """The members of ``MLComputePlan`` ``compute_plan`` uses, built from the package's own ops with the real
    coremltools structure classes: FP32-typed ops on the CPU, the rest on the unit's accelerator."""

    def __init__(self, path, units):
        spec = ct.utils.load_spec(path)
        fn = spec.mlProgram.functions["main"]
        self._ops, self._fp32 = [], set()
        for op in fn.block_specializations[fn.opset].operations:
            outs = [compute_plan.MLModelStructureProgramNamedValueType(
                name=o.name, type=compute_plan.MLModelStructureProgramValueType()) for o in op.outputs]
            self._ops.append(compute_plan.MLModelStructureProgramOperation(
                inputs={}, operator_name=op.type, outputs=outs, blocks=[], __proxy__=None))
            if any(o.type.tensorType.dataType == 11 for o in op.outputs):   # FLOAT32
                self._fp32.add(outs[0].name if outs else op.type)
        block = compute_plan.MLModelStructureProgramBlock(inputs=[], operations=self._ops, output_names=[])
        program = compute_plan.MLModelStructureProgram(
            functions={"main": compute_plan.MLModelStructureProgramFunction(inputs=[], block=block)})
        self._structure = compute_plan.MLModelStructure(neuralnetwork=None, program=program, pipeline=None)
        self._accelerator = {"CPU_ONLY": "MLCPUComputeDevice", "CPU_AND_GPU": "MLGPUComputeDevice"}.get(
            units.name, "MLNeuralEngineComputeDevice")

    @property
    def model_structure(self):
        return self._structure

    def get_compute_device_usage_for_mlprogram_operation(self, operation):
        if operation.operator_name == "const":
            return None
        fp32 = operation.outputs and operation.outputs[0].name in self._fp32
        where = "MLCPUComputeDevice" if fp32 else self._accelerator
        return compute_plan.MLComputePlanDeviceUsage(preferred_compute_device=_device(where),
                                                     supported_compute_devices=[_device("MLCPUComputeDevice")])

    def get_estimated_cost_for_mlprogram_operation(self, operation):
        return compute_plan.MLComputePlanCost(weight=1.0 / len(self._ops))

    @classmethod
    def load_from_path(cls, path, compute_units=ct.ComputeUnit.ALL):
        return cls(path, compute_units)


def test_stand_ins_have_the_real_signatures():
    """The stand-ins can only be used the way the real classes can (same parameters for every member we call)."""
    for stand_in, real, names in ((StandInMLModel, ct.models.MLModel, ("__init__", "predict", "get_compiled_model_path")),
                                  (StandInComputePlan, compute_plan.MLComputePlan,
                                   ("get_compute_device_usage_for_mlprogram_operation",
                                    "get_estimated_cost_for_mlprogram_operation", "load_from_path"))):
        for name in names:
            got = [p for p in inspect.signature(getattr(stand_in, name)).parameters if p != "self"]
            want = [p for p in inspect.signature(getattr(real, name)).parameters if p != "self"]
            assert got == want, (stand_in.__name__, name, got, want)


@pytest.fixture
def bundle(tmp_path):
    res = pipeline.export("lenet5", "coreml", "fp16", "none", None, tmp_path / "out", quiet=True,
                          options=ExportOptions(calib_size=16, eval_size=8, coreml=CoreMLOptions()))
    return res.path


@pytest.fixture
def mac(monkeypatch):
    """This machine made to look like a Mac to our code: the stand-ins replace coremltools' runtime classes."""
    monkeypatch.setattr(coreml_runner, "apple_runtime_available", lambda: True)
    monkeypatch.setattr(ct.models, "MLModel", StandInMLModel)
    monkeypatch.setattr(compute_plan, "MLComputePlan", StandInComputePlan)


def test_validate_writes_results_and_merge_rejudges_them(bundle, mac, capsys):
    before = artefact.verify(bundle)
    result = pipeline.validate(bundle, latency=False)   # latency: timed in the test below (one unit)
    assert result["status"] == "validated" and set(result["compute_units"]) == set(coreml_results.MAC_COMPUTE_UNITS)
    path = bundle.parent / json.loads(json.dumps(result))["results_file"].split("/")[-1]
    assert path.exists() and path.parent == bundle.parent            # next to the bundle, not inside it
    assert artefact.verify(bundle)["files"] == before["files"]         # the bundle itself is untouched
    results = json.loads(path.read_text())
    assert results["schema"] == coreml_results.RESULTS_SCHEMA and results["bundle"]["package"] == "LeNet5_FP16.mlpackage"
    ne = results["compute_units"]["CPU_AND_NE"]
    assert ne["compute_plan"]["ops_by_preferred_device"]["NeuralEngine"] > 0 and ne["compute_plan"]["not_on_neural_engine"]
    assert results["compute_units"]["CPU_ONLY"]["compute_plan"]["ops_by_preferred_device"].keys() == {"CPU"}
    assert any(line.startswith("results ") and "merge-results" in line for line in result["details"])
    assert cli_main(["merge-results", str(bundle), str(path)]) == 0
    assert "VALIDATED — Core ML on" in capsys.readouterr().out
    m = artefact.verify(bundle)                                        # re-hashed, the results file listed
    assert f"device-results/{path.name}" in m["files"] and m["status"] == "validated"
    assert set(m["coreml"]["device_validation"]["units"]) == set(coreml_results.MAC_COMPUTE_UNITS)
    assert m["parity"]["runtime"].startswith("Core ML CPU_AND_NE on") and m["coreml"]["reference_executor_parity"]


def _validate_on_mac(bundle, **kw):
    from edgecnn.targets.coreml import package_path

    manifest = artefact.verify(bundle)
    variant = manifest["coreml"]["validated_variant"]
    return coreml_results.validate_on_mac(bundle, manifest, package_path(bundle, manifest, variant), variant, **kw)


def test_merge_refuses_results_of_another_bundle(bundle, mac):
    path = bundle.parent / "r.json"
    _validate_on_mac(bundle, latency=False, units=("CPU_ONLY",),
                                   results_file=path)
    results = json.loads(path.read_text())
    results["bundle"]["digest"] = "0" * 64
    path.write_text(json.dumps(results))
    with pytest.raises(IntegrityError, match="another bundle"):
        coreml_results.merge_results(bundle, path)
    assert artefact.verify(bundle)["status"] == "validated" and not (bundle / "device-results").exists()


def test_merge_judges_the_raw_outputs_not_the_files_verdict(bundle, mac):
    """A results file that says "passed" about outputs that miss the gate is merged as failed."""
    path = bundle.parent / "r.json"
    _validate_on_mac(bundle, latency=True, units=("CPU_AND_NE",),
                                   results_file=path)
    results = json.loads(path.read_text())
    unit = results["compute_units"]["CPU_AND_NE"]
    assert "batch1" in unit["latency"] and unit["latency"]["runtime"]["compute_units"] == "CPU_AND_NE"
    outputs = coreml_results.decode_outputs(unit["outputs"])
    unit["outputs"] = coreml_results.encode_outputs(outputs[:, ::-1].copy())   # classes scrambled
    assert unit["parity"]["passed"]
    path.write_text(json.dumps(results))
    with pytest.raises(GateFailed, match="parity failed on CPU_AND_NE"):
        coreml_results.merge_results(bundle, path)
    m = artefact.verify(bundle)
    assert m["status"] == "failed" and not m["coreml"]["device_validation"]["units"]["CPU_AND_NE"]["passed"]
    assert m["latency"]["note"].endswith("not on an iPhone")
