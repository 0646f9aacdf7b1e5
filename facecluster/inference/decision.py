"""The final decision unit (Ahmadi & Dianat, JSDP 2024).

It combines the two sources of evidence about a face's identity: the chosen
sub-net's cosine to each of its identities' head rows, and the clustering unit's
similarity of the face's stage-1 embedding to each identity's class mean. The
fused score is ``(1 - alpha) * subnet_cosine + alpha * class_mean_similarity``;
alpha 0 is the sub-nets unit alone, alpha 1 the clustering unit alone
(nearest class mean within the candidate clusters).
"""

from __future__ import annotations

import torch
from torch import Tensor


def fuse(
    subnet_cosine: Tensor | None, class_mean_similarity: Tensor | None, alpha: float
) -> Tensor:
    """Fused scores; either input may be None when its weight is 0."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    if alpha == 0.0:
        return subnet_cosine
    if alpha == 1.0:
        return class_mean_similarity
    return (1.0 - alpha) * subnet_cosine + alpha * class_mean_similarity


def keep_top(
    best_score: Tensor, best_id: Tensor, rows: Tensor, score: Tensor, members: Tensor
) -> None:
    """Merge one cluster's candidates into running per-image top-k lists, in place.

    Args:
        best_score, best_id: ``[B, k]`` running best scores and identities, best
            first (``-inf`` and an id past the last identity where empty).
        rows: the images (indices into B) the cluster scored.
        score: ``[len(rows), n]`` fused scores of the cluster's ``n`` identities.
        members: ``[n]`` their global ids, ascending.

    Equal scores rank the lower identity id first, so the answer does not depend on
    the order in which clusters are visited (batched and one-by-one inference agree).
    """
    k = best_score.shape[1]
    if k == 1:  # argmax returns the first maximum: the lowest id among ties
        local = score.argmax(dim=1, keepdim=True)
    else:
        local = torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    scores = torch.cat([best_score[rows], score.gather(1, local)], dim=1)
    ids = torch.cat([best_id[rows], members[local]], dim=1)
    by_id = ids.argsort(dim=1, stable=True)
    scores, ids = scores.gather(1, by_id), ids.gather(1, by_id)
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    best_score[rows] = scores.gather(1, order)
    best_id[rows] = ids.gather(1, order)
