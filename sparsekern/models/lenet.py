"""LeNet-300-100 and LeNet-5 (Caffe variant) for 28x28 MNIST-like input in [0, 1]."""
from __future__ import annotations

from torch import Tensor, nn


class LeNet300100(nn.Module):
    """MLP 784-300-100-10 with ReLU (LeCun et al. 1998; Han et al. 2015's pruning baseline).

    Shapes: input [N, C, 28, 28] (flattened internally) -> logits [N, num_classes].
    266,610 parameters at C=1, num_classes=10.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.input_shape = (in_channels, 28, 28)
        self.fc1 = nn.Linear(in_channels * 28 * 28, 300)
        self.fc2 = nn.Linear(300, 100)
        self.fc3 = nn.Linear(100, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)                      # [N, C*28*28]
        x = self.relu(self.fc1(x))            # [N, 300]
        x = self.relu(self.fc2(x))            # [N, 100]
        return self.fc3(x)                    # [N, num_classes]


class LeNet5(nn.Module):
    """LeNet-5 as in Caffe's examples/mnist/lenet.prototxt: conv 20 5x5 -> maxpool 2 -> conv 50
    5x5 -> maxpool 2 -> fc 500 -> ReLU -> fc 10. As in Caffe there is no nonlinearity after the
    convs (the max pools are the only one there).

    Shapes: input [N, C, 28, 28] -> [N, 20, 24, 24] -> [N, 20, 12, 12] -> [N, 50, 8, 8] ->
    [N, 50, 4, 4] -> [N, 800] -> [N, 500] -> logits [N, num_classes].
    431,080 parameters at C=1, num_classes=10.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1):
        super().__init__()
        self.input_shape = (in_channels, 28, 28)
        self.conv1 = nn.Conv2d(in_channels, 20, 5)
        self.conv2 = nn.Conv2d(20, 50, 5)
        self.fc1 = nn.Linear(50 * 4 * 4, 500)
        self.fc2 = nn.Linear(500, num_classes)
        self.pool = nn.MaxPool2d(2)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = self.pool(self.conv1(x))
        x = self.pool(self.conv2(x))
        x = self.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
