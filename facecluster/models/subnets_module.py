"""Stage 2: the sub-nets unit of Ahmadi & Dianat (JSDP 2024).

K sub-nets, one per cluster of identities, each a copy of the stage-1 backbone
(warm start) with its own margin head over its cluster's identities only. One
system trains a group of them (``subnet_ids``: all K, or one stage-2 job's share).
A training batch is a dict ``{k: (images, local labels)}`` with one batch per
sub-net of the group; the loss is the sum of their cross-entropies. Sub-nets
share no parameter, so each receives exactly its own gradient, and under DDP every
parameter is used in every step (plain ``ddp`` works, no unused-parameter scan).

A sub-net trains the same however sub-nets are grouped (docs/TRAINING.md): its
initial head comes from its own seed, its data stream from its own sampler
(``SubnetSampler``), its forward pass's random draws (dropout) from a generator
reseeded from (its seed, epoch, batch, and the DDP rank after rank 0), and its
gradient clipping is its own.

With ``shared_layers`` > 0 (``model.shared_layers``), each sub-net's first stages
(stem included) keep the stage-1 weights, frozen: no gradient, BatchNorm statistics
unchanged (those modules stay in eval mode), so every sub-net's trunk remains the
stage-1 trunk and routed inference can run it once for the router and the sub-nets.
Only the later stages and the head train.

The cluster assignment lives in full-size buffers registered in ``__init__`` so
a checkpoint restores it with no resizing.
"""

from __future__ import annotations

import inspect
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint
from torchmetrics import Metric

from facecluster.data import SEED_FORWARD, scored, subnet_seed
from facecluster.models.base import StageSystem
from facecluster.models.components import (
    MarginHead,
    create_backbone,
    create_head,
    shareable_stages,
)
from facecluster.models.components.partial_fc import gather_to_first


