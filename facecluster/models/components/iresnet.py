"""IResNet: the standard face-recognition backbone of insightface's arcface_torch.

The architecture follows the "improved" residual block of Duta et al., "Improved
Residual Networks for Image and Video Recognition" (ICPR 2020, arXiv:2004.04989), in
the form used by Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face
Recognition" (CVPR 2019, arXiv:1801.07698) and their reference implementation
(github.com/deepinsight/insightface, ``recognition/arcface_torch/backbones/iresnet.py``):

* stem: conv3x3 with stride 1 -> BN -> PReLU (faces are small, so the stem keeps the
  full resolution and every stage halves it);
* ``IBasicBlock``: BN -> conv3x3 -> BN -> PReLU -> conv3x3(stride) -> BN, plus a
  conv1x1+BN shortcut where the shape changes; no activation after the addition;
* four stages of widths ``w, 2w, 4w, 8w`` (``w = 64`` in the paper), each with stride 2;
* output ("BN-Dropout-FC-BN" embedding): BN2d -> Dropout -> Flatten ->
  Linear(8w * s * s -> embedding_dim) -> BN1d, where ``s = image_size // 16``.

Differences from arcface_torch: the spatial size of the flattened feature map is
derived from ``image_size`` instead of being hard-coded to 7x7, the base width is a
parameter (so a narrow model can train on a CPU), and the dropout is not in-place.
The final BN1d matches arcface_torch: affine, with its scale fixed to 1
(``requires_grad=False``) and a learnable shift.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = [
    "IBasicBlock",
    "IResNet",
    "iresnet18",
    "iresnet34",
    "iresnet50",
    "iresnet100",
    "iresnet200",
]

# arcface_torch uses eps=1e-5 everywhere (the torch default); spelled out so that the
# match with the reference checkpoints' BN statistics stays obvious.
_BN_EPS = 1e-5

# Blocks per stage for each depth, as in arcface_torch.
_LAYERS: dict[int, tuple[int, int, int, int]] = {
    18: (2, 2, 2, 2),
    34: (3, 4, 6, 3),
    50: (3, 4, 14, 3),
    100: (3, 13, 30, 3),
    200: (6, 26, 60, 6),
}


def check_sizes(
    network: str, why: str, image_size: int, embedding_dim: int, dropout: float
) -> None:
    """Refuse the sizes a face network of four stride-2 steps cannot take (IResNet,
    MobileFaceNet); ``why`` it needs a multiple of 16.

    Raises:
        ValueError: naming the argument.
    """
    if image_size < 16 or image_size % 16 != 0:
        raise ValueError(
            f"{network} needs image_size to be a positive multiple of 16 ({why}), got "
            f"image_size={image_size}"
        )
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


def _conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """3x3 convolution with padding 1 and no bias (a BN always follows)."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)


def _conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    """1x1 convolution without bias, used by the projection shortcut."""
    return nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=False)


