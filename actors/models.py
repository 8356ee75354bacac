"""The model zoo: CIFAR ResNet-d, WRN-28-2 and a small CPU ConvNet.

Every model maps ``[B, in_channels, H, W]`` to logits ``[B, num_classes]`` and ends in
adaptive average pooling, so the same network runs on 8x8 digits, 32x32 CIFAR and 64x64
Tiny-ImageNet. ``embed(x)`` returns the pooled feature vector (``[B, D]``, the penultimate layer)
that relation edges exchange; ``forward(x) = head(embed(x))``.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from actors.registry import Registry

MODELS: Registry = Registry("model")


def build_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a zoo model by (case-insensitive) name; an unknown name lists the known ones."""
    return MODELS.get(name)(num_classes=num_classes, in_channels=in_channels)


def _init_weights(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.kaiming_normal_(m.weight)
            nn.init.zeros_(m.bias)


class Classifier(nn.Module):
    """Common tail: ``embed`` is defined by subclasses, ``head`` is a linear layer."""

    embed_dim: int

    def forward(self, x: torch.Tensor, embedding: bool = False, stages: bool = False):
        """Logits ``[B, C]``; with ``embedding``, ``(logits, embedding [B, D])``; with
        ``stages`` also the feature map at the end of each stage (a list, ``[B, C_i, H_i, W_i]``):
        ``(logits, embedding, maps)``. Always the same logits."""
        if not stages:
            e = self.embed(x)
            return (self.head(e), e) if embedding else self.head(e)
        maps = self.stage_maps(x)
        e = self.pool(maps[-1])
        return self.head(e), e, maps

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.stage_maps(x)[-1])
    def pool(self, last: torch.Tensor) -> torch.Tensor:
        """The embedding from the last stage's map: global average pooling."""
        return F.adaptive_avg_pool2d(last, 1).flatten(1)

    def stage_maps(self, x: torch.Tensor) -> list[torch.Tensor]:
        """The output of each stage (the last block of each resolution), in order. The
        blocks stay one flat ``nn.Sequential`` (``self.blocks``), so state dicts and every
        checkpoint written before stages were tapped keep their keys."""
        out, maps = self.stem(x), []
        for i, block in enumerate(self.blocks if hasattr(self, "blocks") else self.features):
            out = block(out)
            if i in self._stage_ends:
                maps.append(out)
        return maps

    @property
    def stage_widths(self) -> list[int]:
        return list(self._widths)


# --- ResNet-d for CIFAR (He et al. 2016, option A shortcut) -------------------------------


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.stride = stride
        self.pad_channels = c_out - c_in

    def shortcut(self, x: torch.Tensor) -> torch.Tensor:
        # Parameter-free shortcut: subsample by the stride and zero-pad the new channels.
        if self.stride != 1:
            x = x[:, :, :: self.stride, :: self.stride]
        if self.pad_channels:
            half = self.pad_channels // 2
            x = F.pad(x, (0, 0, 0, 0, half, self.pad_channels - half))
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(Classifier):
    """ResNet-d of the CIFAR paper: 16/32/64 channels, (d-2)/6 basic blocks per stage."""

    def __init__(self, depth: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"ResNet depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        layers, c = [], 16
        for i, width in enumerate((16, 32, 64)):
            for j in range(n):
                layers.append(_BasicBlock(c, width, 2 if (i > 0 and j == 0) else 1))
                c = width
        self.blocks = nn.Sequential(*layers)
        self._stage_ends = (n - 1, 2 * n - 1, 3 * n - 1)
        self._widths = (16, 32, 64)
        self.embed_dim = 64
        self.head = nn.Linear(64, num_classes)
        _init_weights(self)


@MODELS.register("resnet20")
def resnet20(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(20, num_classes, in_channels)


@MODELS.register("resnet32")
def resnet32(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(32, num_classes, in_channels)


@MODELS.register("resnet110")
def resnet110(num_classes: int, in_channels: int = 3) -> nn.Module:
    return CifarResNet(110, num_classes, in_channels)


# --- Wide ResNet (Zagoruyko & Komodakis 2016), pre-activation --------------------------


class _WideBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.shortcut = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(o)
        o = self.conv1(o)
        o = self.conv2(F.relu(self.bn2(o)))
        return o + skip


class WideResNet(Classifier):
    """WRN-depth-k: widths 16, 16k, 32k, 64k; (depth-4)/6 blocks per stage."""

    def __init__(self, depth: int, widen: int, num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WRN depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = (16 * widen, 32 * widen, 64 * widen)
        self.stem = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        layers, c = [], 16
        for i, w in enumerate(widths):
            for j in range(n):
                layers.append(_WideBlock(c, w, 2 if (i > 0 and j == 0) else 1))
                c = w
        self.blocks = nn.Sequential(*layers)
        self._stage_ends = (n - 1, 2 * n - 1, 3 * n - 1)
        self._widths = widths
        self.bn = nn.BatchNorm2d(c)
        self.embed_dim = c
        self.head = nn.Linear(c, num_classes)
        _init_weights(self)

    def pool(self, last: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(F.relu(self.bn(last)), 1).flatten(1)


@MODELS.register("wrn28_2", "wideresnet28_2")
def wrn28_2(num_classes: int, in_channels: int = 3) -> nn.Module:
    return WideResNet(28, 2, num_classes, in_channels)


# --- A small, fast network for CPU work --------------------------------------------------


class ConvNet(Classifier):
    """Three 3x3 conv layers (32/64/128 ch, the last two stride 2) and a linear head;
    ~0.1M parameters. Not in the paper: it exists so CPU experiments finish in seconds."""

    def __init__(self, num_classes: int, in_channels: int = 3):
        super().__init__()

        def cbr(ci: int, co: int, s: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(ci, co, 3, s, 1, bias=False), nn.BatchNorm2d(co), nn.ReLU())

        self.features = nn.Sequential(cbr(in_channels, 32, 1), cbr(32, 64, 2), cbr(64, 128, 2))
        self.stem = nn.Identity()
        self._stage_ends = (0, 1, 2)
        self._widths = (32, 64, 128)
        self.embed_dim = 128
        self.head = nn.Linear(128, num_classes)
        _init_weights(self)


@MODELS.register("convnet")
def convnet(num_classes: int, in_channels: int = 3) -> nn.Module:
    return ConvNet(num_classes, in_channels)


def embed_dim(name: str, num_classes: int, in_channels: int = 3) -> int:
    """D of the model's ``embed`` (built on the meta device: no memory, no time)."""
    with torch.device("meta"):
        return build_model(name, num_classes, in_channels).embed_dim


def stage_widths(name: str, num_classes: int, in_channels: int = 3) -> list[int]:
    """The channels at the end of each of the model's stages (meta device, as ``embed_dim``)."""
    with torch.device("meta"):
        return build_model(name, num_classes, in_channels).stage_widths
