"""MobileNet V1 (Howard et al. 2017): depthwise-separable convolutions, as in the paper's Table 1.

Not in torchvision, so written here. Width multiplier ``alpha`` scales every channel count.
"""
from __future__ import annotations

from torch import nn

# (output channels, stride) of the 13 depthwise-separable blocks after the 32-channel stem.
_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
           (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1)]


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, kernel // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class MobileNetV1(nn.Module):
    def __init__(self, num_classes: int = 1000, alpha: float = 1.0, dropout: float = 0.001, in_channels: int = 3):
        super().__init__()
        width = lambda c: max(8, int(c * alpha))  # noqa: E731
        layers = [_conv_bn(in_channels, width(32), 3, 2)]
        cin = width(32)
        for cout, stride in _BLOCKS:
            layers.append(_conv_bn(cin, cin, 3, stride, groups=cin))   # depthwise 3x3
            layers.append(_conv_bn(cin, width(cout), 1, 1))            # pointwise 1x1
            cin = width(cout)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(cin, num_classes))
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
