"""MobileFaceNet: the small face backbone of insightface's arcface_torch (``mbf``).

Chen et al., "MobileFaceNets: Efficient CNNs for Accurate Real-Time Face Verification on
Mobile Devices" (arXiv:1804.07573), in the form arcface_torch trains and releases
(``backbones/mobilefacenet.py``, after cavaface): MobileNetV2 bottlenecks (1x1 expand ->
depthwise 3x3 -> 1x1 linear projection, a shortcut where the shape stays) with PReLU,
and a global depthwise convolution (GDC) over the last feature map instead of a fully
connected layer over it, then Linear -> BatchNorm1d to the embedding.

* stem: conv3x3 stride 2 -> BN -> PReLU, then a grouped 3x3 (one block) or a stack of
  bottlenecks;
* three stages, each a stride-2 bottleneck then a stack of stride-1 ones, at widths
  ``64s, 128s, 128s`` (``s = scale``), expanding to 128, 256 and 256 channels
  (stage 3's stride-2 bottleneck to 512; arcface_torch's fixed expansion widths, kept
  so its released weights load);
* ``conv_sep``: 1x1 to 512 channels; GDC: a 512-group convolution over the whole
  ``image_size // 16`` square map -> Linear (no bias) -> BatchNorm1d.

Module and parameter names are arcface_torch's, so ``model.weights`` takes its released
``backbone.pth`` of an ``mbf`` or ``mbf_large`` model as it is (docs/TRAINING.md). Two
differences: the GDC kernel follows ``image_size`` instead of being fixed at 7 (112
gives 7), and ``dropout`` (0 in arcface_torch, which has none) is applied before the
Linear layer. Mixed precision is Lightning's (``trainer.precision``), not a flag of the
model.
"""

from __future__ import annotations

import torch
from torch import nn

from .iresnet import check_sizes

__all__ = ["MobileFaceNet", "mbf", "mbf_large"]


class _Layers(nn.Module):
    """A module whose one child is ``layers`` (arcface_torch's naming at every level)."""

    def __init__(self, *modules: nn.Module) -> None:
        super().__init__()
        self.layers = nn.Sequential(*modules)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def _conv_bn(
    cin: int,
    cout: int,
    kernel: int = 1,
    stride: int = 1,
    groups: int = 1,
    prelu: bool = True,
    padding: int | None = None,
) -> _Layers:
    """Conv (no bias) -> BN, then PReLU unless ``prelu`` is False (a linear projection)."""
    pad = kernel // 2 if padding is None else padding
    modules: list[nn.Module] = [
        nn.Conv2d(cin, cout, kernel, stride, pad, groups=groups, bias=False),
        nn.BatchNorm2d(cout),
    ]
    if prelu:
        modules.append(nn.PReLU(cout))
    return _Layers(*modules)


