"""The distributed pieces of Partial FC: a margin head split across processes.

An et al., "Killing Two Birds with One Stone: Efficient and Robust Training of Face
Recognition CNNs by Partial FC", CVPR 2022 (arXiv:2203.15565); arcface_torch's
``partial_fc_v2.py`` is the reference implementation. ``MarginHead`` (heads.py) uses
these functions when it is sharded (``MarginHead.shard``) or sampled.

Under DDP with W processes the C class centres are split into W contiguous shards of
rows (``shard_range``); a process holds only its rows and their optimizer state.
Each training step every process:

1. all-gathers the embeddings and labels of every process (``gather_rows``; batch
   sizes may differ, as in an epoch's last batch);
2. takes the gathered batch's classes that fall in its shard, plus a uniform sample of
   its other classes (``head.sample_rate``);
3. computes the margin logits of the whole gathered batch against those columns, in fp32;
4. computes a softmax cross-entropy normalised across processes
   (``sharded_cross_entropy``): every process gets the same loss, the mean over the
   gathered batch.

The gradients, worked out (tests/test_partial_fc.py checks them against one process
with the full head):

* ``sharded_cross_entropy``'s backward is local: softmax minus one-hot over this
  process's columns. A shard's gradient is therefore complete without communication,
  which is why the head is kept out of DDP's all-reduce.
* The gathered embeddings receive, on each process, its own shard's part of the
  gradient. ``gather_rows``'s backward sums those parts over processes and keeps this
  process's rows: the full gradient of the loss for its own images.
* Each process's backbone gradient is then the loss's gradient through its own images;
  the loss's gradient with respect to the backbone is the *sum* of these over processes,
  but DDP *averages* them (divides by W). ``gather_rows``'s backward multiplies by W to
  undo that. Lightning's ``all_gather(sync_grads=True)`` (torch.distributed.nn's
  all_gather) has no such factor: with it, the backbone would learn W times slower than
  the head.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd import Function

__all__ = [
    "distributed_world",
    "gather_rows",
    "gather_to_first",
    "sample_columns",
    "shard_range",
    "sharded_argmax",
    "sharded_cross_entropy",
]


def distributed_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def shard_range(num_rows: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [start, end) of shard ``rank`` of ``world``: contiguous, the first
    ``num_rows % world`` shards one row longer (arcface_torch's split)."""
    base, extra = divmod(num_rows, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def _sizes(rows: int, device: torch.device) -> list[int]:
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def _all_gather(x: Tensor, sizes: list[int]) -> Tensor:
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded.contiguous())
    return torch.cat([p[:n] for p, n in zip(parts, sizes, strict=True)])


class _GatherRows(Function):
    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], rank: int) -> Tensor:  # type: ignore[override]
        ctx.sizes, ctx.rank = sizes, rank
        return _all_gather(x, sizes)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None]:  # type: ignore[override]
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)  # each process holds its shard's part of every row's gradient
        start = sum(ctx.sizes[: ctx.rank])
        own = grad[start : start + ctx.sizes[ctx.rank]]
        return own * len(ctx.sizes), None, None  # x W: DDP averages the backbone's gradients


def gather_rows(x: Tensor) -> Tensor:
    """Every process's rows of ``x``, in rank order (any row count per process).

    Differentiable: the backward pass returns this process's rows of the gradient summed
    over processes, times the world size (the module docstring says why).
    """
    rank, world = distributed_world()
    if world == 1:
        return x
    sizes = _sizes(x.shape[0], x.device)
    if x.requires_grad:
        return _GatherRows.apply(x, sizes, rank)
    return _all_gather(x, sizes)


def gather_to_first(shard: Tensor, num_rows: int) -> Tensor | None:
    """The whole tensor from the row shards ``shard_range`` gives each process, on rank
    0 (None elsewhere); every process must call it. Used to save a sharded head (and its
    optimizer state) as one logical tensor, readable at any device count."""
    rank, world = distributed_world()
    if world == 1:
        return shard
    ranges = [shard_range(num_rows, r, world) for r in range(world)]
    padded = shard.new_zeros((ranges[0][1] - ranges[0][0], *shard.shape[1:]))  # the longest
    padded[: shard.shape[0]] = shard
    parts = [torch.empty_like(padded) for _ in range(world)] if rank == 0 else None
    dist.gather(padded.contiguous(), parts, dst=0)
    if parts is None:
        return None
    return torch.cat([p[: end - start] for p, (start, end) in zip(parts, ranges, strict=True)])


