"""A small VGG-like CIFAR net: three stages of two 3x3 conv-BN-ReLU layers and a 2x2 max pool
(64, 128, 256 channels), then fc 4096 -> 256 -> ReLU -> fc num_classes.

BatchNorm after every conv (convs without bias, BN supplies it): it keeps training stable without
careful initialisation or input normalisation (inputs stay in [0, 1] for the attacks), and it
rescales the activations of sparse layers whose fan-in shrinks with the density. No dropout.
About 2.2 M parameters and 0.15 GMAC per image: an epoch of CIFAR-10 is CPU-feasible.
"""
from __future__ import annotations

from torch import Tensor, nn

# Output channels of each conv; "M" is a 2x2 max pool.
VGG_LIKE_CFG = (64, 64, "M", 128, 128, "M", 256, 256, "M")


class VGGLike(nn.Module):
    """Shapes: input [N, C, 32, 32] -> features [N, 256, 4, 4] -> logits [N, num_classes].

    Layer names (registration = forward order): features.{0,3,7,10,14,17} (convs), fc1, fc2.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 3, cfg=VGG_LIKE_CFG,
                 hidden: int = 256):
        super().__init__()
        self.input_shape = (in_channels, 32, 32)
        layers: list[nn.Module] = []
        channels, size = in_channels, 32
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                layers += [nn.Conv2d(channels, v, 3, padding=1, bias=False), nn.BatchNorm2d(v),
                           nn.ReLU(inplace=True)]
                channels = v
        self.features = nn.Sequential(*layers)
        self.fc1 = nn.Linear(channels * size * size, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x).flatten(1)      # [N, 256*4*4]
        x = self.relu(self.fc1(x))           # [N, hidden]
        return self.fc2(x)                   # [N, num_classes]
