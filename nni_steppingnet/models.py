"""Paper models (LeNet-3C1L, LeNet-5, CIFAR VGG-16) registered with timm.

Every entry point takes a ``width`` factor that multiplies all hidden channel and
feature counts: this is the expansion ratio the SteppingNet paper applies before
construction. Importing this module registers the models, so
``timm.create_model("lenet5", width=2.0)`` works afterwards.

Module paths are stable (``features.<i>``, ``hidden.<i>``, ``classifier``) because
SteppingNet derives group names and checkpoint keys from them.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Final

import torch
from timm.models import register_model
from torch import nn

__all__ = [
    "LeNet3C1L",
    "LeNet5",
    "VGG16CIFAR",
    "VGG16_CFG",
    "scale_width",
    "init_weights",
    "lenet3c1l",
    "lenet5",
    "vgg16_cifar",
]

logger = logging.getLogger(__name__)

# Standard CIFAR VGG-16 layout; "M" is a 2x2 max pool.
VGG16_CFG: Final[tuple[int | str, ...]] = (
    64,
    64,
    "M",
    128,
    128,
    "M",
    256,
    256,
    256,
    "M",
    512,
    512,
    512,
    "M",
    512,
    512,
    512,
    "M",
)

# Keyword arguments timm.create_model forwards to every entry point; they carry
# hub/pretrained metadata that has no meaning for these local models.
_TIMM_PASSTHROUGH: Final[frozenset[str]] = frozenset({"pretrained_cfg", "pretrained_cfg_overlay", "cache_dir"})


def scale_width(channels: int, width: float) -> int:
    """Return ``channels * width`` rounded half up, at least 1."""
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    # floor(x + 0.5) rather than round(): Python's banker's rounding would turn
    # 2.5 into 2, which surprises users reading the paper's ratios.
    return max(1, int(math.floor(channels * width + 0.5)))


def _check_common(num_classes: int, in_chans: int, img_size: int) -> None:
    for name, value in (("num_classes", num_classes), ("in_chans", in_chans), ("img_size", img_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _conv_bn_relu(in_ch: int, out_ch: int, kernel_size: int, padding: int) -> list[nn.Module]:
    return [
        nn.Conv2d(in_ch, out_ch, kernel_size=kernel_size, padding=padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(inplace=True),
    ]


def init_weights(model: nn.Module) -> None:
    """torchvision-style init: Kaiming-normal convs (fan_out, ReLU), unit BN, small classifier.

    PyTorch's default conv init shrinks activations layer by layer; in a randomly initialised
    13-conv VGG the logits would be little more than the classifier bias.
    """
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.BatchNorm1d)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
    classifier = getattr(model, "classifier", None)
    if isinstance(classifier, nn.Linear):
        nn.init.normal_(classifier.weight, 0.0, 0.01)
        nn.init.zeros_(classifier.bias)


class _ClassifierMixin:
    """timm-style classifier accessors shared by the models below."""

    classifier: nn.Linear
    num_classes: int

    def get_classifier(self) -> nn.Linear:
        """Return the final ``nn.Linear`` producing the logits."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for ``num_classes``."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        old = self.classifier
        self.classifier = nn.Linear(old.in_features, num_classes, device=old.weight.device, dtype=old.weight.dtype)
        self.num_classes = num_classes


