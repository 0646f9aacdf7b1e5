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
    "gather_sizes",
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


def gather_sizes(rows: int, device: torch.device) -> list[int]:
    """Every process's row count (one small all-gather; ``[rows]`` without DDP)."""
    world = distributed_world()[1]
    if world == 1:
        return [rows]
    sizes = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([rows], dtype=torch.long, device=device))
    return [int(s) for s in sizes]


def gather_rows(x: Tensor, sizes: list[int] | None = None) -> Tensor:
    """Every process's rows of ``x``, in rank order (any row count per process).

    ``sizes`` (``gather_sizes``) saves the size exchange when it is known. Differentiable:
    the backward pass returns this process's rows of the gradient summed over processes,
    times the world size (the module docstring says why).
    """
    rank, world = distributed_world()
    if world == 1:
        return x
    sizes = sizes or gather_sizes(x.shape[0], x.device)
    if x.requires_grad:
        return _GatherRows.apply(x, sizes, rank)
    return _all_gather(x, sizes)


def gather_to_first(shard: Tensor, num_rows: int) -> Tensor | None:
    """The whole tensor from the row shards ``shard_range`` gives each process, on rank
    0's CPU (None elsewhere); every process must call it. Used to save a sharded head
    (and its optimizer state) as one logical tensor, readable at any device count.

    Rank 0 receives one shard at a time into host memory, so no device ever holds more
    than one shard more than it did. Under NCCL the shards travel through the current
    CUDA device, wherever they are (Lightning moves the model to the CPU at teardown).
    """
    rank, world = distributed_world()
    if world == 1:
        return shard.cpu()
    device = shard.device
    if dist.get_backend() == "nccl":
        device = torch.device("cuda", torch.cuda.current_device())
    ranges = [shard_range(num_rows, r, world) for r in range(world)]
    if rank != 0:
        dist.send(shard.detach().to(device).contiguous(), dst=0)
        return None
    whole = torch.empty((num_rows, *shard.shape[1:]), dtype=shard.dtype)
    whole[ranges[0][0] : ranges[0][1]] = shard.detach().cpu()
    buffer = torch.empty((ranges[0][1], *shard.shape[1:]), dtype=shard.dtype, device=device)
    for r in range(1, world):
        start, end = ranges[r]
        part = buffer[: end - start]
        dist.recv(part, src=r)
        whole[start:end] = part.cpu()
    return whole


def sharded_argmax(
    embeddings: Tensor, cosine: Callable[[Tensor], Tensor], row_start: int
) -> Tensor:
    """The class (row of the whole head) nearest each of this process's embeddings,
    for a head sharded over the processes of the default group.

    Every process must call it (with any row count, zero included): the embeddings are
    gathered, each process finds its shard's best row for every one, and the best over
    processes wins (ties: the lowest class, as ``argmax`` over the whole head).
    """
    rank, world = distributed_world()
    # one dtype on every process (a process with no images sends fp32)
    embeddings = embeddings.to(torch.promote_types(embeddings.dtype, torch.float32))
    sizes = gather_sizes(embeddings.shape[0], embeddings.device)
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
        here = target >= 0  # masks, not indices: no host synchronisation
        index = target.clamp(min=0).unsqueeze(1)
        target_logit = logits.new_zeros(rows)
        if logits.shape[1]:
            target_logit = logits.detach().gather(1, index).squeeze(1) * here
        if world > 1:  # each row's target is on exactly one process: a sum is it
            both = torch.stack([sums, target_logit])
            dist.all_reduce(both)
            sums, target_logit = both[0], both[1]
        exp /= sums.unsqueeze(1)  # this shard's columns of the softmax
        ctx.save_for_backward(exp, index, here)
        return sums.log() + maxes - target_logit

    @staticmethod
    def backward(ctx, grad_loss: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        softmax, index, here = ctx.saved_tensors
        grad = softmax.clone()
        if grad.shape[1]:
            grad.scatter_add_(1, index, -here.to(grad.dtype).unsqueeze(1))  # minus one-hot
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


def sample_columns(
    target: Tensor, rows: tuple[int, int], num_classes: int, sample_rate: float
) -> tuple[Tensor, Tensor]:
    """The rows of a shard a sampled step uses: every positive plus a uniform sample of
    the others, ``max(positives, ceil(sample_rate * shard rows))`` in all.

    The random scores are drawn for the whole head and each shard takes its slice, so
    shards sample independently of each other even when every process's generator is in
    the same state. The processes' generators are seeded per rank (EpochSeedCallback,
    and stage 2's per-step forward seed adds the rank), so which classes a step samples
    depends on the number of processes: with ``sample_rate < 1``, runs on different
    device counts differ (each a uniform sample).

    Args:
        target: ``[N]`` each gathered row's class in this shard, -1 if not here.
        rows: the shard's rows ``[start, end)`` of the whole head.
        num_classes: rows of the whole head.
        sample_rate: the share of rows to use, in (0, 1].

    Returns:
        ``index`` (the sorted shard rows used) and ``target`` remapped to positions in
        ``index``.
    """
    start, end = rows
    num_rows = end - start
    positives = torch.unique(target[target >= 0])  # sorted
    count = min(num_rows, math.ceil(sample_rate * num_rows - 1e-9))
    if positives.numel() >= count:
        index = positives
    else:
        score = torch.rand(num_classes, device=target.device)[start:end]
        score[positives] = 2.0  # above every draw: kept
        index = score.topk(count).indices.sort().values
    remapped = torch.searchsorted(index, target.clamp(min=0))
    return index, torch.where(target >= 0, remapped, target)
