"""The final decision unit (Ahmadi & Dianat, JSDP 2024).

It combines the two sources of evidence about a face's identity: the chosen
sub-net's cosine to each of its identities' head rows, and the clustering unit's
similarity of the face's stage-1 embedding to each identity's class mean. The
fused score is ``(1 - alpha) * subnet_cosine + alpha * class_mean_similarity``;
alpha 0 is the sub-nets unit alone, alpha 1 the clustering unit alone
(nearest class mean within the candidate clusters).
"""

from __future__ import annotations

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


def keep_best(
    best_score: Tensor, best_id: Tensor, rows: Tensor, score: Tensor, identity: Tensor
) -> None:
    """Update running per-image bests in place with candidates for images ``rows``.

    Ties go to the lower identity id, so the answer does not depend on the order in
    which clusters are visited (batched and one-by-one inference agree).
    """
    current_score, current_id = best_score[rows], best_id[rows]
    better = (score > current_score) | ((score == current_score) & (identity < current_id))
    best_score[rows] = score.where(better, current_score)
    best_id[rows] = identity.where(better, current_id)