def sharded_argmax(
    embeddings: Tensor, cosine: Callable[[Tensor], Tensor], row_start: int
) -> Tensor:
    """The class (row of the whole head) nearest each of this process's embeddings.

    Every process must call it (with any row count, zero included): the embeddings are
    gathered, each process finds its shard's best row for every one, and the best over
    processes wins (ties: the lowest class, as ``argmax`` over the whole head).
    """
    rank, world = distributed_world()
    if world == 1:
        return cosine(embeddings).argmax(dim=1) + row_start
    sizes = _sizes(embeddings.shape[0], embeddings.device)
    cos = cosine(_all_gather(embeddings, sizes))
    if cos.shape[1]:
        best, index = cos.max(dim=1)
    else:
        best = cos.new_full((cos.shape[0],), -math.inf)
        index = torch.zeros(cos.shape[0], dtype=torch.long, device=cos.device)
    bests = [torch.empty_like(best) for _ in range(world)]
    indices = [torch.empty_like(index) for _ in range(world)]
    dist.all_gather(bests, best.contiguous())
    dist.all_gather(indices, (index + row_start).contiguous())
    winner = torch.stack(bests).argmax(dim=0, keepdim=True)  # first maximum: lowest rank
    classes = torch.stack(indices).gather(0, winner).squeeze(0)
    start = sum(sizes[:rank])
    return classes[start : start + sizes[rank]]


class _ShardedCrossEntropy(Function):
    @staticmethod
    def forward(ctx, logits: Tensor, target: Tensor) -> Tensor:  # type: ignore[override]
        rank, world = distributed_world()
        rows = logits.shape[0]
        if logits.shape[1]:
            maxes = logits.detach().amax(dim=1)
        else:  # a shard with no columns (fewer classes than processes)
            maxes = logits.new_full((rows,), -math.inf)
        if world > 1:
            dist.all_reduce(maxes, op=dist.ReduceOp.MAX)
        exp = torch.exp(logits.detach() - maxes.unsqueeze(1))
        sums = exp.sum(dim=1)
        own = (target >= 0).nonzero().squeeze(1)
        target_logit = logits.new_zeros(rows)
        target_logit[own] = logits.detach()[own, target[own]]
        if world > 1:
            dist.all_reduce(sums)
            dist.all_reduce(target_logit)  # each row's target is on exactly one process
        exp /= sums.unsqueeze(1)  # this shard's columns of the softmax
        ctx.save_for_backward(exp, own, target)
        return sums.log() + maxes - target_logit

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        softmax, own, target = ctx.saved_tensors
        grad = softmax.clone()
        grad[own, target[own]] -= 1.0
        return grad * grad_loss.unsqueeze(1), None


def sharded_cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Per-row softmax cross-entropy over the columns of every process.

    Args:
        logits: ``[N, columns]`` this process's columns for the gathered batch (fp32).
        target: ``[N]`` the target's column here, or -1 where it is another process's.

    Returns:
        ``[N]`` losses, the same on every process. The backward pass is local (no
        communication): the gradient of this process's columns.
    """
    return _ShardedCrossEntropy.apply(logits, target)


def sample_columns(target: Tensor, num_rows: int, sample_rate: float) -> tuple[Tensor, Tensor]:
    """The rows of a shard a sampled step uses: every positive plus a uniform sample of
    the others, ``max(positives, ceil(sample_rate * num_rows))`` in all.

    Args:
        target: ``[N]`` each gathered row's class in this shard, -1 if not here.
        num_rows: the shard's row count.
        sample_rate: the share of rows to use, in (0, 1].

    Returns:
        ``index`` (the sorted rows used) and ``target`` remapped to positions in ``index``.
    """
    positives = torch.unique(target[target >= 0])  # sorted
    count = min(num_rows, math.ceil(sample_rate * num_rows - 1e-9))
    if positives.numel() >= count:
        index = positives
    else:
        score = torch.rand(num_rows, device=target.device)
        score[positives] = 2.0  # above every draw: kept
        index = score.topk(count).indices.sort().values
    remapped = torch.searchsorted(index, target.clamp(min=0))
    return index, torch.where(target >= 0, remapped, target)
