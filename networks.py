"""Student / expert architectures for trajectory-matching distillation.

Every network follows the same small contract so the rest of the codebase can
treat them uniformly:

* ``net.embed(x)``   -> penultimate features (the input of the last Linear)
* ``net.classifier`` -> that last ``nn.Linear``
* ``net(x)``         == ``net.classifier(net.embed(x))``

The architectures mirror the ones in the MTT / DC-benchmark code at 32x32, and
are adapted so that they run on any input from 8x8 up to 128x128 with 1 or 3
channels:

* ConvNet keeps MTT's "flatten everything" head, so its classifier width
  depends on ``im_size``; it refuses sizes where pooling would reach 0 pixels.
* AlexNet / VGG11 / ResNets end in adaptive pooling to the spatial size MTT's
  versions have at 32x32 input, so they are identical to MTT there and size
  independent elsewhere.  Their downsampling steps are skipped once the
  feature map is 2x2 or 3x3, so normalisation never sees a single pixel
  (instance norm of a 1x1 map would erase the input).

Deliberate differences from MTT:
* 'layernorm' is ``GroupNorm(1, C, affine=True)``: same statistics as MTT's
  ``nn.LayerNorm([C, H, W])`` but per-channel (not per-pixel) affine
  parameters, so the parameter count does not depend on the image size.

Like MTT, a ConvNet on 1-channel 28x28 inputs (MNIST, FashionMNIST) pads its first
convolution by 3, so it sees 32x32 maps and has MTT's parameter shapes (classifier
input 128x4x4); MTT's buffers for those datasets load. MTT pads by 3 for every
1-channel input, but its feature-size bookkeeping only works at 28x28, so other
1-channel sizes (Digits at 8x8) keep padding 1.

Parameters use PyTorch's default initialisation; seed torch before building.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from trajmatch.layers import AvgPool2, Conv2d, InstanceNorm, ReLU

ImSize = tuple[int, int]

# --------------------------------------------------------------------------
# Shared building blocks
# --------------------------------------------------------------------------

NORMS = ("instancenorm", "batchnorm", "layernorm", "none")


def make_norm(norm: str, channels: int) -> nn.Module:
    """Normalisation layer for a [B, C, H, W] feature map."""
    if norm == "instancenorm":
        # GroupNorm with one channel per group == instance norm with affine
        # parameters, and (unlike BatchNorm) no running statistics.
        # (trajmatch/layers.py: same layer, a cheaper second derivative for the unroll)
        return InstanceNorm(channels)
    if norm == "batchnorm":
        return nn.BatchNorm2d(channels)
    if norm == "layernorm":
        # See module docstring: per-channel affine instead of per-pixel.
        return nn.GroupNorm(1, channels, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; expected one of {NORMS}")


def _check_im_size(im_size: ImSize) -> tuple[int, int]:
    h, w = int(im_size[0]), int(im_size[1])
    if h < 1 or w < 1:
        raise ValueError(f"im_size must be positive, got {im_size}")
    return h, w


# --------------------------------------------------------------------------
# ConvNet (the default student of DC / DSA / MTT)
# --------------------------------------------------------------------------

POOLINGS = ("avgpooling", "maxpooling", "none")


def convnet_first_padding(channel: int, im_size: ImSize) -> int:
    """MTT pads the first convolution by 3 for 1-channel 28x28 inputs (28 -> 32), else 1."""
    return 3 if channel == 1 and tuple(int(s) for s in im_size) == (28, 28) else 1


def convnet_feature_size(im_size: ImSize, depth: int, pooling: str, first_padding: int = 1) -> tuple[int, int]:
    """Spatial size after the ConvNet feature extractor (may contain 0)."""
    h, w = _check_im_size(im_size)
    h, w = h + 2 * (first_padding - 1), w + 2 * (first_padding - 1)  # 3x3 conv: out = in + 2 pad - 2
    if pooling == "none":
        return h, w
    # Each 2x2/stride-2 pool floors the size.
    return h >> depth, w >> depth


class ConvNet(nn.Module):
    """depth x [conv3x3 -> norm -> ReLU -> pool2x2] -> flatten -> Linear."""

    def __init__(self, channel: int, num_classes: int, im_size: ImSize,
                 width: int = 128, depth: int = 3, norm: str = "instancenorm",
                 pooling: str = "avgpooling"):
        super().__init__()
        if depth < 1:
            raise ValueError(f"ConvNet depth must be >= 1, got {depth}")
        if pooling not in POOLINGS:
            raise ValueError(f"unknown pooling {pooling!r}; expected one of {POOLINGS}")
        first_padding = convnet_first_padding(channel, im_size)
        fh, fw = convnet_feature_size(im_size, depth, pooling, first_padding)
        if fh < 1 or fw < 1:
            raise ValueError(
                f"ConvNet with depth {depth} and {pooling} needs images of at least "
                f"{2 ** depth}x{2 ** depth}; got {tuple(im_size)} "
                f"(the feature map would shrink to {fh}x{fw})")
        self.features = self._make_features(channel, width, depth, norm, pooling, first_padding)
        self.classifier = nn.Linear(width * fh * fw, num_classes)

    @staticmethod
    def _make_features(channel: int, width: int, depth: int, norm: str,
                       pooling: str, first_padding: int = 1) -> nn.Sequential:
        layers: list[nn.Module] = []
        in_ch = channel
        for d in range(depth):
            layers += [Conv2d(in_ch, width, kernel_size=3, padding=first_padding if d == 0 else 1),
                       make_norm(norm, width),
                       ReLU()]
            if pooling == "avgpooling":
                layers.append(AvgPool2())
            elif pooling == "maxpooling":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            in_ch = width
        return nn.Sequential(*layers)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------
# AlexNet (MTT's small-image variant)
# --------------------------------------------------------------------------

class AlexNet(nn.Module):
    """MTT's AlexNet; adaptive average pooling to 4x4 (its 32x32 feature size)."""

    def __init__(self, channel: int, num_classes: int, im_size: ImSize):
        super().__init__()
        _check_im_size(im_size)
        # ceil_mode keeps a 1x1 map at 1x1 instead of 0x0 for 8x8 inputs.
        self.features = nn.Sequential(
            nn.Conv2d(channel, 128, kernel_size=5, stride=1, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            nn.Conv2d(128, 192, kernel_size=5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
            nn.Conv2d(192, 256, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(256, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.Conv2d(192, 192, kernel_size=3, padding=1),
            nn.ReLU(),
            nn.MaxPool2d(kernel_size=2, stride=2, ceil_mode=True),
        )
        self.pool = nn.AdaptiveAvgPool2d((4, 4))
        self.classifier = nn.Linear(192 * 4 * 4, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------
# VGG11 (MTT's variant: instance norm, 512-d embedding)
# --------------------------------------------------------------------------

VGG11_CFG: tuple = (64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512)


class VGG11(nn.Module):
    """VGG11 with norm; the final max-pool is adaptive (== MTT's at 32x32)."""

    def __init__(self, channel: int, num_classes: int, im_size: ImSize,
                 norm: str = "instancenorm"):
        super().__init__()
        h, w = _check_im_size(im_size)
        layers: list[nn.Module] = []
        in_ch = channel
        for v in VGG11_CFG:
            if v == "M":
                # Skip pools that would leave less than 2x2 for the next norm.
                if min(h, w) >= 4:
                    layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                    h, w = h // 2, w // 2
                continue
            layers += [nn.Conv2d(in_ch, v, kernel_size=3, padding=1),
                       make_norm(norm, v),
                       nn.ReLU()]
            in_ch = v
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveMaxPool2d(1)
        self.classifier = nn.Linear(512, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.features(x)).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------
# ResNet18 family (CIFAR-style stem: 3x3 stride-1 conv, no max-pool)
# --------------------------------------------------------------------------

class BasicBlock(nn.Module):
    """ResNet basic block; downsamples by stride-2 conv."""

    def __init__(self, in_planes: int, planes: int, downsample: bool, norm: str):
        super().__init__()
        stride = 2 if downsample else 1
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if downsample or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                make_norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class BasicBlockAP(nn.Module):
    """MTT's BasicBlock_AP: stride-1 convs, downsampling by 2x2 average pooling."""

    def __init__(self, in_planes: int, planes: int, downsample: bool, norm: str):
        super().__init__()
        self.downsample = downsample
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = make_norm(norm, planes)
        self.shortcut = nn.Sequential()
        if downsample or in_planes != planes:
            pool = [nn.AvgPool2d(kernel_size=2, stride=2)] if downsample else []
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=1, bias=False),
                *pool,
                make_norm(norm, planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        if self.downsample:
            out = F.avg_pool2d(out, kernel_size=2, stride=2)
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet18 for small images.

    avg_pool_down=False: stride-2 convs, head = global average pool (MTT ResNet).
    avg_pool_down=True:  avg-pool downsampling, head = adaptive avg pool to 4x4
                         (MTT ResNet_AP flattens its 4x4 map at 32x32 input).
    """

    STAGES = ((64, False), (128, True), (256, True), (512, True))

    def __init__(self, channel: int, num_classes: int, im_size: ImSize,
                 norm: str = "instancenorm", avg_pool_down: bool = False):
        super().__init__()
        h, w = _check_im_size(im_size)
        block = BasicBlockAP if avg_pool_down else BasicBlock
        self.conv1 = nn.Conv2d(channel, 64, 3, stride=1, padding=1, bias=False)
        self.bn1 = make_norm(norm, 64)
        in_planes = 64
        stages = []
        for planes, wants_down in self.STAGES:
            # Stop downsampling at 2x2 / 3x3 so no norm ever sees one pixel.
            down = wants_down and min(h, w) >= 4
            if down:
                h, w = self._down_size(h, avg_pool_down), self._down_size(w, avg_pool_down)
            stages.append(nn.Sequential(block(in_planes, planes, down, norm),
                                        block(planes, planes, False, norm)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        head = 4 if avg_pool_down else 1
        self.pool = nn.AdaptiveAvgPool2d(head)
        self.classifier = nn.Linear(512 * head * head, num_classes)

    @staticmethod
    def _down_size(n: int, avg_pool_down: bool) -> int:
        # stride-2 3x3 conv with padding 1 -> ceil(n/2); 2x2 avg-pool -> floor(n/2)
        return n // 2 if avg_pool_down else (n + 1) // 2

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.pool(out).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------

Builder = Callable[[int, int, ImSize], nn.Module]


def _convnet(channel: int, num_classes: int, im_size: ImSize, **kwargs) -> nn.Module:
    return ConvNet(channel, num_classes, im_size, **kwargs)


def _alexnet(channel: int, num_classes: int, im_size: ImSize) -> nn.Module:
    return AlexNet(channel, num_classes, im_size)


def _vgg11(channel: int, num_classes: int, im_size: ImSize) -> nn.Module:
    return VGG11(channel, num_classes, im_size, norm="instancenorm")


def _resnet18(channel: int, num_classes: int, im_size: ImSize, **kwargs) -> nn.Module:
    return ResNet18(channel, num_classes, im_size, **kwargs)


def _convnet_configs() -> dict[str, dict]:
    """ConvNet registry names -> ConvNet keyword arguments."""
    configs: dict[str, dict] = {"ConvNet": {}}
    for d in range(1, 6):
        configs[f"ConvNetD{d}"] = {"depth": d}
    for w in (32, 64, 128, 256):
        configs[f"ConvNetW{w}"] = {"width": w}
    configs["ConvNetBN"] = {"norm": "batchnorm"}
    configs["ConvNetLN"] = {"norm": "layernorm"}
    configs["ConvNetNN"] = {"norm": "none"}
    return configs


CONVNET_CONFIGS: dict[str, dict] = _convnet_configs()

MODELS: dict[str, Builder] = {
    **{name: functools.partial(_convnet, **kw) for name, kw in CONVNET_CONFIGS.items()},
    "AlexNet": _alexnet,
    "VGG11": _vgg11,
    "ResNet18": functools.partial(_resnet18, norm="instancenorm"),
    "ResNet18BN": functools.partial(_resnet18, norm="batchnorm"),
    "ResNet18_AP": functools.partial(_resnet18, norm="instancenorm", avg_pool_down=True),
    "ResNet18BN_AP": functools.partial(_resnet18, norm="batchnorm", avg_pool_down=True),
}

# Smallest side length the non-ConvNet architectures are designed and tested for.
MIN_SIDE = 8


def supports(name: str, im_size: ImSize) -> bool:
    """Whether ``get_network(name, ..., im_size)`` builds a working network."""
    if name not in MODELS:
        return False
    h, w = int(im_size[0]), int(im_size[1])
    if name in CONVNET_CONFIGS:
        kw = CONVNET_CONFIGS[name]
        depth = kw.get("depth", 3)
        pooling = kw.get("pooling", "avgpooling")
        if h < 1 or w < 1:
            return False
        fh, fw = convnet_feature_size((h, w), depth, pooling)
        return fh >= 1 and fw >= 1
    return min(h, w) >= MIN_SIDE


def get_network(name: str, channel: int, num_classes: int, im_size: ImSize) -> nn.Module:
    """Build a registered network (ValueError for unknown names / sizes)."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    if name in CONVNET_CONFIGS:
        # ConvNet raises its own message naming the minimum image size.
        return MODELS[name](channel, num_classes, tuple(im_size))
    if not supports(name, im_size):
        raise ValueError(f"model {name!r} does not support images of size {tuple(im_size)}")
    return MODELS[name](channel, num_classes, tuple(im_size))
