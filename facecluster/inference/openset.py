"""Open-set identification: when to answer "unknown" (the 1:N protocol of IJB-C).

A mated probe is a face of an enrolled identity, a non-mated probe a face of
someone not enrolled. An identifier answers its best candidate when that answer's
open-set score (its similarity, not a posterior) reaches a threshold ``t``, else
unknown. Grother et al. (NIST IR 8271, FRVT 1:N) define, for a threshold:

* FPIR (false positive identification rate): the fraction of non-mated probes
  answered with any identity (score >= t);
* FNIR (false negative identification rate): the fraction of mated probes whose
  true identity is not the answer (wrong rank-1 candidate, or score below t).

:func:`threshold_at_fpir` picks the lowest threshold whose FPIR on a set of
non-mated scores is at most the target; :func:`fnir_at_fpir` reports FNIR there.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def threshold_at_fpir(nonmated_scores: Tensor, fpir: float) -> float:
    """The lowest threshold ``t`` with ``mean(nonmated_scores >= t) <= fpir``.

    With ``n`` non-mated scores, ``floor(fpir * n)`` of them may pass: ``t`` is the
    next float32 above the ``(floor(fpir * n) + 1)``-th highest score (ties are kept
    out together, so the achieved FPIR can be lower than the target).

    Raises:
        ValueError: no scores, or ``fpir`` outside ``[0, 1)``.
    """
    if not 0.0 <= fpir < 1.0:
        raise ValueError(f"fpir must be in [0, 1), got {fpir}")
    scores = nonmated_scores.detach().float().flatten().cpu()
    if scores.numel() == 0:
        raise ValueError("threshold_at_fpir needs at least one non-mated score")
    allowed = math.floor(fpir * scores.numel() + 1e-9)
    blocked = torch.sort(scores, descending=True).values[allowed]
    # the next float32 above it: float32 scores compare against it exactly
    return torch.nextafter(blocked, torch.tensor(math.inf)).item()


def fnir_at_fpir(
    mated_correct: Tensor, mated_scores: Tensor, nonmated_scores: Tensor, fpir: float
) -> tuple[float, float] | None:
    """FNIR at the threshold of :func:`threshold_at_fpir`, and that threshold.

    Args:
        mated_correct: ``bool[M]``, whether each mated probe's rank-1 answer is its
            identity.
        mated_scores: ``[M]`` the open-set scores (similarities) of those answers.
        nonmated_scores: ``[N]`` the open-set scores of the non-mated probes' answers.
        fpir: the target FPIR.

    Returns:
        ``(fnir, threshold)``; None when there are fewer than ``1 / fpir`` non-mated
        probes, too few to measure that FPIR.
    """
    if nonmated_scores.numel() * fpir < 1.0 - 1e-9 or mated_scores.numel() == 0:
        return None
    threshold = threshold_at_fpir(nonmated_scores, fpir)
    accepted = mated_correct.bool().cpu() & (mated_scores.float().cpu() >= threshold)
    return 1.0 - accepted.double().mean().item(), threshold
