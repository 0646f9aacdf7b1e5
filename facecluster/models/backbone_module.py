"""Stage 1: one backbone and one margin head over all identities.

This is both the first stage of the two-stage method (its backbone gives the
class-mean embeddings the clustering unit groups, and warm-starts every sub-net)
and, trained alone, the paper's non-distributed single-model baseline.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import Tensor
from torchmetrics.classification import MulticlassAccuracy

from facecluster.data import scored
from facecluster.models.base import StageSystem
from facecluster.models.components import MarginHead, create_backbone, create_head


class BackboneSystem(StageSystem):
    """Backbone + margin head over all C identities (stage 1 / single baseline).

    Args:
        num_classes: number of identities C.
        backbone: keyword arguments of ``create_backbone`` (name, embedding_dim, ...).
        head: ``create_head``'s arguments from the ``head`` section (name, s, m, sample_rate).
        optim: the ``stage1.optim`` config section as a dict.
        config: the whole resolved run config, stored in every checkpoint.
    """

    stage = 1

    def __init__(
        self,
        num_classes: int,
        backbone: dict[str, Any],
        head: dict[str, Any],
        optim: dict[str, Any],
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        # this frame given: Lightning's own lookup keeps its frame in a reference cycle,
        # and with it every caller's frame and locals until the next garbage collection
        # (a loader's worker processes, a caller's tensors). Not logged: the stages'
        # optim, head, num_classes... under one name each, W&B's config kept stage 2's
        # (a review); StageSystem.on_fit_start logs the run's config instead.
        self.save_hyperparameters(frame=inspect.currentframe(), logger=False)
        self.backbone = create_backbone(**backbone)
        self.head = create_head(
            num_classes=num_classes, embedding_dim=backbone["embedding_dim"], **head
        )
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, images: Tensor) -> Tensor:
        """Un-normalised face embeddings [B, embedding_dim]."""
        return self.backbone(images)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        images, labels = batch
        loss = self.head.loss(self.backbone(images), labels)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(labels))
        return {"loss": loss}

    def _eval_step(
        self, batch: tuple[Tensor, Tensor], metric: MulticlassAccuracy, key: str
    ) -> None:
        images, labels = batch
        # Closed-set identification: the identity whose head row is nearest (no margin).
        predictions = self.head.predict(self.backbone(images))
        keep = scored(labels)  # a broken face that nothing could replace counts for nothing
        if keep.any():  # a batch of DDP padding alone (EvalShardSampler) updates nothing
            metric.update(predictions[keep], labels[keep])
        self.log(key, metric, prog_bar=True, batch_size=len(labels))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc, "val/acc")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc, "test/acc")

    def backbones(self) -> list[torch.nn.Module]:
        return [self.backbone]

    def margin_heads(self) -> dict[str, MarginHead]:
        return {"head": self.head}

    def trained_modules(self) -> list[torch.nn.Module]:
        return [self.backbone, self.head]