class PerClusterAccuracy(Metric):
    """Top-1 accuracy of each sub-net on its own cluster's images (synced across ranks)."""

    full_state_update = False

    def __init__(self, num_clusters: int) -> None:
        super().__init__()
        self.add_state("correct", torch.zeros(num_clusters, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_clusters, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, cluster: int, correct: Tensor) -> None:
        self.correct[cluster] += correct.sum()
        self.total[cluster] += correct.numel()

    def compute(self) -> Tensor:
        """[2, K]: correct answers and images of each cluster (summed over ranks)."""
        return torch.stack([self.correct, self.total])


class SubnetSystem(StageSystem):
    """K sub-nets with per-cluster margin heads (stage 2).

    Args:
        num_classes: number of identities C.
        cluster_sizes: identities per cluster, length K.
        backbone: keyword arguments of ``create_backbone`` (each sub-net's backbone).
        head: ``create_head``'s arguments from the ``head`` section (name, s, m, sample_rate).
        optim: the ``stage2.optim`` config section as a dict.
        config: the whole resolved run config, stored in every checkpoint.
        subnet_ids: the clusters whose sub-nets this system trains (None: all K).
        seed: the run's seed; sub-net k's draws come from ``subnet_seed(seed, k)``.
        shared_layers: the first stages of every sub-net that stay the stage-1 backbone's
            (frozen); 0: whole sub-nets train.
        not_mine: each head has one more row, last, the "not mine" class that the
            other clusters' images of ``stage2.negatives`` are labelled with.
        activation_checkpointing: recompute each sub-net's forward pass in the backward
            pass instead of keeping its activations (``stage2.activation_checkpointing``):
            a step then holds one sub-net's activations at a time, not all of its
            sub-nets', for one more forward pass per sub-net. The weights are the same.
    """

    stage = 2

    def __init__(
        self,
        num_classes: int,
        cluster_sizes: list[int],
        backbone: dict[str, Any],
        head: dict[str, Any],
        optim: dict[str, Any],
        config: dict[str, Any] | None = None,
        subnet_ids: list[int] | None = None,
        seed: int = 0,
        shared_layers: int = 0,
        not_mine: bool = False,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        # this frame given: Lightning's own lookup keeps its frame in a reference cycle,
        # and with it every caller's frame and locals until the next garbage collection
        # (a loader's worker processes, a caller's tensors). Not logged: the stages'
        # optim, head, num_classes... under one name each, W&B's config kept stage 2's
        # (a review); StageSystem.on_fit_start logs the run's config instead.
        self.save_hyperparameters(frame=inspect.currentframe(), logger=False)
        dim = backbone["embedding_dim"]
        self.subnet_ids = (
            list(subnet_ids) if subnet_ids is not None else list(range(len(cluster_sizes)))
        )
        self.subnets = nn.ModuleDict()
        self.heads = nn.ModuleDict()
        # every sub-net starts from the stage-1 backbone (warm_start, or a checkpoint):
        # timm's pretrained weights would be loaded K times for nothing, and fetched on
        # nodes that may have no network
        built = {**backbone, "pretrained": False}
        for k in self.subnet_ids:  # keys "subnets.<k>." whatever the group
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(subnet_seed(seed, k))
                self.subnets[str(k)] = create_backbone(**built)
                self.heads[str(k)] = create_head(
                    num_classes=cluster_sizes[k] + int(not_mine), embedding_dim=dim, **head
                )
        if shared_layers:
            available = shareable_stages(next(iter(self.subnets.values())))
            if not 0 < shared_layers <= available:
                can = (
                    f"1 to {available} stages"
                    if available
                    else "no stages (IResNets, MobileFaceNets, tiny can)"
                )
                raise ValueError(
                    f"shared_layers={shared_layers}: backbone {backbone['name']!r} can share {can}"
                )
            for module in self._frozen():
                module.requires_grad_(False)
                module.eval()  # also the mode Lightning records and restores around validation
            self._share_trunks(shared_layers)
        self.register_buffer("class_to_cluster", torch.zeros(num_classes, dtype=torch.long))
        self.register_buffer("local_index", torch.zeros(num_classes, dtype=torch.long))
        self._members: list[Tensor] = []  # each cluster's identities (set_assignment)
        # read once, by warm_start, on the CPU: not a buffer, so not in every job's
        # checkpoints and on every GPU ([C, d]: 3.8 GiB at 2M identities, computed)
        self._class_means: Tensor | None = None
        self.val_acc = PerClusterAccuracy(len(cluster_sizes))
        self.test_acc = PerClusterAccuracy(len(cluster_sizes))
        self.counts: dict[int, tuple[int, int]] = {}

    def train(self, mode: bool = True) -> SubnetSystem:
        super().train(mode)
        for module in self._frozen():  # shared trunks keep the stage-1 BatchNorm statistics
            module.eval()
        return self

    def _share_trunks(self, stages: int) -> None:
        """One frozen trunk for all sub-nets: each sub-net's trunk parameters and buffers
        become the first's tensors. They hold the same values (the stage-1 backbone's,
        loaded into every sub-net by the warm start and by checkpoints), so K copies
        were held on each device and written into each stage-2 checkpoint (K=8,
        IResNet-50, 4 stages: 1,333 MiB of distinct tensors, 511 MiB tied, measured;
        K=64, IResNet-100, 4 stages: 63 copies of a 200 MiB trunk, 12.3 GiB, computed).
        Keys stay per sub-net: checkpoints keep their layout, and ``torch.save`` writes
        a shared tensor once."""
        first, *others = self.subnets.values()
        for other in others:
            pairs = zip(first.trunk_modules(stages), other.trunk_modules(stages), strict=True)
            for mine, theirs in pairs:
                for a, b in zip(mine.modules(), theirs.modules(), strict=True):
                    for name, tensor in [
                        *a.named_parameters(recurse=False),
                        *a.named_buffers(recurse=False),
                    ]:
                        setattr(b, name, tensor)

    def _apply(self, fn: Any, recurse: bool = True) -> SubnetSystem:
        # a move or cast (.to(device), .double()) converts the parameters in place, but
        # gives every module its own new buffers: the trunks' BatchNorm statistics tied
        # again, before Lightning's DDP wrapper lists the buffers it broadcasts
        super()._apply(fn, recurse)
        if self.hparams.get("shared_layers", 0):
            self._share_trunks(self.hparams.shared_layers)
        return self

    def _frozen(self) -> list[nn.Module]:
        """The shared trunks' modules, looked up each time (a SyncBatchNorm conversion
        replaces BatchNorm modules after construction)."""
        n = self.hparams.get("shared_layers", 0)
        return [m for s in self.subnets.values() for m in s.trunk_modules(n)] if n else []

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Checkpoints written before facecluster 0.1's consolidation held an unread
        # ``centroids`` buffer, and later ones a ``class_means`` buffer read only by the
        # warm start; dropping them lets those runs resume in stage 2.
        checkpoint["state_dict"].pop("centroids", None)
        checkpoint["state_dict"].pop("class_means", None)
        super().on_load_checkpoint(checkpoint)

    @property
    def num_clusters(self) -> int:
        """K, all clusters of the run (this system may train fewer: ``subnet_ids``)."""
        return len(self.hparams.cluster_sizes)

    def set_assignment(self, assignment: Any) -> None:
        """Copy a ClusterAssignment's labels into the buffers, and keep its class means
        for :meth:`warm_start`.

        The labels travel in every checkpoint: evaluation routes each image to its true
        cluster's sub-net (``class_to_cluster``, ``local_index``). The class means do
        not (the warm start, their only reader, runs before any checkpoint).
        """
        sizes = assignment.cluster_sizes().tolist()
        if sizes != list(self.hparams.cluster_sizes):
            raise ValueError(
                f"cluster sizes {sizes} do not match this model's "
                f"{list(self.hparams.cluster_sizes)}"
            )
        self.class_to_cluster.copy_(assignment.class_to_cluster)
        self.local_index.copy_(assignment.local_index)
        self._class_means = assignment.class_means
        self._members = assignment.all_members()

    def warm_start(
        self,
        backbone_state: dict[str, Tensor],
        init_heads_from_means: bool,
        head_state: dict[str, Tensor] | None = None,
    ) -> None:
        """Start every sub-net from the stage-1 backbone (call after set_assignment).

        With ``init_heads_from_means`` each head row starts at its identity's class
        mean: the stage-1 backbone already separates those identities, so stage 2
        starts from a working classifier instead of random rows. ``head_state``: the
        stage-1 head's other tensors; each head takes those it has too (AdaFace's norm
        statistics: they describe the backbone the sub-nets start from, and from
        AdaFace's own start, a std of 100, a sub-net's margin barely moved).
        """
        for subnet in self.subnets.values():
            subnet.load_state_dict(backbone_state)
        for head in self.heads.values():
            own = dict(head.named_buffers())
            with torch.no_grad():
                for name, value in (head_state or {}).items():
                    if name in own and own[name].shape == value.shape:
                        own[name].copy_(value)
        if init_heads_from_means:
            for k in self.subnet_ids:  # a head's rows are its cluster's members, in order
                members = self._members[k]
                with torch.no_grad():  # the "not mine" row, last, keeps its random start
                    self.heads[str(k)].weight[: len(members)].copy_(self._class_means[members])

    def forward(self, images: Tensor, cluster: int) -> Tensor:
        """Embeddings of ``images`` by sub-net ``cluster``."""
        return self.subnets[str(cluster)](images)

    def subnet_state(self, k: int) -> tuple[dict[str, Tensor], Tensor | None]:
        """Sub-net ``k``'s backbone state dict and all its head rows (detached, on the
        CPU). A sharded head is gathered: every process must call this, and only rank 0
        gets the rows (None elsewhere)."""
        state = {n: t.detach().cpu() for n, t in self.subnets[str(k)].state_dict().items()}
        head = self.heads[str(k)]
        return state, gather_to_first(head.weight.detach(), head.num_classes)

    def training_step(
        self, batch: dict[int, tuple[Tensor, Tensor]], batch_idx: int
    ) -> dict[str, Tensor]:
        """Sum of the K cross-entropies.

        Returns:
            ``loss`` (the sum, which Lightning optimises) and ``subnet_losses`` [K]
            (detached, index = cluster), read by callbacks such as the divergence check.
        """
        losses = torch.zeros(self.num_clusters, device=self.device)
        total = 0.0
        devices = [self.device] if self.device.type == "cuda" else []
        for k, (images, labels) in batch.items():
            k = int(k)
            with torch.random.fork_rng(devices=devices):
                # this sub-net's dropout draws: from its seed and the batch, not from
                # whichever sub-nets ran before it in this job (the default generators
                # only: torch.manual_seed would also seed every other backend, ~0.3 ms);
                # each DDP rank its own masks for its own images (rank 0's stream is
                # the one-process run's)
                rank = (self.global_rank,) if self.global_rank else ()
                seed = subnet_seed(
                    self.hparams.seed, k, SEED_FORWARD, self.current_epoch, batch_idx, *rank
                )
                torch.random.default_generator.manual_seed(seed)
                if devices:
                    torch.cuda.manual_seed(seed)
                loss = self.heads[str(k)].loss(self._embed(k, images), labels)
            self.log(f"train/loss_subnet{k}", loss, batch_size=len(labels))
            losses[k] = loss.detach()
            total = total + loss
        # not train/loss, stage 1's name: W&B's summary kept the last stage's value
        # under one name, and a job's sum grew with its sub-nets (a review). The mean
        # over the job's sub-nets; each step minimises their sum.
        self.log("train/loss_subnets", total / len(batch), prog_bar=True, batch_size=1)
        return {"loss": total, "subnet_losses": losses}

    def _embed(self, k: int, images: Tensor) -> Tensor:
        """Sub-net ``k``'s training forward pass; under ``activation_checkpointing`` its
        activations are recomputed in the backward pass (the same random draws: the
        generator's state is restored for it; the BatchNorm statistics move once)."""
        subnet = self.subnets[str(k)]
        if not self.hparams.get("activation_checkpointing", False):
            return subnet(images)
        return checkpoint(
            subnet,
            images,
            use_reentrant=False,
            context_fn=lambda: (nullcontext(), _KeepBuffers(subnet)),
        )

    def clip_groups(self) -> list[list[nn.Module]]:
        # Lightning's clipping takes one global norm over all sub-nets: one exploding
        # sub-net would shrink every other sub-net's step to nearly nothing. Each
        # sub-net (with its head) is clipped on its own instead.
        return [[self.subnets[str(k)], self.heads[str(k)]] for k in self.subnet_ids]

    def _eval_step(self, batch: tuple[Tensor, Tensor], metric: PerClusterAccuracy) -> None:
        # Oracle routing: each image goes to the sub-net of its true identity's cluster,
        # which measures every sub-net on its own cluster (routing comes at inference).
        images, labels = batch
        keep = scored(labels)  # a broken face that nothing could replace counts for nothing
        images, labels = images[keep], labels[keep]
        clusters = self.class_to_cluster[labels]
        present = set(clusters.unique().tolist())
        for k in self.subnet_ids:  # in the same order on every process
            head = self.heads[str(k)]
            if k not in present and not head.sharded:
                continue
            idx = (clusters == k).nonzero().squeeze(1)
            # sharded: every process takes part, with or without images of this cluster
            embeddings = (
                self.subnets[str(k)](images[idx])
                if len(idx)
                else images.new_zeros((0, head.embedding_dim))
            )
            predictions = head.predict(embeddings)
            metric.update(k, predictions == self.local_index[labels[idx]])

    def _log_accuracy(self, metric: PerClusterAccuracy, prefix: str) -> None:
        """Each sub-net's accuracy and, as ``<prefix>/acc_subnets``, the group's (not
        ``<prefix>/acc``, stage 1's: one model's accuracy over all identities, where this
        one sends each face to its own cluster's sub-net)."""
        # compute() sums the counts over the processes, so every process logs the same
        # numbers; sync_dist (their mean: the same) only keeps Lightning from warning,
        # once per key under DDP, that epoch-level values should be synchronised
        correct, total = metric.compute()[:, self.subnet_ids].tolist()
        accuracy = [c / max(1, n) for c, n in zip(correct, total, strict=True)]
        self.log_dict(
            {f"{prefix}/acc_subnet{k}": a for k, a in zip(self.subnet_ids, accuracy, strict=True)},
            sync_dist=True,
        )
        pooled = sum(correct) / max(1, sum(total))
        self.log(f"{prefix}/acc_subnets", pooled, prog_bar=True, sync_dist=True)
        # the last pass's counts, by sub-net: what a finished sub-net's record keeps
        self.counts = {k: (c, n) for k, c, n in zip(self.subnet_ids, correct, total, strict=True)}
        metric.reset()

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.val_acc)

    def on_validation_epoch_end(self) -> None:
        self._log_accuracy(self.val_acc, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, self.test_acc)

    def on_test_epoch_end(self) -> None:
        self._log_accuracy(self.test_acc, "test")

    def backbones(self) -> list[nn.Module]:
        return list(self.subnets.values())

    def replicated_buffers(self) -> list[str]:
        # from the clustering, identical on every rank (tests/test_ddp.py)
        return ["class_to_cluster", "local_index"]

    def margin_heads(self) -> dict[str, MarginHead]:
        return {f"heads.{k}": head for k, head in self.heads.items()}

    def trained_modules(self) -> list[nn.Module]:
        return [*self.subnets.values(), *self.heads.values()]


class _KeepBuffers(AbstractContextManager):
    """Around a checkpointed forward pass's recomputation: ``module``'s buffers end as
    they were before it (the BatchNorm running statistics, which a forward pass in
    training mode moves), so that they move once per step, as without checkpointing
    (the recomputation normalises with the batch's own statistics, which are what the
    forward pass used)."""

    def __init__(self, module: nn.Module) -> None:
        self.buffers = list(module.buffers())

    def __enter__(self) -> _KeepBuffers:
        self.saved = [b.clone() for b in self.buffers]
        return self

    def __exit__(self, *exc: object) -> None:
        with torch.no_grad():
            for buffer, value in zip(self.buffers, self.saved, strict=True):
                buffer.copy_(value)
