"""CIFAR ResNets of He et al. 2016 (Sec. 4.2): a 3x3 conv with 16 channels, three stages of n
basic blocks with 16, 32, 64 channels (the first block of stages 2 and 3 has stride 2), global
average pooling and a fc layer; depth 6n + 2 (ResNet-20: n=3, ResNet-32: n=5).

Shortcuts are option A, as in the paper's CIFAR experiments: identity, and where the shape
changes, subsample by 2 and zero-pad the new channels. They carry no parameters, so every
weight layer is a conv or the fc (ResNet-20: 19 convs + fc, 0.27 M parameters; ResNet-32: 31
convs + fc, 0.46 M). Every conv is followed by BatchNorm and has no bias.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn


class PadShortcut(nn.Module):
    """Option A shortcut: [N, C_in, H, W] -> [N, C_out, H/stride, W/stride], the input
    subsampled and its channels zero-padded evenly on both sides."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.stride = stride
        extra = out_channels - in_channels
        self.pad = (extra // 2, extra - extra // 2)

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, ::self.stride, ::self.stride]
        return F.pad(x, (0, 0, 0, 0, *self.pad))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN, plus the shortcut, then ReLU.
    Shapes: [N, in_channels, H, W] -> [N, out_channels, H/stride, W/stride]."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        if stride != 1 or in_channels != out_channels:
            self.shortcut = PadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """Shapes: input [N, C, 32, 32] -> [N, 16, 32, 32] -> [N, 32, 16, 16] -> [N, 64, 8, 8] ->
    pooled [N, 64] -> logits [N, num_classes].

    Layer names (registration = forward order): conv1, layer{1,2,3}.{i}.conv{1,2}, fc.
    """

    def __init__(self, depth: int, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n + 2 with n >= 1, got {depth}")
        n = (depth - 2) // 6
        self.depth = depth
        self.input_shape = (in_channels, 32, 32)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.layer1 = self._stage(16, 16, n, stride=1)
        self.layer2 = self._stage(16, 32, n, stride=2)
        self.layer3 = self._stage(32, 64, n, stride=2)
        self.fc = nn.Linear(64, num_classes)

    @staticmethod
    def _stage(in_channels: int, out_channels: int, n: int, stride: int) -> nn.Sequential:
        blocks = [BasicBlock(in_channels, out_channels, stride)]
        blocks += [BasicBlock(out_channels, out_channels) for _ in range(n - 1)]
        return nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        x = F.adaptive_avg_pool2d(x, 1).flatten(1)   # [N, 64]
        return self.fc(x)
