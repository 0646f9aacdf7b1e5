"""Margin-based softmax classification heads for face identification.

Each head holds one weight row (class centre) per identity and turns embeddings into
logits ``s * cos(theta_j)``, where ``theta_j`` is the angle between the L2-normalised
embedding and the L2-normalised row ``j``; the target column gets a margin that makes
the training task harder than plain softmax and so compacts each identity:

* ArcFace, additive angular margin: Deng et al., "ArcFace: Additive Angular Margin Loss
  for Deep Face Recognition", CVPR 2019, arXiv:1801.07698. Target logit
  ``s * cos(theta + m)``.
* CosFace, additive cosine margin (a.k.a. large margin cosine loss): Wang et al.,
  "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR 2018,
  arXiv:1801.09414. Target logit ``s * (cos(theta) - m)``.
* AdaFace, a margin that adapts to image quality through the embedding's norm: Kim,
  Jain and Liu, "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022,
  arXiv:2204.00964. Target logit ``s * (cos(theta - m * z) - m - m * z)``, ``z`` the
  norm's standardised place in the batch (running statistics), times ``h``, in [-1, 1].

Feed the logits to ``torch.nn.functional.cross_entropy``, or call ``loss``, which also
covers a head sharded across processes and sampled (Partial FC, partial_fc.py): the
training systems use ``loss`` and ``predict``.

All the head math runs with autocast disabled and in at least fp32 (float64 inputs stay
float64, which ``gradcheck`` needs): in bf16 a cosine has ~3 significant digits, which is
the same order as the margin itself.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .backbones import same_definition
from .partial_fc import (
    gather_rows,
    gather_sizes,
    sample_columns,
    shard_range,
    sharded_argmax,
    sharded_cross_entropy,
)

__all__ = [
    "HEADS",
    "AdaFace",
    "ArcFace",
    "CosFace",
    "MarginHead",
    "create_head",
    "default_margin",
    "register_head",
]

# Floor of 1 - cos^2 inside the sqrt: the derivative of sqrt is infinite at 0, which
# turned into NaN gradients for an embedding exactly on its class centre.
_SIN_EPS = 1e-12


class _Cosine(torch.autograd.Function):
    """``cos[b, c] = <e_b, w_c> / |w_c|`` for unit rows ``e``, clamped to [-1, 1].

    What ``F.normalize(w) @ e.T`` gives, without its normalised ``[C, d]`` copy of the
    weights, which autograd keeps for the backward pass, nor the copies its backward
    makes: a head step over 200K identities x 512 (fp32, SGD, batch 128) took 5.0x the
    weights' size beyond them, 3.0x with the division done by autograd, 2.0x here
    (peak memory, measured on the CPU). Saved for the backward pass: ``e``, ``w`` (the
    parameter itself) and the ``[C]`` norms. The clamp (rounding can push a dot product
    of unit vectors just past +-1) passes the gradient through.
    """

    @staticmethod
    def forward(ctx, emb: Tensor, weight: Tensor) -> Tensor:
        norms = torch.linalg.vector_norm(weight, dim=1).clamp_min(1e-12)  # F.normalize's eps
        ctx.save_for_backward(emb, weight, norms)
        return (emb @ weight.t()).div_(norms).clamp_(-1.0, 1.0)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, Tensor | None]:
        if torch.is_grad_enabled():  # create_graph: this backward is not differentiable
            raise RuntimeError(
                "the margin head's cosine has no second derivative (a backward pass with "
                "create_graph=True, as a gradient penalty needs, goes through it)"
            )
        emb, weight, norms = ctx.saved_tensors
        scaled = grad / norms  # d cos / d <e, w> = 1 / |w|
        grad_emb = scaled @ weight if ctx.needs_input_grad[0] else None
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = scaled.t() @ emb
            # and through 1 / |w|: minus w_c <w_c, G_c> / |w_c|^2, row by row, in place
            along = torch.bmm(grad_weight.unsqueeze(1), weight.unsqueeze(2)).view(-1)
            grad_weight.addcmul_(weight, (along / norms.square()).unsqueeze(1), value=-1.0)
        return grad_emb, grad_weight


class MarginHead(nn.Module):
    """Base class: cosine logits scaled by ``s`` with a margin on the target column.

    Subclasses implement ``_margin`` (the target cosine after the margin, given each
    row's embedding norm, which only AdaFace reads) and may override ``_validate_margin``.

    Args:
        num_classes: Number of identities (rows of ``weight``).
        embedding_dim: Size of the embeddings.
        s: Logit scale (the radius of the hypersphere); must be positive.
        m: Margin, in the subclass's units.
        sample_rate: Share of the (non-target) class centres each training step uses, in
            (0, 1]; 1 uses them all (Partial FC's ``r``; ``loss``).

    Attributes:
        weight: Class centres ``[num_classes, embedding_dim]``, initialised N(0, 0.01) as
            in arcface_torch (only their direction matters); after ``shard``, only this
            process's rows ``[row_start, row_start + len(weight))``.

    Raises:
        ValueError: If an argument is out of range (the message names the parameter).
    """

    def __init__(
        self, num_classes: int, embedding_dim: int, s: float, m: float, sample_rate: float = 1.0
    ) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be positive, got {num_classes}")
        if embedding_dim < 1:
            raise ValueError(f"embedding_dim must be positive, got {embedding_dim}")
        if not (math.isfinite(s) and s > 0):
            raise ValueError(f"scale s must be a positive finite number, got s={s}")
        self._validate_margin(m)
        if not (0.0 < sample_rate <= 1.0):
            raise ValueError(f"sample_rate must be in (0, 1], got sample_rate={sample_rate}")
        self.sample_rate = float(sample_rate)
        self.row_start, self.world = 0, 1  # not sharded
        self.num_classes = num_classes
        self.embedding_dim = embedding_dim
        self.s = float(s)
        self.m = float(m)
        self.weight = nn.Parameter(torch.empty(num_classes, embedding_dim))
        nn.init.normal_(self.weight, 0.0, 0.01)

    def _validate_margin(self, m: float) -> None:
        """Raises ValueError if the margin ``m`` is out of range for this head."""
        if not (math.isfinite(m) and m >= 0):
            raise ValueError(f"margin m must be a finite number >= 0, got m={m}")

    def _margin(self, cos: Tensor, norms: Tensor) -> Tensor:
        """Returns the target cosine after the margin (unscaled), elementwise.

        Args:
            cos: ``[B, 1]`` each row's cosine to its target centre.
            norms: ``[B, 1]`` each row's embedding norm before normalising (detached).
        """
        raise NotImplementedError

    def _compute_dtype(self, embeddings: Tensor) -> torch.dtype:
        # At least fp32; float64 is kept so that gradcheck and float64 tests are exact.
        dtype = torch.promote_types(embeddings.dtype, self.weight.dtype)
        return torch.promote_types(dtype, torch.float32)

    def cosine(self, embeddings: Tensor) -> Tensor:
        """Cosine similarity of each embedding with each class centre.

        Args:
            embeddings: ``[B, embedding_dim]``, any scale (normalised here).

        Returns:
            ``[B, num_classes]`` in ``[-1, 1]``, in fp32 (float64 for float64 inputs).
        """
        return self._cosine(embeddings, self.weight)

    def _cosine(self, embeddings: Tensor, weight: Tensor) -> Tensor:
        if embeddings.dim() != 2 or embeddings.shape[1] != self.embedding_dim:
            raise ValueError(
                f"embeddings must have shape [B, {self.embedding_dim}], "
                f"got {tuple(embeddings.shape)}"
            )
        dtype = self._compute_dtype(embeddings)
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            emb = F.normalize(embeddings.to(dtype), dim=1)
            return _Cosine.apply(emb, weight.to(dtype))

    @property
    def sharded(self) -> bool:
        """Whether ``weight`` holds only this process's rows (``shard``)."""
        return self.world > 1

    def shard(self, rank: int, world: int) -> None:
        """Keep only shard ``rank`` of ``world`` of the rows (``shard_range``).

        Call it on every process of the group, with the same full head, before the
        optimizer is built; from then on ``loss`` and ``predict`` communicate.
        """
        if self.world != 1:
            raise RuntimeError(f"head already sharded ({self.world} ways)")
        if world == 1:
            return
        start, end = shard_range(self.num_classes, rank, world)
        self.weight = nn.Parameter(self.weight.detach()[start:end].clone())
        self.row_start, self.world = start, world

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Mean margin softmax cross-entropy of a batch (the training loss).

        Unsharded with ``sample_rate`` 1 it is ``cross_entropy(self(embeddings, labels),
        labels)``. Otherwise Partial FC: the batch is gathered from every process, this
        process's rows are used (every class in the gathered batch, plus a uniform
        sample of the others) and the softmax is normalised across processes. Every
        process gets the same value: the mean over the gathered batch.
        """
        if not self.sharded and self.sample_rate >= 1.0:
            return F.cross_entropy(self(embeddings, labels), labels)
        # fp32 before the gather: its backward all-reduces the gradient in this dtype
        sizes = gather_sizes(len(labels), labels.device)
        embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
        embeddings, labels = gather_rows(embeddings, sizes), gather_rows(labels, sizes)
        # every process sees the whole batch, so all stop here together; a label no
        # shard holds would otherwise train on as a row whose target logit is 0
        outside = (labels < 0) | (labels >= self.num_classes)
        if bool(outside.any()):
            raise ValueError(
                f"labels {labels[outside][:5].tolist()} are outside this head's "
                f"{self.num_classes} identities (0 to {self.num_classes - 1})"
            )
        rows = self.weight.shape[0]
        local = labels.long() - self.row_start
        target = torch.where((local >= 0) & (local < rows), local, -1)
        weight = self.weight
        if self.sample_rate < 1.0:
            shard = (self.row_start, self.row_start + rows)
            index, target = sample_columns(target, shard, self.num_classes, self.sample_rate)
            weight = weight[index]
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = self._cosine(embeddings, weight)
            logits = self._margin_logits(cos, target, _norms(embeddings, cos.dtype))
            return sharded_cross_entropy(logits, target).mean()

    @torch.no_grad()
    def predict(self, embeddings: Tensor) -> Tensor:
        """The nearest class centre's index (over the whole head) for each embedding.

        Sharded, every process must call it, with any number of rows (zero included).
        """
        if not self.sharded:
            return self.cosine(embeddings).argmax(dim=1)
        return sharded_argmax(embeddings, self.cosine, self.row_start)

    def forward(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Margin logits for training.

        Args:
            embeddings: ``[B, embedding_dim]``, any scale and dtype.
            labels: ``[B]`` integer class indices in ``[0, num_classes)``.

        Returns:
            ``[B, num_classes]`` logits in fp32 (float64 for float64 inputs): ``s * cos``
            everywhere except the target column, which gets the margin.
        """
        if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
            raise ValueError(
                f"labels must have shape [{embeddings.shape[0]}], got {tuple(labels.shape)}"
            )
        with torch.autocast(device_type=embeddings.device.type, enabled=False):
            cos = self.cosine(embeddings)
            return self._margin_logits(cos, labels.long(), _norms(embeddings, cos.dtype))

    def _margin_logits(self, cos: Tensor, target: Tensor, norms: Tensor) -> Tensor:
        """``s * cos`` with the margin on each row's target column; a target of -1 (the
        class is another shard's) leaves its row as it is. ``norms``: ``[B]``, each
        row's embedding norm. No host synchronisation."""
        norms = norms.unsqueeze(1)
        if cos.shape[1] == 0:  # a shard with no rows (fewer classes than processes)
            self._margin(cos.new_zeros(len(cos), 1), norms)  # AdaFace: its statistics
            return cos * self.s
        index = target.clamp(min=0).unsqueeze(1)
        picked = cos.gather(1, index)
        margined = self._margin(picked, norms)
        target_cos = torch.where(index == target.unsqueeze(1), margined, picked)
        return cos.scatter(1, index, target_cos) * self.s

    def extra_repr(self) -> str:
        """Shows the sizes and hyper-parameters in ``print(module)``."""
        text = (
            f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, "
            f"s={self.s}, m={self.m}"
        )
        if self.sample_rate < 1.0:
            text += f", sample_rate={self.sample_rate}"
        if self.sharded:
            text += f", rows=[{self.row_start}, {self.row_start + len(self.weight)})"
        return text


class ArcFace(MarginHead):
    """Additive angular margin (arXiv:1801.07698): target logit ``s * cos(theta + m)``.

    ``cos(theta + m)`` is computed as ``cos * cos(m) - sin * sin(m)``, never via ``acos``
    (whose gradient is infinite at +-1). Where ``theta + m > pi`` (``cos(theta) <
    cos(pi - m)``), ``cos(theta + m)`` would increase again with ``theta``; there the target
    uses insightface's fallback ``cos(theta) - m * sin(m)``, which keeps the target logit
    decreasing in ``theta``.

    This is arcface_torch's ArcFace before December 2022 (commit 657ae30e), which it
    matches to 1e-5 in logits and 1e-6 in gradients (a review's comparison). Its later
    ArcFace takes ``acos`` under ``no_grad`` and passes the gradient through the margin
    unchanged (d target / d cos = 1, where this is the true derivative: 1.87 at cos 0.9),
    and drops the fallback (at theta = 2.84 it gives a target cosine of -0.980, this
    -1.195): the same forward below ``pi - m``, other gradients.

    Args:
        num_classes: Number of identities.
        embedding_dim: Size of the embeddings.
        s: Logit scale, > 0.
        m: Angular margin in radians, in ``[0, pi/2)``.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        s: float = 64.0,
        m: float = 0.5,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, s, m, sample_rate)

    def _validate_margin(self, m: float) -> None:
        if not (math.isfinite(m) and 0 <= m < math.pi / 2):
            raise ValueError(f"ArcFace margin m must be in [0, pi/2) radians, got m={m}")

    def _margin(self, cos: Tensor, norms: Tensor) -> Tensor:
        # Constants derived from self.m on every call, so that a margin schedule that
        # assigns head.m during training takes effect.
        cos_m, sin_m = math.cos(self.m), math.sin(self.m)
        threshold = math.cos(math.pi - self.m)  # theta + m > pi  <=>  cos(theta) < this.
        fallback_margin = self.m * sin_m  # insightface's "mm" = sin(pi - m) * m.
        sin = torch.sqrt(torch.clamp(1.0 - cos * cos, min=_SIN_EPS))
        cos_theta_plus_m = cos * cos_m - sin * sin_m
        return torch.where(cos < threshold, cos - fallback_margin, cos_theta_plus_m)


class CosFace(MarginHead):
    """Additive cosine margin (arXiv:1801.09414): target logit ``s * (cos(theta) - m)``.

    Args:
        num_classes: Number of identities.
        embedding_dim: Size of the embeddings.
        s: Logit scale, > 0.
        m: Cosine margin in ``[0, 2)``; from 2 on every target logit would be below every
            other logit whatever the angle.
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        s: float = 64.0,
        m: float = 0.35,
        sample_rate: float = 1.0,
    ) -> None:
        super().__init__(num_classes, embedding_dim, s, m, sample_rate)

    def _validate_margin(self, m: float) -> None:
        if not (math.isfinite(m) and 0 <= m < 2):
            raise ValueError(f"CosFace margin m must be in [0, 2), got m={m}")

    def _margin(self, cos: Tensor, norms: Tensor) -> Tensor:
        return cos - self.m


