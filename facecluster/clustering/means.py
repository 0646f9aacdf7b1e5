"""Class-mean embeddings, accumulated batch by batch.

Ahmadi & Dianat, "A two-stage clustering-based distributed framework for
large-scale face identification", JSDP 21(1), 2024: after the backbone is
trained on all identities, every identity is represented by the mean of its
training images' L2-normalised embeddings, L2-normalised again. These class
means are what k-means clusters and what test-time routing compares against.

The accumulation is streaming (one call per batch, sums and counts kept by the
caller, e.g. a Lightning callback, and all-reduced across ranks before
finalising) and vectorised with ``index_add_``: there is no per-class Python
loop, which matters with tens of thousands of identities.

Plain torch only: no lightning and no other facecluster packages.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from facecluster.io import shown_list

__all__ = ["accumulate_class_sums", "embedding_class_sums", "finalize_class_means"]

_ROWS = 65_536  # class rows per block of finalize_class_means


def accumulate_class_sums(
    embeddings: torch.Tensor,
    labels: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
) -> None:
    """Add a batch's L2-normalised embeddings to per-class running sums, in place.

    Each embedding is normalised in float32 (fp16/bf16 autocast outputs would
    otherwise lose precision in the norm) and added to ``sums[label]``; the
    class's ``counts`` entry is incremented. Gradients are not tracked.
    ``embeddings`` and ``labels`` are moved to the device of ``sums`` if needed.

    Args:
        embeddings: ``[N, d]`` batch embeddings (any floating dtype).
        labels: ``[N]`` integer identity ids in ``[0, C)``.
        sums: ``[C, d]`` float32 or float64 accumulator, updated in place.
        counts: ``[C]`` accumulator (integer or floating), same device as
            ``sums``, updated in place.

    Raises:
        ValueError: on shape/dtype/device mismatches or out-of-range labels.
    """
    if sums.dim() != 2 or sums.dtype not in (torch.float32, torch.float64):
        raise ValueError(
            f"sums must be a [C, d] float32/float64 tensor, got {sums.dtype} {tuple(sums.shape)}"
        )
    if counts.dim() != 1 or counts.shape[0] != sums.shape[0]:
        raise ValueError(f"counts must be [C]={sums.shape[0]}, got shape {tuple(counts.shape)}")
    if counts.device != sums.device:
        raise ValueError(
            f"sums ({sums.device}) and counts ({counts.device}) must be on the same device"
        )
    if embeddings.dim() != 2 or embeddings.shape[1] != sums.shape[1]:
        raise ValueError(
            f"embeddings must be [N, {sums.shape[1]}] to match sums, "
            f"got shape {tuple(embeddings.shape)}"
        )
    if not embeddings.is_floating_point():
        raise ValueError(f"embeddings must be floating point, got {embeddings.dtype}")
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(
            f"labels must be [N]={embeddings.shape[0]} to match embeddings, "
            f"got shape {tuple(labels.shape)}"
        )
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.numel() == 0:
        return
    labels = labels.to(device=sums.device, dtype=torch.long)
    # index_add_ with an out-of-range index is a device-side assert on CUDA (the
    # process dies with no useful message), so check here with a clear error.
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= sums.shape[0]:
        raise ValueError(f"labels must be in [0, {sums.shape[0]}), got range [{lo}, {hi}]")
    with torch.no_grad():
        emb = F.normalize(embeddings.detach().to(device=sums.device, dtype=torch.float32), dim=1)
        sums.index_add_(0, labels, emb.to(sums.dtype))
        counts.index_add_(0, labels, torch.ones_like(labels, dtype=counts.dtype))


def finalize_class_means(
    sums: torch.Tensor, counts: torch.Tensor, device: torch.device | str | None = None
) -> torch.Tensor:
    """Turn per-class sums and counts into L2-normalised class means.

    Args:
        sums: ``[C, d]`` sums of L2-normalised embeddings.
        counts: ``[C]`` number of embeddings per class.
        device: where the result goes (None: the device of ``sums``).

    Returns:
        ``[C, d]`` float32 class means, each row L2-normalised, on ``device``.

    Raises:
        ValueError: if some class has no embeddings (names up to 10 of the ids
            and how many there are in all), or on shape mismatches.
    """
    if sums.dim() != 2 or not sums.is_floating_point():
        raise ValueError(
            f"sums must be a [C, d] floating tensor, got {sums.dtype} {tuple(sums.shape)}"
        )
    if counts.dim() != 1 or counts.shape[0] != sums.shape[0]:
        raise ValueError(f"counts must be [C]={sums.shape[0]}, got shape {tuple(counts.shape)}")
    empty = (counts.to(sums.device) <= 0).nonzero().flatten()
    if empty.numel():
        raise ValueError(
            f"{empty.numel()} of {sums.shape[0]} classes have no embeddings, so they have no class "
            f"mean: class ids {shown_list([str(i) for i in empty.tolist()], 10)}"
        )
    # Divide and normalise in at least float64 when the sums are float64, so the
    # accumulated precision is not thrown away before the final cast; a block of rows
    # at a time, into the float32 result where it is wanted: the whole [C, d] in float64
    # would be copied three times (at 2M x 512: 23 GiB beside the sums, on the GPU)
    device = sums.device if device is None else torch.device(device)
    dtype = torch.float64 if sums.dtype == torch.float64 else torch.float32
    counts = counts.to(device=sums.device, dtype=dtype)
    means = torch.empty(sums.shape, dtype=torch.float32, device=device)
    for s in range(0, len(sums), _ROWS):
        block = sums[s : s + _ROWS].to(dtype) / counts[s : s + _ROWS].unsqueeze(1)
        means[s : s + _ROWS] = F.normalize(block, dim=1).to(device)
    return means


def embedding_class_sums(
    embed: Callable[[torch.Tensor], torch.Tensor],
    loader: Iterable[tuple[torch.Tensor, torch.Tensor]],
    num_classes: int,
    dim: int,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One streamed pass: per-class sums of normalised embeddings and counts.

    Args:
        embed: maps an image batch (already on ``device``) to ``[N, dim]`` embeddings.
        loader: yields ``(images, labels)`` with global labels.
        num_classes: C.
        dim: embedding size d.
        device: where the model runs and the sums live.
        progress: show a progress bar.

    Returns:
        ``sums`` [C, d] float64 (so sums over shards add up exactly as one pass) and
        ``counts`` [C] long; reduce them across ranks, then ``finalize_class_means``.
    """
    # Ordinary tensors, filled under inference mode: callers all-reduce them in place,
    # which inference tensors would refuse outside inference mode.
    sums = torch.zeros(num_classes, dim, dtype=torch.float64, device=device)
    counts = torch.zeros(num_classes, dtype=torch.long, device=device)
    with torch.inference_mode():
        for images, labels in tqdm(loader, desc="class means", disable=not progress, leave=False):
            embeddings = embed(images.to(device))
            # a face no readable one could replace has a negative label (the data
            # package's IGNORED): it adds to no class
            keep = (labels >= 0).to(device)
            accumulate_class_sums(embeddings.float()[keep], labels.to(device)[keep], sums, counts)
    return sums, counts