class LeNet3C1L(_ClassifierMixin, nn.Module):
    """LeNet-3C1L as in Any-Width Networks: three conv layers and one linear layer."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        _check_common(num_classes, in_chans, img_size)
        if img_size < 4:
            raise ValueError(f"lenet3c1l needs img_size >= 4 (two 2x2 pools), got {img_size}")
        c1, c2, c3 = (scale_width(c, width) for c in (32, 32, 64))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.width = float(width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, c1, 3, 1),
            *_conv_bn_relu(c1, c2, 3, 1),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c2, c3, 5, 2),
            nn.MaxPool2d(2),
        )
        spatial = img_size // 4
        self.num_features = c3 * spatial * spatial
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


class LeNet5(_ClassifierMixin, nn.Module):
    """LeNet-5 with batch norm: two conv layers, two hidden linear layers, classifier."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        _check_common(num_classes, in_chans, img_size)
        # conv5 pad2 -> pool -> conv5 (valid) -> pool must leave at least 1x1.
        if img_size < 12:
            raise ValueError(f"lenet5 needs img_size >= 12, got {img_size}")
        c1, c2, f1, f2 = (scale_width(c, width) for c in (6, 16, 120, 84))
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.width = float(width)
        self.features = nn.Sequential(
            *_conv_bn_relu(in_chans, c1, 5, 2),
            nn.MaxPool2d(2),
            *_conv_bn_relu(c1, c2, 5, 0),
            nn.MaxPool2d(2),
        )
        spatial = (img_size // 2 - 4) // 2
        flat = c2 * spatial * spatial
        self.hidden = nn.Sequential(
            nn.Linear(flat, f1),
            nn.ReLU(inplace=True),
            nn.Linear(f1, f2),
            nn.ReLU(inplace=True),
        )
        self.num_features = f2
        self.classifier = nn.Linear(f2, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = torch.flatten(x, 1)
        x = self.hidden(x)
        return self.classifier(x)


class VGG16CIFAR(_ClassifierMixin, nn.Module):
    """The usual CIFAR VGG-16 (13 conv+BN+ReLU, global average pool, one linear layer)."""

    def __init__(self, num_classes: int = 10, in_chans: int = 3, img_size: int = 32, width: float = 1.0) -> None:
        super().__init__()
        _check_common(num_classes, in_chans, img_size)
        if img_size < 32:
            raise ValueError(f"vgg16_cifar needs img_size >= 32 (five 2x2 pools), got {img_size}")
        layers: list[nn.Module] = []
        in_ch = in_chans
        for item in VGG16_CFG:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                out_ch = scale_width(int(item), width)
                layers.extend(_conv_bn_relu(in_ch, out_ch, 3, 1))
                in_ch = out_ch
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.img_size = img_size
        self.width = float(width)
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.num_features = in_ch
        self.classifier = nn.Linear(in_ch, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)
        x = self.pool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


def _build(
    cls: type[LeNet3C1L] | type[LeNet5] | type[VGG16CIFAR],
    name: str,
    pretrained: bool,
    num_classes: int,
    in_chans: int,
    img_size: int,
    width: float,
    kwargs: dict[str, Any],
) -> nn.Module:
    if pretrained:
        raise ValueError(
            f"{name}: no pretrained weights are published for this model. Build it with "
            "pretrained=False and load a local checkpoint with "
            "model.load_state_dict(torch.load(path))."
        )
    unknown = sorted(k for k in kwargs if k not in _TIMM_PASSTHROUGH)
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword argument(s): {', '.join(unknown)}")
    model = cls(num_classes=num_classes, in_chans=in_chans, img_size=img_size, width=width)
    logger.debug(
        "built %s (num_classes=%d, in_chans=%d, img_size=%d, width=%g)",
        name,
        num_classes,
        in_chans,
        img_size,
        width,
    )
    return model


@register_model
def lenet3c1l(
    pretrained: bool = False,
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """LeNet-3C1L (32, 32, pool, 64, pool, linear), channels scaled by ``width``."""
    return _build(LeNet3C1L, "lenet3c1l", pretrained, num_classes, in_chans, img_size, width, kwargs)


@register_model
def lenet5(
    pretrained: bool = False,
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """LeNet-5 (6, pool, 16, pool, 120, 84, linear), channels scaled by ``width``."""
    return _build(LeNet5, "lenet5", pretrained, num_classes, in_chans, img_size, width, kwargs)


@register_model
def vgg16_cifar(
    pretrained: bool = False,
    *,
    num_classes: int = 10,
    in_chans: int = 3,
    img_size: int = 32,
    width: float = 1.0,
    **kwargs: Any,
) -> nn.Module:
    """CIFAR VGG-16 with BN and global average pooling, channels scaled by ``width``."""
    return _build(VGG16CIFAR, "vgg16_cifar", pretrained, num_classes, in_chans, img_size, width, kwargs)