# AdaFace's clip of the cosine and of the angle after the margin, and of the norms
_ADA_EPS = 1e-3
_ADA_NORM_RANGE = (0.001, 100.0)


class AdaFace(MarginHead):
    """Quality-adaptive margin (Kim, Jain and Liu, CVPR 2022, arXiv:2204.00964).

    A face's embedding norm stands for its image quality: standardised by the running
    mean and standard deviation of the training batches' norms, times ``h`` and clipped
    to [-1, 1], it gives ``z``; the target cosine becomes ``cos(theta - m * z) - m -
    m * z``: ArcFace's ``cos(theta + m)`` for a low-norm (poor) face at ``z = -1``,
    CosFace's ``cos(theta) - m`` at ``z = 0``, and for a high-norm (clear) face at
    ``z = 1`` a negative angular margin with a shift, ``cos(theta - m) - 2m``, which
    weighs its hard examples more (the paper's Figure 2).

    This is the authors' ``AdaFace`` head (github.com/mk-minchul/AdaFace, ``head.py``):
    the same defaults (``m=0.4, h=0.333, t_alpha=0.01``, statistics starting at mean 20
    and std 100), the norms clipped to [0.001, 100] and detached, the statistics updated
    before ``z`` is taken, the target's cosine clipped to ``1e-3`` inside [-1, 1] for
    ``acos`` and the angle to ``[1e-3, pi - 1e-3]``. Two differences: the other columns'
    cosines are not clipped (the authors clip every one, a change of at most 1e-3), and a
    batch of one face does not update the standard deviation (its sample std is NaN,
    which would stay in the running value). The statistics move in training mode only,
    over the whole batch a step sees (under Partial FC, every process's batch: each
    process computes the same values); they are buffers, so checkpoints keep them.

    Args:
        num_classes: Number of identities.
        embedding_dim: Size of the embeddings.
        s: Logit scale, > 0.
        m: Margin in ``[0, 1)``.
        h: How far a norm's standardised value moves the margin, > 0.
        t_alpha: The running statistics' momentum, in (0, 1].
    """

    def __init__(
        self,
        num_classes: int,
        embedding_dim: int,
        s: float = 64.0,
        m: float = 0.4,
        sample_rate: float = 1.0,
        h: float = 0.333,
        t_alpha: float = 0.01,
    ) -> None:
        super().__init__(num_classes, embedding_dim, s, m, sample_rate)
        if not (math.isfinite(h) and h > 0):
            raise ValueError(f"AdaFace h must be a positive finite number, got h={h}")
        if not (0.0 < t_alpha <= 1.0):
            raise ValueError(f"AdaFace t_alpha must be in (0, 1], got t_alpha={t_alpha}")
        self.h, self.t_alpha = float(h), float(t_alpha)
        self.register_buffer("batch_mean", torch.tensor(20.0))
        self.register_buffer("batch_std", torch.tensor(100.0))

    def _validate_margin(self, m: float) -> None:
        if not (math.isfinite(m) and 0 <= m < 1):
            raise ValueError(f"AdaFace margin m must be in [0, 1), got m={m}")

    def _apply(self, fn: Any, recurse: bool = True) -> AdaFace:
        # the running statistics stay at least float32 when the head is cast
        # (trainer.precision=bf16-true): in bf16 an update of t_alpha x (norm - mean)
        # below half a step (0.0625 between 16 and 32) was rounded away: over 200
        # batches of norms near 13.7 the mean stopped at 18.25 instead of 14.6
        # (and are not rounded through bf16 on their way: a resume restores them
        # before Lightning casts the module)
        kept = {name: getattr(self, name) for name in ("batch_mean", "batch_std")}
        super()._apply(fn, recurse)
        for name, value in kept.items():
            cast = getattr(self, name)
            dtype = torch.promote_types(cast.dtype, torch.float32)
            if cast.dtype != dtype:
                setattr(self, name, value.to(device=cast.device, dtype=dtype))
        return self

    def _margin(self, cos: Tensor, norms: Tensor) -> Tensor:
        norms = norms.clamp(*_ADA_NORM_RANGE)
        mean, std = self.batch_mean.to(norms.dtype), self.batch_std.to(norms.dtype)
        if self.training:
            with torch.no_grad():
                mean = norms.mean() * self.t_alpha + (1 - self.t_alpha) * mean
                self.batch_mean.copy_(mean)
                if len(norms) > 1:
                    std = norms.std() * self.t_alpha + (1 - self.t_alpha) * std
                    self.batch_std.copy_(std)
        z = ((norms - mean) / (std + _ADA_EPS) * self.h).clamp(-1.0, 1.0)
        theta = torch.acos(cos.clamp(-1 + _ADA_EPS, 1 - _ADA_EPS))
        angle = (theta - self.m * z).clamp(_ADA_EPS, math.pi - _ADA_EPS)
        return torch.cos(angle) - (self.m + self.m * z)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, h={self.h}, t_alpha={self.t_alpha}"


