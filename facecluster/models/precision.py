"""fp16 loss scaling whose overflow skips only the sub-nets it happened in.

Under ``trainer.precision=16-mixed`` (the ``auto`` choice on Volta and Turing GPUs)
one loss scaler (``torch.amp.GradScaler``) serves a Trainer's optimizer. When any
gradient is not finite after unscaling, Lightning's :class:`MixedPrecision` lets the
scaler skip the whole optimizer step and lower the scale. In a stage-2 job that
optimizer holds every sub-net of the job, so one sub-net's fp16 overflow skipped the
step of all its job mates, and a sub-net that overflowed often held the others back.

:class:`GroupSkipMixedPrecision` checks the unscaled gradients of each clip group
(:meth:`~facecluster.models.base.StageSystem.clip_groups`: each sub-net with its
head) and drops the gradients of the groups that are not finite, so the optimizer
steps the others and leaves those as a skipped step would (SGD and AdamW pass over a
parameter without a gradient: no weight decay, no momentum or moment update). The
scale still backs off at any overflow, as the scaler's own rule says. With one group
(stage 1), or every group overflowed, it is Lightning's step.

Under DDP the gradients of replicated weights are all-reduced, so every process finds
the same overflows in them; a sharded margin head's gradients are each process's own
(Partial FC), so one process's shard can overflow alone. The groups' flags are then
all-reduced (one collective of K flags a step), and so is the scaler's own flag:
under DDP the scaler is ``ShardedGradScaler`` (torch's FSDP scaler, which all-reduces
what ``unscale_`` found), so every process steps, skips and scales alike; with
Lightning's scaler a process whose shard overflowed skipped a step (stage 1: the
whole step) the others took, and lowered a scale the others kept, and the replicated
backbones drifted apart.

The check reads each group's largest absolute gradient once a step (one pass over the
gradients) and the K flags once on the host, one host sync more than the scaler's
own step.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.plugins.precision import MixedPrecision
from torch import nn

from facecluster.models.components import MarginHead

__all__ = ["GroupSkipMixedPrecision", "group_skip_plugin", "skip_groups_apart"]


class GroupSkipMixedPrecision(MixedPrecision):
    """Lightning's ``16-mixed`` plugin whose loss-scaler overflow skips only the clip
    groups (sub-nets) whose gradients are not finite (module docstring)."""

    def optimizer_step(  # type: ignore[override]
        self,
        optimizer: Any,
        model: L.LightningModule,
        closure: Callable[[], Any],
        **kwargs: Any,
    ) -> Any:
        groups = model.clip_groups() if hasattr(model, "clip_groups") else []
        if (
            self.scaler is None
            or len(groups) < 2
            or not model.automatic_optimization
            or getattr(optimizer, "_step_supports_amp_scaling", False)  # unscales itself
        ):
            return super().optimizer_step(optimizer, model=model, closure=closure, **kwargs)
        closure_result = closure()
        if closure_result is None:  # training_step returned None: no backward, no step
            self._after_closure(model, optimizer)
            return closure_result
        self.scaler.unscale_(optimizer)
        params = [
            [p for m in group for p in m.parameters() if p.grad is not None] for group in groups
        ]
        failed = _overflowed(params, sharded=_any_sharded(groups))
        if not any(failed) or all(failed):  # the scaler's own step: all, or none
            self._after_closure(model, optimizer)
            output = self.scaler.step(optimizer, **kwargs)
        else:
            for group, bad in zip(params, failed, strict=True):
                for p in group if bad else ():
                    p.grad = None  # skipped by the optimizer, and by the clipping
            self._after_closure(model, optimizer)
            output = optimizer.step(**kwargs)  # unscaled already; the scaler would skip all
        self.scaler.update()  # any overflow lowers the scale (unscale_ recorded it)
        return output

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # Lightning keeps a plugin's state under its class's name: a checkpoint saved
        # under Lightning's own plugin (before this one) keeps the scale it reached
        super().on_load_checkpoint(checkpoint)
        if type(self).__qualname__ not in checkpoint and "MixedPrecision" in checkpoint:
            self.load_state_dict(checkpoint["MixedPrecision"])


def _any_sharded(groups: list[list[nn.Module]]) -> bool:
    # a group is a network and its head (StageSystem.clip_groups): the heads are its
    # members, no walk through every network's modules at every step
    return any(isinstance(m, MarginHead) and m.sharded for group in groups for m in group)


def _overflowed(params: list[list[nn.Parameter]], sharded: bool) -> list[bool]:
    """Whether each group's gradients hold a value that is not finite (the same list on
    every process when ``sharded``: a shard's gradients are its process's own). The
    largest absolute value tells, exactly: an L2 norm's squares could overflow on
    finite gradients."""
    norms = [
        nn.utils.get_total_norm([p.grad for p in group], norm_type=math.inf) if group else None
        for group in params
    ]
    device = next((n.device for n in norms if n is not None), torch.device("cpu"))
    flags = torch.stack(
        [
            ~torch.isfinite(n).to(device)
            if n is not None
            else torch.zeros((), dtype=torch.bool, device=device)
            for n in norms
        ]
    )
    if sharded and dist.is_available() and dist.is_initialized():
        flags = flags.to(torch.uint8)
        dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return flags.bool().tolist()


def group_skip_plugin(plugin: Any, world_size: int) -> GroupSkipMixedPrecision | None:
    """What replaces Lightning's fp16 ``plugin`` (``16-mixed`` on a GPU), None for any
    other: its scaler, or with several processes a ``ShardedGradScaler`` that starts
    from that scaler's settings (module docstring)."""
    if type(plugin) is not MixedPrecision or plugin.scaler is None:
        return None
    scaler = plugin.scaler
    if world_size > 1 and scaler.is_enabled():
        # only here: torch builds without distributed support have no FSDP to import
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # its process group: the default one, which Lightning sets up before the fit
        scaler = ShardedGradScaler(plugin.device, process_group=None)
        scaler.load_state_dict(plugin.scaler.state_dict())
    return GroupSkipMixedPrecision(plugin.precision, plugin.device, scaler)


def skip_groups_apart(trainer: L.Trainer) -> None:
    """Give ``trainer`` :class:`GroupSkipMixedPrecision` in place of Lightning's fp16
    plugin, when it has one (:func:`group_skip_plugin`). A plugin of the user's own,
    bf16 and fp32 are left as they are."""
    plugin = group_skip_plugin(trainer.strategy.precision_plugin, trainer.world_size)
    if plugin is not None:
        trainer.strategy.precision_plugin = plugin
