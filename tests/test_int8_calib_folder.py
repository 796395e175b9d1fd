"""Calibration folders from the field: each awkward file does the right thing, reported by path."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from calibration import CalibrationError, CalibrationSet, InputSpec, load_image
from calibration.errors import BadImageError

SPEC = InputSpec(height=32, width=32, resize=36)


def _photo(seed: int, size=(48, 40)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)


@pytest.fixture()
def field_folder(tmp_path):
    d = tmp_path / "calib"
    (d / "sub").mkdir(parents=True)
    for i in range(4):
        Image.fromarray(_photo(i)).save(d / f"rgb{i}.jpg", quality=95)
    Image.fromarray(_photo(10)[:, :, 0]).save(d / "grey.png")                       # L
    rgba = np.dstack([_photo(11), np.full((40, 48), 0, np.uint8)])
    rgba[:20, :, 3] = 255                                                              # top half opaque
    Image.fromarray(rgba, "RGBA").save(d / "sub" / "alpha.png")
    Image.fromarray(_photo(12)).convert("CMYK").save(d / "cmyk.jpg")                  # CMYK JPEG
    (d / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
    (d / "notes.txt").write_text("not an image")                                      # ignored: not an image name
    (d / "fake.png").write_text("a text file with an image name")
    (d / "empty.png").write_bytes(b"")
    return d


def test_grey_rgba_cmyk_are_converted_like_a_viewer(field_folder):
    grey = np.asarray(load_image(field_folder / "grey.png", "RGB"))
    assert grey.shape == (40, 48, 3) and (grey[..., 0] == grey[..., 1]).all() and (grey[..., 1] == grey[..., 2]).all()
    rgba = np.asarray(load_image(field_folder / "sub" / "alpha.png", "RGB"))
    assert (rgba[25:, :] == 255).all(), "transparent pixels are composited on white"
    assert not (rgba[:15, :] == 255).all()
    cmyk_src = _photo(12)
    cmyk = np.asarray(load_image(field_folder / "cmyk.jpg", "RGB")).astype(int)
    assert cmyk.shape == (40, 48, 3)
    assert np.abs(cmyk - cmyk_src.astype(int)).mean() < 40, "CMYK comes back as the RGB picture, not inverted"


def test_bad_files_are_skipped_and_named_or_fail_with_strict(field_folder):
    cs = CalibrationSet.create(field_folder, SPEC, calib_size=0, eval_size=0, cache=False)
    ids = {i.id.rsplit("/", 1)[-1] for i in cs.calib_items + cs.eval_items}
    assert "notes.txt" not in ids and {"grey.png", "alpha.png", "cmyk.jpg", "corrupt.jpg"} <= ids
    arrays = [cs.array(split) for split in ("calib", "eval")]
    assert sum(len(a) for a in arrays) == 7  # 4 rgb + grey + rgba + cmyk
    assert all(a.shape[1:] == (3, 32, 32) and np.isfinite(a).all() for a in arrays)
    bad = sorted(s.split(":")[0].rsplit("/", 1)[-1] for s in cs.skipped)
    assert bad == ["corrupt.jpg", "empty.png", "fake.png"], cs.skipped
    assert any("empty file" in s for s in cs.skipped)
    with pytest.raises(BadImageError) as err:  # --strict-calib decodes every selected image up front
        CalibrationSet.create(field_folder, SPEC, calib_size=0, eval_size=0, cache=False, strict=True)
    assert err.value.path and err.value.path.endswith((".jpg", ".png"))


def test_empty_folder_and_missing_folder_are_clear_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(CalibrationError, match="no images found") as err:
        CalibrationSet.create(tmp_path / "empty", SPEC)
    assert "jpg" in err.value.hint
    with pytest.raises(CalibrationError, match="not found"):
        CalibrationSet.create(tmp_path / "nope", SPEC)


def test_split_by_file_never_overlaps(field_folder):
    cs = CalibrationSet.create(field_folder, SPEC, calib_size=0, eval_size=0, cache=False)
    calib_groups = {i.group for i in cs.calib_items}
    eval_groups = {i.group for i in cs.eval_items}
    assert calib_groups and eval_groups and not calib_groups & eval_groups


def test_split_calibration_gives_the_fallback_a_probe_of_unseen_groups():
    """The INT8 fallback fits its search ranges on ``fit`` and measures on ``probe``: whole photos apart."""
    cs = CalibrationSet.create(None, SPEC, calib_size=0, eval_size=0, cache=False)
    fit, probe = cs.split_calibration(0.5, max_probe=40)
    fit_groups, probe_groups = {i.group for i in fit.calib_items}, {i.group for i in probe.calib_items}
    assert fit_groups and probe_groups and not fit_groups & probe_groups
    assert fit_groups | probe_groups == {i.group for i in cs.calib_items}
    assert len(probe.calib_items) == 40 and len(fit.calib_items) + len(probe.calib_items) <= len(cs.calib_items)
    assert fit.eval_items == cs.eval_items == probe.eval_items          # the held-out split is untouched
    assert fit.fingerprint() != cs.fingerprint()                        # so its ranges are cached apart
    again = cs.split_calibration(0.5, max_probe=40)
    assert [i.id for i in again[1].calib_items] == [i.id for i in probe.calib_items]   # deterministic
    one = CalibrationSet(spec=SPEC, source="x", calib_items=cs.calib_items[:1], eval_items=[])
    assert one.split_calibration(0.5)[1].calib_items == []             # nothing to divide: no probe


def test_fallback_probe_survives_a_half_of_unreadable_files(field_folder, tmp_path):
    """When every readable calibration image lands on one side of the probe split, the INT8 fallback uses
    the undivided probe (skipping the bad files, by path) instead of failing the export."""
    from exporters.int8.engine import search_data
    from exporters.int8.options import Int8Options

    cs = CalibrationSet.create(field_folder, SPEC, calib_size=0, eval_size=0, cache=False)
    good = next(i for i in cs.calib_items + cs.eval_items if i.id.endswith("rgb0.jpg"))
    bad = [i for i in cs.calib_items + cs.eval_items if i.id.endswith(("corrupt.jpg", "fake.png", "empty.png"))]
    only_one_good = CalibrationSet(spec=SPEC, source=str(field_folder), calib_items=[good, *bad], eval_items=[])
    data = search_data(only_one_good, Int8Options())
    assert not data.split and len(data.probe) == 1
    assert any("corrupt.jpg" in s or "fake.png" in s or "empty.png" in s for s in only_one_good.skipped)
    ok = CalibrationSet.create(None, SPEC, calib_size=0, eval_size=0, cache=False)
    assert search_data(ok, Int8Options()).split