class _Bottleneck(_Layers):
    """1x1 to ``expand`` channels -> depthwise 3x3 (``stride``) -> linear 1x1 to ``cout``;
    plus the input where ``residual`` (same shape)."""

    def __init__(self, cin: int, cout: int, expand: int, stride: int, residual: bool) -> None:
        super().__init__(
            _conv_bn(cin, expand),
            _conv_bn(expand, expand, 3, stride, groups=expand),
            _conv_bn(expand, cout, prelu=False),
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.layers(x)
        return x + y if self.residual else y


def _stack(channels: int, blocks: int, expand: int) -> _Layers:
    """``blocks`` stride-1 residual bottlenecks at ``channels``."""
    return _Layers(*(_Bottleneck(channels, channels, expand, 1, True) for _ in range(blocks)))


class MobileFaceNet(nn.Module):
    """MobileFaceNet face embedding network (arcface_torch layout).

    Args:
        blocks: Bottlenecks in the stem (1: a grouped 3x3 instead) and in each of the
            three stages after its stride-2 bottleneck: ``(1, 4, 6, 2)`` is
            arcface_torch's ``mbf``, ``(2, 8, 12, 4)`` with ``scale=4`` its ``mbf_large``.
        scale: Width multiplier: the stages have ``64 * scale, 128 * scale`` channels.
        embedding_dim: Size of the output embedding.
        image_size: Side of the (square) input; a multiple of 16 (four stride-2 layers,
            then the GDC over the whole ``image_size // 16`` map).
        dropout: Dropout probability before the embedding's Linear layer.

    Raises:
        ValueError: If an argument is out of range.
    """

    num_stages = 3
    """Stages that ``model.shared_layers`` can share (see :meth:`trunk`)."""

    def __init__(
        self,
        blocks: tuple[int, int, int, int] | list[int] = (1, 4, 6, 2),
        scale: int = 2,
        embedding_dim: int = 512,
        image_size: int = 112,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        blocks = tuple(blocks)
        if len(blocks) != 4 or not all(isinstance(n, int) and n >= 1 for n in blocks):
            raise ValueError(f"blocks must be four positive block counts, got {blocks!r}")
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale!r}")
        check_sizes(
            "MobileFaceNet", "four stride-2 layers, then a convolution over the whole map",
            image_size, embedding_dim, dropout,
        )  # fmt: skip
        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.blocks = blocks
        self.scale = scale

        narrow, wide = 64 * scale, 128 * scale
        stem = (
            _conv_bn(narrow, narrow, 3, groups=64)
            if blocks[0] == 1
            else _stack(narrow, blocks[0], expand=128)
        )
        self.layers = nn.ModuleList(
            [
                _conv_bn(3, narrow, 3, stride=2),
                stem,
                _Bottleneck(narrow, narrow, 128, stride=2, residual=False),
                _stack(narrow, blocks[1], expand=128),
                _Bottleneck(narrow, wide, 256, stride=2, residual=False),
                _stack(wide, blocks[2], expand=256),
                _Bottleneck(wide, wide, 512, stride=2, residual=False),
                _stack(wide, blocks[3], expand=256),
            ]
        )
        self.conv_sep = _conv_bn(wide, 512)
        side = image_size // 16
        self.features = _Layers(  # the GDC
            _conv_bn(512, 512, side, groups=512, prelu=False, padding=0),
            nn.Flatten(),
            nn.Linear(512, embedding_dim, bias=False),
            nn.BatchNorm1d(embedding_dim),
        )
        self.dropout = nn.Dropout(p=dropout)

        # Initialisation as in arcface_torch's MobileFaceNet.
        for module in self.modules():
            if isinstance(module, nn.Conv2d | nn.Linear):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)

    def trunk_modules(self, stages: int) -> list[nn.Module]:
        """The modules :meth:`trunk` runs: the stem and the first ``stages`` stages."""
        return list(self.layers[: 2 + 2 * stages])

    def trunk(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stem and the first ``stages`` stages: feature maps that :meth:`tail`
        turns into embeddings (``tail(trunk(x, n), n) == forward(x)``)."""
        for layer in self.layers[: 2 + 2 * stages]:
            x = layer(x)
        return x

    def tail(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stages after the first ``stages``, ``conv_sep`` and the GDC embedding."""
        for layer in self.layers[2 + 2 * stages :]:
            x = layer(x)
        gdc, flatten, linear, bn = self.features.layers
        return bn(linear(self.dropout(flatten(gdc(self.conv_sep(x))))))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes embeddings.

        Args:
            x: Images ``[B, 3, image_size, image_size]``.

        Returns:
            Embeddings ``[B, embedding_dim]``, not L2-normalised.
        """
        return self.tail(self.trunk(x, 0), 0)

    def extra_repr(self) -> str:
        """Shows the architecture hyper-parameters in ``print(module)``."""
        return (
            f"blocks={self.blocks}, scale={self.scale}, image_size={self.image_size}, "
            f"embedding_dim={self.embedding_dim}"
        )


def mbf(embedding_dim: int = 512, image_size: int = 112, dropout: float = 0.0) -> MobileFaceNet:
    """arcface_torch's ``mbf``: blocks (1, 4, 6, 2), scale 2 (2.06M parameters at 512-d)."""
    return MobileFaceNet((1, 4, 6, 2), 2, embedding_dim, image_size, dropout)


def mbf_large(
    embedding_dim: int = 512, image_size: int = 112, dropout: float = 0.0
) -> MobileFaceNet:
    """arcface_torch's ``mbf_large``: blocks (2, 8, 12, 4), scale 4 (6.31M parameters)."""
    return MobileFaceNet((2, 8, 12, 4), 4, embedding_dim, image_size, dropout)
