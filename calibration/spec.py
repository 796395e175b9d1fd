"""The input contract of a model: what a caller must feed it, and how to get there from a photo.

It lives in the bottom layer because three parties need the same description: the zoo declares it,
the calibration set preprocesses images by it (on a device, without torch), and the exporters and
manifests write it down for app engineers.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How one image becomes the model's input tensor (NCHW, float32).

    Steps, in order: decode -> convert to ``color`` ("RGB" or "L" for grey) -> resize so the
    shorter side is ``resize`` pixels (``interpolation``) -> centre-crop ``crop`` (``height`` x
    ``width``) -> scale to [0, 1] by ``scale`` -> subtract ``mean`` and divide by ``std`` per channel.
    """

    channels: int = 3
    height: int = 224
    width: int = 224
    resize: int = 256
    interpolation: str = "bilinear"
    mean: Tuple[float, ...] = IMAGENET_MEAN
    std: Tuple[float, ...] = IMAGENET_STD
    color: str = "RGB"
    scale: float = 1.0 / 255.0
    layout: str = "NCHW"
    dtype: str = "float32"
    name: str = "input"

    def __post_init__(self) -> None:
        if self.color not in ("RGB", "L"):
            raise ValueError(f"InputSpec.color must be 'RGB' or 'L', not {self.color!r}")
        expected = 3 if self.color == "RGB" else 1
        if self.channels != expected:
            raise ValueError(f"InputSpec: color {self.color} needs {expected} channel(s), got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("InputSpec: mean and std need one value per channel")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"InputSpec: unknown interpolation {self.interpolation!r}")

    @property
    def shape(self) -> Tuple[int, int, int]:
        """(C, H, W) of one image."""
        return (self.channels, self.height, self.width)

    def batch_shape(self, batch: int = 1) -> Tuple[int, int, int, int]:
        return (batch, self.channels, self.height, self.width)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean)
        d["std"] = list(self.std)
        d["shape"] = [1, *self.shape]
        d["crop"] = [self.height, self.width]
        d["color_order"] = "RGB" if self.color == "RGB" else "grey"
        d.pop("color")
        d["steps"] = [
            f"decode, convert to {'RGB' if self.color == 'RGB' else 'single-channel grey (PIL L)'}",
            f"resize shorter side to {self.resize} px ({self.interpolation})",
            f"centre-crop {self.height}x{self.width}",
            "scale pixel values to [0, 1] (x / 255)",
            "subtract mean and divide by std per channel",
            f"layout {self.layout}, dtype {self.dtype}",
        ]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        color = "RGB" if d.get("color_order", "RGB") == "RGB" else "L"
        return cls(
            channels=int(d["channels"]), height=int(d["height"]), width=int(d["width"]),
            resize=int(d["resize"]), interpolation=d["interpolation"], mean=tuple(d["mean"]),
            std=tuple(d["std"]), color=color, scale=float(d.get("scale", 1 / 255)),
            layout=d.get("layout", "NCHW"), dtype=d.get("dtype", "float32"), name=d.get("name", "input"),
        )
