"""The INT8 gate judges what users judge: the accuracy an artefact loses — measured on labelled images, or
estimated from FP32's own confidence without labels — with a floor that rejects broken models; agreement is a
diagnostic. Evaluation sets of the user's own: an ImageFolder tree whose folder names are the labels."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

import fmnist
from calibration import CalibrationSet, InputSpec
from calibration.errors import CalibrationError
from calibration import fashion_mnist as fm
from exporters import parity


# ------------------------------------------------------------------------------------------ the estimator
def _logits(p_top: float, classes: int = 10) -> np.ndarray:
    """One image's logits whose softmax gives the top class ``p_top`` and spreads the rest evenly."""
    rest = (1 - p_top) / (classes - 1)
    return np.log(np.array([p_top] + [rest] * (classes - 1)))


def test_a_near_tie_flip_costs_about_nothing_and_a_confident_flip_about_one():
    near = np.array([np.log([0.40, 0.39] + [0.21 / 8] * 8)])       # FP32 hesitates between classes 0 and 1
    flip_near = near[:, [1, 0] + list(range(2, 10))]                # the artefact picks class 1
    assert parity.estimated_drop_per_image(near, flip_near)[0] == pytest.approx(0.01)
    sure = _logits(0.99)[None]
    flip_sure = sure.copy()
    flip_sure[0, 5] = 10.0                                           # the artefact picks a class FP32 gave 0.1%
    assert parity.estimated_drop_per_image(sure, flip_sure)[0] == pytest.approx(0.99 - 0.01 / 9, abs=1e-9)
    assert parity.estimated_drop_per_image(sure, sure)[0] == 0.0   # agreeing costs nothing


def test_the_bootstrap_interval_covers_the_mean_and_shrinks_with_images():
    rng = np.random.default_rng(4)
    values = (rng.random(2000) < 0.05) * rng.random(2000)   # a few flips of varying cost
    lo, hi = parity.bootstrap_interval(values)
    assert lo <= values.mean() <= hi
    lo_small, hi_small = parity.bootstrap_interval(values[:100])
    assert hi_small - lo_small > hi - lo
    assert parity.bootstrap_interval(values) == [lo, hi], "seeded: the same interval every run"


def test_the_paired_standard_error_counts_fixed_and_broken_images():
    y = np.arange(100) % 10
    right = np.eye(10)[y] * 5.0
    wrong = np.roll(right, 1, axis=1)
    ref = np.vstack([right[:95], wrong[95:]])                 # FP32: 95 right, the last 5 wrong
    out = np.vstack([wrong[:6], right[6:95], right[95:]])      # the artefact breaks 6 and fixes those 5
    p = parity.compare(ref, out, labels=y)
    assert (p.ref_accuracy, p.accuracy) == (0.95, 0.94) and p.accuracy_drop == pytest.approx(0.01)
    assert p.accuracy_drop_se == pytest.approx(np.sqrt(5 + 6) / 100)


# ------------------------------------------------------------------------------------------ the gate's verdicts
def _pair(n: int = 200, noise: float = 0.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    ref = rng.standard_normal((n, 10)) * 3
    return ref, ref + rng.standard_normal(ref.shape) * noise


def test_without_labels_the_estimated_drop_judges_and_agreement_is_a_diagnostic():
    ref, out = _pair(noise=0.05)
    p = parity.judge(ref, out, "int8", True)
    assert p.criterion.startswith("estimated accuracy drop") and p.passed
    assert p.estimated_drop < 0.01 and p.estimated_drop_ci95[0] <= p.estimated_drop <= p.estimated_drop_ci95[1]
    strict = parity.judge(ref, out, "int8", True, gate=parity.Gate(min_agreement=1.0))
    assert strict.passed == (strict.top1_agreement >= 1.0)   # the opt-in agreement gate
    ref, bad = _pair(noise=2.0)
    q = parity.judge(ref, bad, "int8", True)
    assert not q.passed and "estimated accuracy drop" in q.reason and "top-1 agreement" in q.reason


def test_with_labels_the_measured_drop_judges():
    ref, out = _pair(noise=0.5)
    y = ref.argmax(1)
    p = parity.judge(ref, out, "int8", True, labels=y)
    assert p.criterion == "accuracy drop (labelled)"
    assert p.accuracy_drop == pytest.approx(1 - p.top1_agreement)   # FP32 is right on every image here
    assert p.passed == (p.accuracy_drop <= 0.01)
    loose = parity.judge(ref, out, "int8", True, labels=y, gate=parity.Gate(max_drop=1.0))
    assert loose.passed


def test_the_floor_rejects_a_broken_model_a_low_confidence_set_would_hide():
    """FP32 barely prefers its top-1 on every image (1000 classes, all logits within 0.01): any artefact's
    top-1 costs almost nothing under FP32's softmax, so the estimated drop alone would pass garbage."""
    rng = np.random.default_rng(0)
    ref = rng.random((96, 1000)) * 0.01
    garbage = rng.standard_normal((96, 1000))
    p = parity.judge(ref, garbage, "int8", True)
    assert p.estimated_drop < 0.001, "the estimate is blind here"
    assert not p.passed and "below the floor" in p.reason


def test_random_init_nets_keep_the_structure_check():
    ref, out = _pair(noise=0.3)
    p = parity.judge(ref, out, "int8", False)
    assert p.criterion.startswith("SQNR") and p.passed == (p.sqnr_db >= parity.INT8_RANDOM_MIN_SQNR_DB)


# ------------------------------------------------------------------------------------------ ImageFolder
def _image_folder(root, names, per_class: int = 3, size: int = 28):
    rng = np.random.default_rng(1)
    for name in names:
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / name / f"{i}.png")
    return root


