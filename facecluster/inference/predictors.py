"""Named predictors: what evaluation scores and times, one row each.

A model that can identify faces exposes the predictors it offers: the stage-1
model offers its margin head (the single-model baseline) and nearest class mean;
the two-stage identifier offers routed inference (the paper's method) and all
sub-nets (ISM). Evaluation runs the same loop over all of them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from facecluster.inference.decision import similarity, top_columns

Predict = Callable[[Tensor, int], tuple[Tensor, Tensor, Tensor | None]]
"""(images [B, 3, H, W], k) -> (the k best identities [B, k], best first: the first is
the prediction; the prediction's open-set score [B] (what an "unknown" threshold
compares: a similarity); candidate clusters [B, m] or None)."""


def count_parameters(*parts: nn.Module | Tensor) -> int:
    """Parameters (or tensor elements) of the parts an inference path holds, each
    tensor once however many parts hold it (sub-nets that share a trunk)."""
    tensors = {
        id(t): t
        for part in parts
        for t in ([part] if isinstance(part, Tensor) else part.parameters())
    }
    return sum(t.numel() for t in tensors.values())


@dataclass(frozen=True)
class Predictor:
    """One way of identifying faces."""

    name: str
    """Its row name in evaluation tables."""
    predict: Predict
    """(images, k) -> (the k best identities, the first's score, candidate clusters or
    None when it does not route)."""
    subnet_forwards: float
    """Sub-net forward passes per image."""
    params: int
    """Parameters of its inference path."""
    stage1_backbone: bool = True
    """Whether it embeds faces with the run's stage-1 (router) backbone, whose
    verification accuracies an evaluation table gives: not ISM, the sub-nets alone."""


class BatchMemo:
    """What a model computes from one batch, kept while several predictors take turns
    on it (evaluation: the table's rows and the sweeps answer each test batch in turn).

    Within ``with memo.batch(images):``, :meth:`get` computes a value once per key for
    that tensor; outside the block, or for another tensor, it computes every time, so
    deployment's calls never see a kept value."""

    def __init__(self) -> None:
        self._kept: tuple[Tensor, dict[Hashable, Any]] | None = None

    @contextlib.contextmanager
    def batch(self, images: Tensor) -> Iterator[None]:
        before, self._kept = self._kept, (images, {})
        try:
            yield
        finally:
            self._kept = before  # a nested block gives the outer one its values back

    def kept(self, images: Tensor) -> dict[Hashable, Any] | None:
        """The values kept for ``images`` (None: not inside its block)."""
        kept = self._kept
        return kept[1] if kept is not None and kept[0] is images else None

    def get(self, images: Tensor, key: Hashable, compute: Callable[[], Any]) -> Any:
        """``compute()``, once per ``key`` within ``images``' block."""
        kept = self.kept(images)
        if kept is None:
            return compute()
        if key not in kept:
            kept[key] = compute()
        return kept[key]


def _best(scores: Tensor, k: int) -> tuple[Tensor, Tensor, None]:
    """The ``k`` highest-scoring identities of each row, best first (the lower id among
    ties), and the first one's score."""
    ranked = top_columns(scores, k)
    return ranked, scores.gather(1, ranked[:, :1]).squeeze(1), None


class StageOneModel(nn.Module):
    """The stage-1 backbone with its margin head over all identities, for inference.

    Args:
        backbone: the trained stage-1 backbone (eval mode).
        head_weight: [C, d] head rows (normalised here).
        class_means: [C, d] L2-normalised class means, for nearest-class-mean
            identification (None: that predictor is not offered).
        single: the run is the single-model baseline (names its rows so).
        embed: where another model computes the same embeddings, its function (the
            evaluation's: the identifier's :meth:`TwoStageIdentifier.embed`, whose
            ``embeddings_once`` keeps the router's for the batch, so that the backbone
            embeds a test face once for the router and these rows); None: ``backbone``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        head_weight: Tensor,
        class_means: Tensor | None = None,
        single: bool = False,
        embed: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        self.backbone = backbone.eval()
        self.register_buffer("head", F.normalize(head_weight.detach().float(), dim=1))
        # a buffer, so that .to(device) moves the means with the weights (a plain
        # attribute stayed where it was loaded: evaluation's kept means, on the CPU)
        means = None if class_means is None else class_means.float()
        self.register_buffer("class_means", means, persistent=False)
        self.single = single
        self._memo = BatchMemo()
        self._embed = embed

    @torch.no_grad()
    def embed(self, images: Tensor) -> Tensor:
        """L2-normalised embeddings [B, d]."""
        if self._embed is not None:
            return self._embed(images)
        return self._memo.get(
            images, "embedding", lambda: F.normalize(self.backbone(images).float(), dim=1)
        )

    def embeddings_once(self, images: Tensor) -> contextlib.AbstractContextManager:
        """Within the block, :meth:`embed` on ``images`` (this tensor) runs the backbone
        once for the head's and the class means' predictors together."""
        return self._memo.batch(images)

    def predictors(self) -> list[Predictor]:
        name = "single model (one head)" if self.single else "stage-1 model (one head)"
        offered = [
            Predictor(
                name,
                lambda x, k=1: _best(similarity(self.embed(x), self.head), k),
                0.0,
                count_parameters(self.backbone, self.head),
            )
        ]
        if self.class_means is not None:
            offered.append(
                Predictor(
                    "nearest class mean"
                    if self.single
                    else "nearest class mean (stage-1 backbone)",
                    lambda x, k=1: _best(similarity(self.embed(x), self.class_means), k),
                    0.0,
                    count_parameters(self.backbone, self.class_means),
                )
            )
        return offered
