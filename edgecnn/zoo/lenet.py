"""LeNet-5 (LeCun et al. 1998) as in the seed: 1x28x28 input, tanh activations, average pooling."""
from __future__ import annotations

from torch import nn


class LeNet5(nn.Module):
    """C1 conv5 (pad 2 so 28x28 works like the paper's 32x32) -> S2 avgpool -> C3 conv5 -> S4 avgpool
    -> C5 fc120 -> F6 fc84 -> output, tanh throughout."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 6, kernel_size=5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(6, 16, kernel_size=5), nn.Tanh(), nn.AvgPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Linear(16 * 5 * 5, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
            nn.Linear(84, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))
