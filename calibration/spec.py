"""The input contract of a model: what a caller must feed it, and how to get there from a photo.

It lives in the bottom layer because three parties need the same description: the zoo declares it,
the calibration set preprocesses images by it (on a device, without torch), and the exporters and
manifests write it down for app engineers.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from typing import Optional, Sequence, Tuple

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class InputSpec:
    """How one image becomes the model's input tensor (NCHW, float32).

    Steps, in order: decode -> convert to ``color`` ("RGB" or "L" for grey) -> resize so the
    shorter side is ``resize`` pixels (``interpolation``) -> centre-crop ``crop`` (``height`` x
    ``width``) -> scale to [0, 1] by ``scale`` -> subtract ``mean`` and divide by ``std`` per channel.

    ``color="L"`` with ``channels=3`` means "grey, replicated to three channels": the input of a
    3-channel net (e.g. torchvision's ResNet) trained on grey images such as Fashion-MNIST. A colour photo
    must then be made grey first, exactly as in training, so it is a preprocessing step of its own.
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
        allowed = (3,) if self.color == "RGB" else (1, 3)  # grey: one channel, or replicated to three
        if self.channels not in allowed:
            raise ValueError(f"InputSpec: color {self.color} needs {' or '.join(map(str, allowed))} channel(s), "
                             f"got {self.channels}")
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError("InputSpec: mean and std need one value per channel")
        if self.interpolation not in ("bilinear", "bicubic", "nearest"):
            raise ValueError(f"InputSpec: unknown interpolation {self.interpolation!r}")

    @property
    def grey_replicated(self) -> bool:
        """Grey pixels copied into every channel of a multi-channel input."""
        return self.color == "L" and self.channels > 1

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
            *([f"replicate the grey channel to {self.channels} channels"] if self.grey_replicated else []),
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


def derive_spec(base: InputSpec, *, size: Optional[int] = None, resize: Optional[int] = None,
                mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None,
                grey: bool = False) -> InputSpec:
    """``base`` with the input of a custom-trained checkpoint: another square ``size`` (``resize`` defaults
    to ``size``: the image's shorter side is scaled to the crop, as small training images are), other
    ``mean``/``std`` (one value is repeated over the channels), or ``grey`` (convert to grey; a 3-channel
    net gets the grey channel replicated). ValueError names what does not fit."""
    changes: dict = {}
    if size is not None:
        if size < 1:
            raise ValueError(f"input size must be a positive number of pixels, not {size}")
        changes.update(height=int(size), width=int(size), resize=int(resize or size))
    elif resize is not None:
        changes["resize"] = int(resize)
    if changes.get("resize", base.resize) < min(changes.get("height", base.height), changes.get("width", base.width)):
        raise ValueError(f"resize {changes.get('resize', base.resize)} is smaller than the crop "
                         f"{changes.get('height', base.height)}x{changes.get('width', base.width)}")
    if grey:
        changes["color"] = "L"
    for name, values in (("mean", mean), ("std", std)):
        if values is None:
            continue
        values = tuple(float(v) for v in values)
        if len(values) == 1:
            values = values * base.channels
        if len(values) != base.channels:
            raise ValueError(f"{name} needs 1 or {base.channels} values for a {base.channels}-channel input, "
                             f"got {len(values)}")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"{name} values must be finite numbers, not {', '.join(map(str, values))}")
        if name == "std" and any(v <= 0 for v in values):
            raise ValueError("std values must be positive")
        changes[name] = values
    return replace(base, **changes)
