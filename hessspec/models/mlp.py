"""Small networks for the built-in digits data: a fully connected MLP and a two-layer CNN."""

from __future__ import annotations

import torch
from torch import nn

from hessspec.models._validate import flag, positive_int

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "sigmoid": nn.Sigmoid,
}
# Gains for He (Kaiming) normal initialisation; GELU and SiLU behave like ReLU for positive inputs.
_KAIMING_NONLINEARITY = {"relu": "relu", "tanh": "tanh", "gelu": "relu", "silu": "relu", "sigmoid": "sigmoid"}


def _activation(name: str) -> nn.Module:
    if name not in ACTIVATIONS:
        msg = f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}"
        raise ValueError(msg)
    return ACTIVATIONS[name]()


def he_init_(module: nn.Module, nonlinearity: str = "relu") -> None:
    """He et al. (2015) normal initialisation (fan-in) of every Linear/Conv weight; biases set to zero.

    Args:
        module: initialised in place, recursively.
        nonlinearity: passed to ``nn.init.kaiming_normal_`` to pick the gain.
    """
    for sub in module.modules():
        if isinstance(sub, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            nn.init.kaiming_normal_(sub.weight, mode="fan_in", nonlinearity=nonlinearity)
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)


class MLP(nn.Module):
    """Fully connected network: flatten, ``depth - 1`` blocks Linear -> [BatchNorm1d] -> activation, Linear.

    ``depth`` counts the Linear layers (a "2-layer MLP" has one hidden layer). He initialisation.

    Args:
        in_features: size of the flattened input (64 for the 8x8 digits).
        num_classes: number of outputs.
        width: hidden units per layer.
        depth: number of Linear layers, >= 1.
        batch_norm: insert BatchNorm1d after each hidden Linear layer (whose bias is then dropped, as BN's
            shift makes it redundant).
        activation: one of ``ACTIVATIONS``.

    Raises:
        ValueError: for a non-positive size, an unknown activation or a non-bool ``batch_norm``.
    """

    def __init__(
        self,
        in_features: int = 64,
        num_classes: int = 10,
        width: int = 64,
        depth: int = 6,
        batch_norm: bool = False,
        activation: str = "relu",
    ) -> None:
        super().__init__()
        positive_int("in_features", in_features)
        positive_int("num_classes", num_classes)
        positive_int("width", width)
        positive_int("depth", depth)
        flag("batch_norm", batch_norm)
        layers: list[nn.Module] = [nn.Flatten()]
        features = in_features
        for _ in range(depth - 1):
            layers.append(nn.Linear(features, width, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm1d(width))
            layers.append(_activation(activation))
            features = width
        layers.append(nn.Linear(features, num_classes))
        self.layers = nn.Sequential(*layers)
        he_init_(self, _KAIMING_NONLINEARITY[activation])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, num_classes] for inputs [batch, ...] with ``in_features`` elements per example."""
        return self.layers(x)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (padding 1) for small single-channel images such as the 8x8 digits.

    conv(in -> width) -> [BN] -> ReLU -> conv(width -> 2 width) -> [BN] -> ReLU -> 2x2 max-pool -> flatten ->
    Linear. With the defaults on 8x8 inputs: 16 and 32 channels, a 512 -> 10 head, 9,930 parameters (9,978
    with BN). He initialisation.

    Args:
        in_channels: input channels.
        num_classes: number of outputs.
        width: channels of the first convolution (the second has twice as many).
        batch_norm: BatchNorm2d after each convolution (whose bias is then dropped).
        image_size: height = width of the input images (8 for digits); must be even.

    Raises:
        ValueError: for a non-positive size, an odd image size or a non-bool ``batch_norm``.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        batch_norm: bool = False,
        image_size: int = 8,
    ) -> None:
        super().__init__()
        positive_int("in_channels", in_channels)
        positive_int("num_classes", num_classes)
        positive_int("width", width)
        positive_int("image_size", image_size)
        flag("batch_norm", batch_norm)
        if image_size % 2:
            msg = f"image_size must be even (the network max-pools by 2), got {image_size}"
            raise ValueError(msg)

        def norm(channels: int) -> nn.Module:
            return nn.BatchNorm2d(channels) if batch_norm else nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1, bias=not batch_norm),
            norm(width),
            nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, bias=not batch_norm),
            norm(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Linear(2 * width * (image_size // 2) ** 2, num_classes)
        he_init_(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [batch, num_classes] for images [batch, in_channels, image_size, image_size]."""
        return self.classifier(torch.flatten(self.features(x), 1))
