"""Backbone registry: our own face backbones by name, anything else from timm.

Every backbone maps images ``[B, 3, H, W]`` to raw (not L2-normalised) embeddings
``[B, embedding_dim]`` and exposes ``embedding_dim``; the margin head normalises.

* Registered here: ``iresnet18/34/50/100/200`` (IResNet of Deng et al., "ArcFace: Additive
  Angular Margin Loss for Deep Face Recognition", arXiv:1801.07698, as in insightface's
  arcface_torch, with the improved residual block of Duta et al., "Improved Residual
  Networks for Image and Video Recognition", arXiv:2004.04989; see ``iresnet.py``),
  ``mbf`` and ``mbf_large`` (arcface_torch's MobileFaceNets, ``mobilefacenet.py``) and
  ``tiny``, a ~60k-parameter network for tests and CPU demos.
* Any other name that ``timm`` knows: the timm model with its classifier removed
  (``num_classes=0``, so it returns globally pooled features) followed by an
  ``EmbeddingNeck`` (Dropout -> Linear -> BatchNorm1d), the usual embedding layer of
  face recognition models.

New backbones are added with the ``register_backbone`` decorator, never by branching on
names. timm is imported only when a name is not ours: that took 0.5-0.6 s off every
command's start-up here (``import facecluster.pipeline``: 8.3 -> 7.7 s on 2 cores;
most of timm's import time is torchvision, which Lightning loads anyway).
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .iresnet import iresnet18, iresnet34, iresnet50, iresnet100, iresnet200
from .mobilefacenet import mbf, mbf_large

__all__ = [
    "BACKBONES",
    "EmbeddingNeck",
    "TimmBackbone",
    "TinyBackbone",
    "available_backbones",
    "create_backbone",
    "load_backbone",
    "register_backbone",
]

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
"""Registry of our own backbone builders, by name.

