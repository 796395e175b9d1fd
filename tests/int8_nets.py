"""Small real nets for the INT8 tests, exported to ONNX with the project's exporter (real torch, real onnx)."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def tiny_spec(size: int = 32):
    from calibration import InputSpec

    return InputSpec(height=size, width=size, resize=size)


def export_module(module, path: Path, size: int = 32) -> Path:
    from exporters.onnx.export import export_onnx

    export_onnx(module.eval(), tiny_spec(size), path)
    return path


def se_net():
    """Conv/BN/ReLU, a MobileNetV3-style squeeze-excite (ReduceMean + HardSigmoid gate), SiLU, HardSwish,
    a residual Add and a classifier: every pattern the ort recipe's graph preparation rewrites."""
    import torch
    from torch import nn

    class SE(nn.Module):
        def __init__(self, c):
            super().__init__()
            self.fc1 = nn.Conv2d(c, c // 2, 1)
            self.fc2 = nn.Conv2d(c // 2, c, 1)

        def forward(self, x):
            s = x.mean((2, 3), keepdim=True)          # exported as ReduceMean
            return x * nn.functional.hardsigmoid(self.fc2(torch.relu(self.fc1(s))))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU())
            self.dw = nn.Sequential(nn.Conv2d(16, 16, 3, 1, 1, groups=16), nn.BatchNorm2d(16), nn.SiLU())
            self.se = SE(16)
            self.pw = nn.Sequential(nn.Conv2d(16, 16, 1), nn.BatchNorm2d(16), nn.Hardswish())
            self.head = nn.Linear(16, 10)

        def forward(self, x):
            x = self.stem(x)
            x = x + self.pw(self.se(self.dw(x)))
            return self.head(x.mean((2, 3)))

    torch.manual_seed(0)
    return Net().eval()


def images(n: int = 24, size: int = 32, seed: int = 0) -> np.ndarray:
    """Real photo crops (the bundled sample photos), preprocessed to N×3×size×size."""
    from calibration import CalibrationSet

    cs = CalibrationSet.create(None, tiny_spec(size), calib_size=n, eval_size=8, cache=False, seed=seed)
    return cs.array("calib", limit=n)


def ort_recipe(fp32: Path, work: Path, out: Path = None, quantizer=None):
    """The engine's Q/DQ recipe on ``fp32`` (default: the ``ort`` quantizer), prepared into ``work``; returns
    (recipe, default float layers)."""
    from exporters.int8.qdq import QdqRecipe
    from exporters.onnx.quant import OrtQuantizer

    recipe = QdqRecipe(quantizer or OrtQuantizer(), fp32, out or Path(work) / "int8.onnx", work)
    recipe.prepare(lambda s: None)
    return recipe, recipe.default_float()


def minmax_ranges(path, x: np.ndarray, batch: int = 16):
    from calibration.ranges import compute_ranges

    return compute_ranges(path, [x[i:i + batch] for i in range(0, len(x), batch)], "minmax")


def run(path, x: np.ndarray) -> np.ndarray:
    from exporters.onnx.runner import run_onnx

    return run_onnx(path, x)


class ArrayCalib:
    """The part of ``calibration.CalibrationSet`` the INT8 recipes read (``iter_batches``), over an array."""

    def __init__(self, x: np.ndarray):
        self.x = np.asarray(x, np.float32)

    def iter_batches(self, split: str = "calib", batch_size: int = 16):
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size]