class IBasicBlock(nn.Module):
    """Improved basic residual block: BN-conv3x3-BN-PReLU-conv3x3(stride)-BN + shortcut.

    Args:
        inplanes: Input channels.
        planes: Output channels.
        stride: Stride of the second convolution (and of the shortcut).
        downsample: Projection applied to the shortcut when the shape changes.
    """

    def __init__(
        self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None
    ) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes, eps=_BN_EPS)
        self.conv1 = _conv3x3(inplanes, planes)
        self.bn2 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.prelu = nn.PReLU(planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn3 = nn.BatchNorm2d(planes, eps=_BN_EPS)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Applies the block.

        Args:
            x: Feature map ``[B, inplanes, H, W]``.

        Returns:
            Feature map ``[B, planes, H / stride, W / stride]``.
        """
        identity = x if self.downsample is None else self.downsample(x)
        out = self.bn1(x)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.prelu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        return out + identity


class IResNet(nn.Module):
    """IResNet face embedding network (arcface_torch layout).

    Args:
        layers: Number of ``IBasicBlock`` in each of the four stages.
        embedding_dim: Size of the output embedding.
        image_size: Height and width of the (square) input; must be a multiple of 16
            because the four stride-2 stages are followed by a fully connected layer
            over the whole ``image_size // 16`` square feature map.
        dropout: Dropout probability before the fully connected layer.
        width: Base channel count ``w``; the stages have ``w, 2w, 4w, 8w`` channels.
        zero_init_residual: Zero the scale of each block's last BN so that every block
            starts as the identity (off in arcface_torch's default configs).

    Raises:
        ValueError: If an argument is out of range.
    """

    def __init__(
        self,
        layers: tuple[int, int, int, int] | list[int],
        embedding_dim: int = 512,
        image_size: int = 112,
        dropout: float = 0.0,
        width: int = 64,
        zero_init_residual: bool = False,
    ) -> None:
        super().__init__()
        if len(layers) != 4 or any(int(n) < 1 for n in layers):
            raise ValueError(f"layers must be four positive block counts, got {layers!r}")
        check_sizes(
            "IResNet", "four stride-2 stages feed a fully connected layer",
            image_size, embedding_dim, dropout,
        )  # fmt: skip
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")

        self.embedding_dim = embedding_dim
        self.image_size = image_size
        self.width = width
        self.layers = tuple(int(n) for n in layers)

        self.inplanes = width
        self.conv1 = _conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width, eps=_BN_EPS)
        self.prelu = nn.PReLU(width)
        self.layer1 = self._make_layer(width, self.layers[0], stride=2)
        self.layer2 = self._make_layer(2 * width, self.layers[1], stride=2)
        self.layer3 = self._make_layer(4 * width, self.layers[2], stride=2)
        self.layer4 = self._make_layer(8 * width, self.layers[3], stride=2)

        side = image_size // 16
        self.bn2 = nn.BatchNorm2d(8 * width, eps=_BN_EPS)
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(8 * width * side * side, embedding_dim)
        self.features = nn.BatchNorm1d(embedding_dim, eps=_BN_EPS)

        # Initialisation as in arcface_torch: conv weights N(0, 0.1), BN to identity.
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.normal_(module.weight, 0.0, 0.1)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.constant_(module.weight, 1.0)
                nn.init.constant_(module.bias, 0.0)
        # arcface_torch fixes the embedding BN's scale at 1: a learnable scale would only
        # rescale dimensions before the L2 normalisation of the margin head.
        nn.init.constant_(self.features.weight, 1.0)
        self.features.weight.requires_grad = False
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, IBasicBlock):
                    nn.init.constant_(module.bn3.weight, 0.0)

    def _make_layer(self, planes: int, blocks: int, stride: int) -> nn.Sequential:
        """Builds one stage; its first block changes the stride and the width."""
        downsample = None
        if stride != 1 or self.inplanes != planes:
            downsample = nn.Sequential(
                _conv1x1(self.inplanes, planes, stride), nn.BatchNorm2d(planes, eps=_BN_EPS)
            )
        modules = [IBasicBlock(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes
        modules.extend(IBasicBlock(planes, planes) for _ in range(1, blocks))
        return nn.Sequential(*modules)

    num_stages = 4
    """Stages that ``model.shared_layers`` can share (see :meth:`trunk`)."""

    def _stages(self) -> list[nn.Sequential]:
        return [self.layer1, self.layer2, self.layer3, self.layer4]

    def trunk_modules(self, stages: int) -> list[nn.Module]:
        """The modules :meth:`trunk` runs: the stem and the first ``stages`` stages."""
        return [self.conv1, self.bn1, self.prelu, *self._stages()[:stages]]

    def trunk(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stem and the first ``stages`` stages: feature maps that :meth:`tail`
        turns into embeddings (``tail(trunk(x, n), n) == forward(x)``)."""
        x = self.prelu(self.bn1(self.conv1(x)))
        for layer in self._stages()[:stages]:
            x = layer(x)
        return x

    def tail(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stages after the first ``stages`` and the embedding layers."""
        for layer in self._stages()[stages:]:
            x = layer(x)
        x = self.bn2(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return self.features(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Computes embeddings.

        Args:
            x: Images ``[B, 3, image_size, image_size]``.

        Returns:
            Embeddings ``[B, embedding_dim]``, not L2-normalised.
        """
        x = self.prelu(self.bn1(self.conv1(x)))
        x = self.layer1(x)
        x = self.layer2(x)
        x = self.layer3(x)
        x = self.layer4(x)
        x = self.bn2(x)
        x = self.dropout(x)
        x = torch.flatten(x, 1)
        x = self.fc(x)
        return self.features(x)

    def extra_repr(self) -> str:
        """Shows the architecture hyper-parameters in ``print(module)``."""
        return (
            f"layers={self.layers}, width={self.width}, image_size={self.image_size}, "
            f"embedding_dim={self.embedding_dim}"
        )


def _iresnet(
    depth: int,
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """Builds the IResNet of the given depth (see ``IResNet`` for the arguments)."""
    return IResNet(
        _LAYERS[depth],
        embedding_dim=embedding_dim,
        image_size=image_size,
        dropout=dropout,
        width=width,
        **kwargs,  # type: ignore[arg-type]
    )


def iresnet18(
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """IResNet-18 (blocks 2, 2, 2, 2). Arguments as in ``IResNet``."""
    return _iresnet(18, embedding_dim, image_size, dropout, width, **kwargs)


def iresnet34(
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """IResNet-34 (blocks 3, 4, 6, 3). Arguments as in ``IResNet``."""
    return _iresnet(34, embedding_dim, image_size, dropout, width, **kwargs)


def iresnet50(
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """IResNet-50 (blocks 3, 4, 14, 3). Arguments as in ``IResNet``."""
    return _iresnet(50, embedding_dim, image_size, dropout, width, **kwargs)


def iresnet100(
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """IResNet-100 (blocks 3, 13, 30, 3). Arguments as in ``IResNet``."""
    return _iresnet(100, embedding_dim, image_size, dropout, width, **kwargs)


def iresnet200(
    embedding_dim: int = 512,
    image_size: int = 112,
    dropout: float = 0.0,
    width: int = 64,
    **kwargs: object,
) -> IResNet:
    """IResNet-200 (blocks 6, 26, 60, 6). Arguments as in ``IResNet``."""
    return _iresnet(200, embedding_dim, image_size, dropout, width, **kwargs)
