"""The zoo: every seed architecture, canonical names and aliases, specs from torchvision's metadata."""
from __future__ import annotations

import pytest
import torch

from edgecnn import zoo

SEED_ARCHS = (["lenet5", "alexnet", "vgg16", "vgg16_bn", "vgg19", "vgg19_bn", "googlenet", "inception_v3"]
              + [f"resnet{d}" for d in (18, 34, 50, 101, 152)] + [f"densenet{d}" for d in (121, 169, 201)]
              + ["squeezenet1_0", "squeezenet1_1", "mobilenet_v1", "mobilenet_v2", "mobilenet_v3_small",
                 "mobilenet_v3_large"] + [f"efficientnet_b{b}" for b in range(8)]
              + ["efficientnet_lite0"] + [f"shufflenet_v2_x{w}" for w in ("0_5", "1_0", "1_5", "2_0")])


def test_every_seed_architecture_is_registered():
    missing = [a for a in SEED_ARCHS if a not in zoo.names()]
    assert not missing


@pytest.mark.parametrize("alias,canonical", [("mobilenet_v3", "mobilenet_v3_large"), ("MobileNet-V3", "mobilenet_v3_large"),
                                             ("squeezenet", "squeezenet1_1"), ("lenet", "lenet5"),
                                             ("efficientnet", "efficientnet_b0"), ("inception_v1", "googlenet")])
def test_aliases(alias, canonical):
    assert zoo.resolve(alias).name == canonical


def test_unknown_name_suggests_close_ones():
    with pytest.raises(zoo.UnknownArchError) as err:
        zoo.resolve("mobilenet_v4")
    assert "mobilenet_v3" in str(err.value)
    with pytest.raises(zoo.UnknownArchError) as err:
        zoo.resolve("efficentnet_b0")
    assert "efficientnet_b0" in str(err.value)


def test_native_resolutions_follow_torchvision_metadata():
    assert zoo.resolve("inception_v3").spec.shape == (3, 299, 299)
    assert zoo.resolve("efficientnet_b7").spec.shape == (3, 600, 600)
    assert zoo.resolve("efficientnet_b3").spec.shape == (3, 300, 300)
    assert zoo.resolve("efficientnet_b0").spec.interpolation == "bicubic"
    assert zoo.resolve("lenet5").spec.shape == (1, 28, 28)


def test_imagenet_labels_ship_offline():
    labels = zoo.labels_for(zoo.resolve("mobilenet_v2"))
    assert len(labels) == 1000 and labels[281] == "tabby"
    assert zoo.labels_for(zoo.resolve("lenet5")) == [str(i) for i in range(10)]


@pytest.mark.parametrize("arch", ["lenet5", "mobilenet_v1", "efficientnet_lite0", "squeezenet1_1", "shufflenet_v2_x0_5"])
def test_builders_run_at_native_size(arch):
    entry = zoo.resolve(arch)
    model = entry.builder(num_classes=entry.num_classes).eval()
    with torch.no_grad():
        out = model(torch.zeros(entry.spec.batch_shape(2)))
    assert out.shape == (2, entry.num_classes)


def test_lenet5_is_the_seed_design():
    model = zoo.resolve("lenet5").builder(num_classes=10)
    kinds = {type(m).__name__ for m in model.modules()}
    assert {"Tanh", "AvgPool2d"} <= kinds and "ReLU" not in kinds and "MaxPool2d" not in kinds


def test_mobilenet_v1_is_depthwise_separable():
    model = zoo.resolve("mobilenet_v1").builder(num_classes=1000)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    depthwise = [c for c in convs if c.groups == c.in_channels and c.in_channels > 1]
    pointwise = [c for c in convs if c.kernel_size == (1, 1)]
    assert len(depthwise) == 13 and len(pointwise) == 13
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(4.23e6, rel=0.01)  # the paper's 4.2M


def test_efficientnet_lite0_has_no_squeeze_excite_and_uses_relu6():
    model = zoo.resolve("efficientnet_lite0").builder(num_classes=1000)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "SqueezeExcitation" not in kinds and "SiLU" not in kinds and "ReLU6" in kinds