def test_image_folder_classes_are_matched_by_name_loosely_and_by_index(tmp_path):
    names = ["T-shirt_top", "trouser", "2", "Ankle boot"]
    tree = _image_folder(tmp_path / "eval", names)
    spec = InputSpec(height=28, width=28, resize=28, channels=1, color="L", mean=[fm.MEAN], std=[fm.STD])
    cs = CalibrationSet.create(None, spec, eval_source=tree, class_names=fm.CLASSES, calib_size=8, eval_size=0,
                               cache=False)
    assert sorted(cs.labels("eval").tolist()) == sorted([0, 1, 2, 9] * 3)
    assert cs.describe()["evaluation_source"] == str(tree) and cs.describe()["labelled"] is True


def test_a_folder_that_is_no_label_is_a_clear_error_with_the_closest_labels(tmp_path):
    tree = _image_folder(tmp_path / "eval", ["Trouser", "Sneakers"])
    spec = InputSpec(height=28, width=28, resize=28, channels=1, color="L", mean=[fm.MEAN], std=[fm.STD])
    with pytest.raises(CalibrationError, match=r"sub-folder 'Sneakers' is not one of the model's 10 labels; "
                                               r"closest labels: 'Sneaker'"):
        CalibrationSet.create(None, spec, eval_source=tree, class_names=fm.CLASSES, cache=False)


def test_an_unlabelled_calibration_tree_stays_unlabelled(tmp_path):
    tree = _image_folder(tmp_path / "calib", ["2026-01", "2026-02"])   # photos sorted by month: not classes
    spec = InputSpec(height=28, width=28, resize=28, channels=1, color="L", mean=[fm.MEAN], std=[fm.STD])
    cs = CalibrationSet.create(tree, spec, class_names=fm.CLASSES, calib_size=4, eval_size=2, cache=False)
    assert cs.labels("eval") is None and all(it.label is None for it in cs.calib_items + cs.eval_items)


# ------------------------------------------------------------------------------------------ through the pipeline
def _fmnist_tree(root, n_per_class: int):
    x, y = fmnist.test_split(3000)
    x, y = x[1000:], y[1000:]          # not among the first test images, which the calibration .npz holds
    for c, name in enumerate(fm.CLASSES):
        d = root / name.replace("/", "_")
        d.mkdir(parents=True)
        for i in np.flatnonzero(y == c)[:n_per_class]:
            Image.fromarray(x[i]).save(d / f"{i}.png")
    return root


def test_export_judges_on_the_measured_drop_of_an_image_folder_eval_set(tmp_path):
    fmnist.require_data()
    from edgecnn.options import ExportOptions
    from edgecnn.pipeline import export

    kw = fmnist.pipeline_kwargs("lenet5", tmp_path / "work", n=300)
    tree = _fmnist_tree(tmp_path / "eval", 20)
    res = export("lenet5", "onnx", "int8", out=tmp_path / "out", quiet=True, eval_set=str(tree),
                 options=ExportOptions(calib_size=128, eval_size=0, latency=False), **kw)
    p = res.manifest["parity"]
    assert p["criterion"] == "accuracy drop (labelled)" and p["samples"] == 200
    assert p["accuracy_drop"] == pytest.approx(p["ref_accuracy"] - p["accuracy"])
    assert res.manifest["calibration"]["evaluation_source"] == str(tree)
    assert "judged   accuracy drop (labelled)" in res.summary()


def test_cli_eval_tree_with_foreign_folder_names_exits_3_naming_the_closest_labels(tmp_path, capsys):
    fmnist.require_data()
    from edgecnn.cli import main

    kw = fmnist.pipeline_kwargs("lenet5", tmp_path / "work", n=64)
    tree = _image_folder(tmp_path / "eval", ["Trouser", "Bags"])
    rc = main(["export", "lenet5", "-p", "int8", "--weights", str(kw["weights"]), "--num-classes", "10",
               "--labels", str(kw["labels_file"]), "--calib", str(kw["calib"]), "--eval", str(tree),
               "--input-size", "28", "--mean", str(fm.MEAN), "--std", str(fm.STD), "-o", str(tmp_path / "o"), "-q"])
    assert rc == 3
    err = capsys.readouterr().err
    assert "sub-folder 'Bags' is not one of the model's 10 labels" in err and "'Bag'" in err
    assert not (tmp_path / "o" / "lenet5" / "onnx-int8").exists()