def _norms(embeddings: Tensor, dtype: torch.dtype) -> Tensor:
    """Each embedding's L2 norm, detached (AdaFace's quality signal; no gradient)."""
    return embeddings.detach().to(dtype).norm(dim=1)


HEADS: dict[str, type[MarginHead]] = {"arcface": ArcFace, "cosface": CosFace, "adaface": AdaFace}


def register_head(name: str) -> Callable[[type[MarginHead]], type[MarginHead]]:
    """Returns a class decorator that adds a margin head to ``HEADS``, for ``head.name``.

    The class subclasses :class:`MarginHead`, implements ``_margin`` (and may override
    ``_validate_margin`` and ``_margin_logits``), and takes ``(num_classes,
    embedding_dim, s, m, sample_rate)`` with defaults for ``s`` and ``m`` (an unset
    ``head.m`` is the class's default); its further arguments come from ``head.kwargs``.
    The config's ``imports`` key makes every process of a run import the module that
    registers it (docs/CONFIG.md).

    Raises:
        ValueError: If ``name`` is empty or already registered to another class.
        TypeError: If the class is not a MarginHead or lacks those arguments.
    """
    if not name or not isinstance(name, str):
        raise ValueError("head name must be a non-empty string")

    def decorator(cls: type[MarginHead]) -> type[MarginHead]:
        if not (isinstance(cls, type) and issubclass(cls, MarginHead)):
            raise TypeError(f"head {name!r}: {cls!r} is not a subclass of MarginHead")
        parameters = inspect.signature(cls).parameters
        lacking = [
            key
            for key in ("num_classes", "embedding_dim", "s", "m", "sample_rate")
            if key not in parameters
        ] + [
            f"a default for {key}"
            for key in ("s", "m")
            if key in parameters and parameters[key].default is inspect.Parameter.empty
        ]
        if lacking:
            raise TypeError(
                f"head {name!r}: {cls.__name__}.__init__ needs num_classes, embedding_dim, "
                f"s, m and sample_rate, with defaults for s and m; it lacks {', '.join(lacking)}"
            )
        if name in HEADS and not same_definition(HEADS[name], cls):
            raise ValueError(f"head {name!r} is already registered")
        HEADS[name] = cls
        return cls

    return decorator