A builder is called as ``builder(embedding_dim=..., image_size=..., dropout=...,
**kwargs)`` and returns a module with an ``embedding_dim`` attribute.
"""

# How many close names an unknown-name error suggests.
_MAX_SUGGESTIONS = 5


def register_backbone(name: str) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Returns a decorator that adds a backbone builder to ``BACKBONES``.

    Args:
        name: Name under which ``create_backbone`` finds the builder. A registered name
            shadows a timm model of the same name.

    Returns:
        Decorator that registers its argument and returns it unchanged.

    Raises:
        ValueError: If ``name`` is empty or already registered.
    """
    if not name:
        raise ValueError("backbone name must be a non-empty string")

    def decorator(builder: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in BACKBONES and not same_definition(BACKBONES[name], builder):
            raise ValueError(f"backbone {name!r} is already registered")
        BACKBONES[name] = builder
        return builder

    return decorator


def same_definition(a: Callable[..., Any], b: Callable[..., Any]) -> bool:
    """The same definition imported twice: a script run as ``__main__`` that the
    config's ``imports`` names too is imported again under its module name (a builder
    or head registered twice is then no clash)."""
    try:
        same_file = inspect.getfile(a) == inspect.getfile(b)
    except TypeError:  # a builtin or a C callable: no file to compare
        return False
    return same_file and a.__qualname__ == b.__qualname__


def available_backbones() -> list[str]:
    """Returns the sorted names of our registered backbones (timm models not included)."""
    return sorted(BACKBONES)


class EmbeddingNeck(nn.Module):
    """Maps pooled features to an embedding: Dropout -> Linear -> BatchNorm1d.

    Args:
        in_features: Size of the pooled feature vector.
        embedding_dim: Size of the output embedding.
        dropout: Dropout probability applied to the features.
    """

    def __init__(self, in_features: int, embedding_dim: int, dropout: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.embedding_dim = embedding_dim
        self.dropout = nn.Dropout(p=dropout)
        self.fc = nn.Linear(in_features, embedding_dim)
        self.bn = nn.BatchNorm1d(embedding_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps features ``[B, in_features]`` to embeddings ``[B, embedding_dim]``."""
        return self.bn(self.fc(self.dropout(x)))


_IDENTITY = ([1.0, 1.0, 1.0], [0.0, 0.0, 0.0])
"""``TimmBackbone``'s input conversion without pretrained weights: scale, shift."""


def _identity_if_missing(module, state_dict, prefix, *_) -> None:
    """A load pre-hook of ``TimmBackbone``: weights saved before its input conversion
    were trained on [-1, 1] as it stood, and load with the identity."""
    for name, value in zip(("input_scale", "input_shift"), _IDENTITY, strict=True):
        state_dict.setdefault(prefix + name, torch.tensor(value).view(1, 3, 1, 1))


class TimmBackbone(nn.Module):
    """A timm model without classifier followed by an ``EmbeddingNeck``.

    Images come in as every backbone takes them, scaled to [-1, 1] (mean 0.5, std 0.5:
    :func:`~facecluster.data.transforms.normalize_images`). With ``pretrained``, a fixed
    per-channel affine (``input_scale``, ``input_shift``) first turns that into the
    normalisation the weights were trained on, timm's ``pretrained_cfg`` mean and std
    (ImageNet's for most CNNs: fed [-1, 1], their warm start was off); without, it is
    the identity. Buffers, so the weights carry it: the sub-nets' warm start,
    evaluation and the ONNX export rebuild the model without pretrained weights. Weights
    saved before it existed load with the identity, what they were trained with.

    Args:
        name: timm model name (an architecture, optionally with a ``.tag``).
        embedding_dim: Size of the output embedding.
        pretrained: Load timm's pretrained weights (needs them cached or a network).
        dropout: Dropout probability in the neck.
        **kwargs: Passed to ``timm.create_model`` (e.g. ``img_size=112`` for ViTs, whose
            input size is fixed at construction).
    """

    def __init__(
        self,
        name: str,
        embedding_dim: int = 512,
        pretrained: bool = False,
        dropout: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.embedding_dim = embedding_dim
        import timm

        self.body = timm.create_model(name, pretrained=pretrained, num_classes=0, **kwargs)
        # Models with a pre-logits layer (e.g. MobileNetV3's conv_head) output
        # head_hidden_size features once the classifier is removed, not num_features.
        in_features = getattr(self.body, "head_hidden_size", None) or self.body.num_features
        self.neck = EmbeddingNeck(in_features, embedding_dim, dropout)
        scale, shift = _IDENTITY
        if pretrained:
            weights = getattr(self.body, "pretrained_cfg", None) or {}
            mean, std = weights.get("mean", ()), weights.get("std", ())
            if len(mean) == 3 and len(std) == 3:  # x' = ((x + 1) / 2 - mean) / std
                mean, std = torch.tensor(mean), torch.tensor(std)
                scale, shift = (0.5 / std).tolist(), ((0.5 - mean) / std).tolist()
        self.register_buffer("input_scale", torch.tensor(scale).view(1, 3, 1, 1))
        self.register_buffer("input_shift", torch.tensor(shift).view(1, 3, 1, 1))
        self.register_load_state_dict_pre_hook(_identity_if_missing)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``[B, 3, H, W]`` to embeddings ``[B, embedding_dim]``."""
        return self.neck(self.body(x * self.input_scale + self.input_shift))


class TinyBackbone(nn.Module):
    """A tiny CNN for tests and CPU demos: strided conv-BN-ReLU stages, GAP, Linear, BN1d.

    About 60k parameters at ``embedding_dim=512``; global average pooling makes it accept
    any image size.

    Args:
        embedding_dim: Size of the output embedding.
        dropout: Dropout probability before the Linear layer.
        width: Channels of the first stage; each of the four stages doubles it.
    """

    def __init__(self, embedding_dim: int = 512, dropout: float = 0.0, width: int = 8) -> None:
        super().__init__()
        if width < 1:
            raise ValueError(f"width must be positive, got {width}")
        self.embedding_dim = embedding_dim
        layers: list[nn.Module] = []
        channels = 3
        for stage in range(4):
            out = width * 2**stage
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, stride=2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.ReLU(inplace=True),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.neck = EmbeddingNeck(channels, embedding_dim, dropout)

    num_stages = 4
    """Stages that ``model.shared_layers`` can share (see :meth:`trunk`)."""

    def trunk_modules(self, stages: int) -> list[nn.Module]:
        """The modules :meth:`trunk` runs: the first ``stages`` conv-BN-ReLU stages."""
        return list(self.features[: 3 * stages])

    def trunk(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The first ``stages`` stages (``tail(trunk(x, n), n) == forward(x)``)."""
        return self.features[: 3 * stages](x)

    def tail(self, x: torch.Tensor, stages: int) -> torch.Tensor:
        """The stages after the first ``stages``, pooling and the neck."""
        return self.neck(torch.flatten(self.pool(self.features[3 * stages :](x)), 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Maps images ``[B, 3, H, W]`` to embeddings ``[B, embedding_dim]``."""
        return self.neck(torch.flatten(self.pool(self.features(x)), 1))


@register_backbone("tiny")
def tiny(
    embedding_dim: int = 512, image_size: int = 112, dropout: float = 0.0, width: int = 8
) -> TinyBackbone:
    """Builds ``TinyBackbone``; ``image_size`` is accepted and ignored (any size works)."""
    del image_size  # Global pooling: the network does not depend on the input size.
    return TinyBackbone(embedding_dim=embedding_dim, dropout=dropout, width=width)


register_backbone("iresnet18")(iresnet18)
register_backbone("iresnet34")(iresnet34)
register_backbone("iresnet50")(iresnet50)
register_backbone("iresnet100")(iresnet100)
register_backbone("iresnet200")(iresnet200)
register_backbone("mbf")(mbf)
register_backbone("mbf_large")(mbf_large)


def _unknown_backbone_error(name: str) -> ValueError:
    """Builds the error for an unknown name, suggesting close registered or timm names."""
    import timm

    candidates = available_backbones() + [n for n in timm.list_models() if n not in BACKBONES]
    close = difflib.get_close_matches(name, candidates, n=_MAX_SUGGESTIONS)
    hint = f"; did you mean: {', '.join(close)}" if close else ""
    return ValueError(
        f"unknown backbone {name!r}{hint} (registered: {', '.join(available_backbones())}; "
        f"or any timm model name, see timm.list_models(); one of yours: its module in "
        f"the config's imports, docs/CONFIG.md)"
    )


def create_backbone(
    name: str,
    embedding_dim: int = 512,
    image_size: int = 112,
    pretrained: bool = False,
    dropout: float = 0.0,
    **kwargs: Any,
) -> nn.Module:
    """Creates a backbone mapping images ``[B, 3, H, W]`` to ``[B, embedding_dim]``.

    Registered names (``available_backbones()``) win over timm names; any other name
    that timm knows gives ``TimmBackbone``. Arguments whose value is ``None`` (also in
    ``kwargs``) are dropped so that the builder's defaults apply, as timm's
    ``create_model`` does; this lets configs leave options unset.

    Args:
        name: Registered backbone name or timm model name.
        embedding_dim: Size of the output embedding.
        image_size: Side of the square input images. IResNet needs a multiple of 16;
            ``tiny`` and timm CNNs ignore it (pass ``img_size`` in ``kwargs`` for timm
            models with a fixed input size, such as ViTs).
        pretrained: Load pretrained weights; only timm models have any.
        dropout: Dropout probability before the embedding layer.
        **kwargs: Extra builder arguments (e.g. ``width`` for IResNet), or
            ``timm.create_model`` arguments for timm models.

    Returns:
        The backbone, with an ``embedding_dim`` attribute. Its output is not normalised.

    Raises:
        ValueError: If the name is unknown (the message suggests close names), if
            ``pretrained`` is requested for one of our own backbones, or if an argument is
            out of range.
    """
    options = {"embedding_dim": embedding_dim, "image_size": image_size, "dropout": dropout}
    options.update(kwargs)
    options = {key: value for key, value in options.items() if value is not None}
    pretrained = bool(pretrained) if pretrained is not None else False
    if options.get("embedding_dim", 1) < 1:
        raise ValueError(f"embedding_dim must be positive, got {options['embedding_dim']}")

    builder = BACKBONES.get(name)
    if builder is not None:
        if pretrained:
            raise ValueError(
                f"no pretrained weights exist for backbone {name!r}: our own backbones are "
                f"trained from scratch (pretrained weights are only available for timm models)"
            )
        return builder(**options)

    import timm

    if not timm.is_model(name):
        raise _unknown_backbone_error(name)
    options.pop("image_size", None)  # timm CNNs take any size; ViTs want img_size instead.
    return TimmBackbone(name, pretrained=pretrained, **options)


def shareable_stages(backbone: nn.Module) -> int:
    """How many stages ``model.shared_layers`` may share for this backbone: the ones
    it can split into :meth:`trunk` and :meth:`tail` (IResNets and ``tiny``: 4;
    MobileFaceNets: 3; timm models: 0, none)."""
    return int(getattr(backbone, "num_stages", 0))


def load_backbone(
    args: dict[str, Any], state_dict: dict[str, torch.Tensor], source: str = "the saved weights"
) -> nn.Module:
    """A trained backbone for inference: the one way weights are loaded into one.

    Built by :func:`create_backbone` from ``args`` (its keyword arguments, ``name``
    included) without downloading pretrained weights, since the trained weights
    replace them; returned in eval mode. ``source``: where the weights come from, for
    the error.

    Raises:
        ValueError: ``args`` build no backbone, or one the weights do not fit (a run's
            ``model`` settings or an export's ``backbone`` edited since: another
            ``image_size`` or ``embedding_dim``), naming the first mismatch.
    """
    try:
        backbone = create_backbone(**{**args, "pretrained": False})
    except TypeError as e:  # an argument of another type, or one the backbone lacks
        raise ValueError(f"backbone arguments {args} build no backbone: {e}") from None
    try:  # torch first: its load hooks fill what older weights lack (timm's input scale)
        backbone.load_state_dict(state_dict)
    except RuntimeError as e:  # said by what differs, in one line
        found = [line.strip() for line in str(e).splitlines()[1:] if line.strip()]
        problems = _misfits(backbone.state_dict(), state_dict) or (found or [str(e)])[0][:300]
        raise ValueError(f"{source} do not fit the backbone {args} builds: {problems}") from None
    return backbone.eval()


def _misfits(own: dict[str, torch.Tensor], given: dict[str, Any]) -> str | None:
    """What of ``given`` does not fit a backbone whose state dict is ``own``, in one
    line, or None: the first shape that differs, then how many weights are missing and
    how many are not the backbone's, with the first names of each (torch's message, 101
    lines for one MobileFaceNet's weights in another's, was cut to its first line, which
    named one missing key and not what the file held: a review)."""

    def first(names: list[str]) -> str:
        return ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")

    shapes = [
        (k, list(given[k].shape), list(v.shape))
        for k, v in own.items()
        if k in given and hasattr(given[k], "shape") and given[k].shape != v.shape
    ]
    # not BatchNorm's step counts: torch loads weights without them (converted weights)
    weights = [k for k in own if not k.endswith("num_batches_tracked")]
    missing = [k for k in weights if k not in given]
    unexpected = [str(k) for k in given if k not in own]
    said = []
    if shapes:
        key, theirs, mine = shapes[0]
        more = f" (and {len(shapes) - 1} more)" if len(shapes) > 1 else ""
        said.append(
            f"size mismatch for {key}: {theirs} in the weights, {mine} in the backbone{more}"
        )
        if len(mine) == 4 and mine[:2] == theirs[:2] and mine[2:] != theirs[2:]:
            said[-1] += " (a kernel over the whole feature map: weights of another image size)"
    if missing:
        said.append(f"{len(missing)} of its {len(weights)} weights missing ({first(missing)})")
    if unexpected:
        said.append(f"{len(unexpected)} weights that are not its ({first(unexpected)})")
    return "; ".join(said) or None
