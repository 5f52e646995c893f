"""CIFAR ResNets of He et al. (2016, Sec. 4.2), with and without BatchNorm.

Three stages of ``n`` basic blocks with 16, 32 and 64 channels on 32x32 inputs, depth ``6 n + 2``; option-A
shortcuts (identity; where the shape changes, stride-2 subsampling and zero-padding of the new channels, so
shortcuts carry no parameters); global average pooling and a linear classifier. Without BatchNorm (the setting
of Ghorbani et al. 2019, Sec. 4) the BN layers are removed and the convolutions get biases.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hessspec.models._validate import flag, positive_int
from hessspec.models.mlp import he_init_

# n blocks per stage for each depth 6n + 2.
CIFAR_RESNET_DEPTHS = {20: 3, 32: 5, 44: 7, 56: 9, 110: 18}


class _PadShortcut(nn.Module):
    """Option-A shortcut: take every second pixel, zero-pad the channels from ``in_ch`` to ``out_ch``."""

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x[:, :, ::2, ::2]
        return F.pad(x, (0, 0, 0, 0, self.extra // 2, self.extra - self.extra // 2))


class BasicBlock(nn.Module):
    """conv3x3 -> [BN] -> ReLU -> conv3x3 -> [BN], plus the shortcut, then ReLU.

    Args:
        in_channels: input channels.
        out_channels: output channels.
        stride: 1, or 2 to halve the resolution (with ``out_channels = 2 in_channels``).
        batch_norm: use BatchNorm2d (convolutions without bias) or nothing (convolutions with bias).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int, batch_norm: bool) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, stride=1, padding=1, bias=not batch_norm)
        self.bn2 = nn.BatchNorm2d(out_channels) if batch_norm else nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut: nn.Module = _PadShortcut(in_channels, out_channels)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """ResNet-(6n+2) for CIFAR (He et al. 2016): 269,722 parameters for n = 3 and 464,154 for n = 5 (with BN,
    10 classes).

    Args:
        blocks_per_stage: n.
        num_classes: outputs of the classifier.
        batch_norm: with BatchNorm2d, or without (convolutions then have biases).
        in_channels: input channels (3 for CIFAR).

    Raises:
        ValueError: for non-positive sizes or a non-bool ``batch_norm``.
    """

    def __init__(
        self, blocks_per_stage: int, num_classes: int = 10, batch_norm: bool = True, in_channels: int = 3
    ) -> None:
        super().__init__()
        positive_int("blocks_per_stage", blocks_per_stage)
        positive_int("num_classes", num_classes)
        positive_int("in_channels", in_channels)
        flag("batch_norm", batch_norm)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=not batch_norm)
        self.bn1 = nn.BatchNorm2d(16) if batch_norm else nn.Identity()
        stages = []
        channels = 16
        for stage_channels, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlock(channels, stage_channels, stride if index == 0 else 1, batch_norm))
                channels = stage_channels
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, num_classes] for images [batch, in_channels, H, W] (32x32 for CIFAR)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)