def default_margin(name: str) -> float:
    """The margin of head ``name`` when ``head.m`` is unset (0.5 for ArcFace)."""
    return inspect.signature(HEADS[name]).parameters["m"].default


def create_head(
    name: str,
    num_classes: int,
    embedding_dim: int,
    s: float | None = None,
    m: float | None = None,
    sample_rate: float = 1.0,
    **kwargs: float,
) -> MarginHead:
    """Creates a margin head by name.

    Args:
        name: A key of ``HEADS`` (``"arcface"``, ``"cosface"``, ``"adaface"`` or one
            added by :func:`register_head`).
        num_classes: Number of identities.
        embedding_dim: Size of the embeddings.
        s: Logit scale; ``None`` uses the head's default (64).
        m: Margin; ``None`` uses the head's default (ArcFace 0.5 rad, CosFace 0.35,
            AdaFace 0.4).
        sample_rate: Partial FC's share of class centres per training step, in (0, 1].
        **kwargs: The head's own further arguments (AdaFace's ``h`` and ``t_alpha``,
            ``head.kwargs``).

    Returns:
        The head.

    Raises:
        ValueError: If ``name`` is unknown (the message lists the valid names) or an
            argument is out of range.
    """
    head_cls = HEADS.get(name)
    if head_cls is None:
        raise ValueError(
            f"unknown head {name!r}; valid names: {', '.join(sorted(HEADS))} (a head of "
            "your own: register_head in a module the config's imports key names)"
        )
    options = {key: value for key, value in {"s": s, "m": m}.items() if value is not None}
    return head_cls(num_classes, embedding_dim, sample_rate=sample_rate, **options, **kwargs)
