"""The final decision unit (Ahmadi & Dianat, JSDP 2024).

It combines the two sources of evidence about a face's identity: the chosen
sub-nets' cosines to their identities' head rows, and the clustering unit's
similarity of the face's stage-1 embedding to each identity's class mean.

``route.decision=moe`` (the default) composes probabilities, a mixture of experts
(its scores are their logarithms):

    p(j | x) = p(c | x) * [(1 - g) * p_c(j | x) + g * p_mean(j | c, x)]

for identity j of candidate cluster c. ``p(c | x)`` is the router's probability of
the cluster: the softmax over class means at temperature ``T_r``, summed over the
cluster's identities, renormalised over the ``top_m`` candidates. ``p_c(j | x)`` is
sub-net c's softmax over its identities at temperature ``T_s`` (with
``stage2.negatives``, over its identities and its "not mine" class, whose share
no identity gets: a sub-net that says "not mine" gives its cluster's identities
less); ``p_mean(j | c, x)``
the class-mean softmax inside the cluster (the stage-1 model's own prediction, kept
so that a sub-net's mistake is not final); ``g`` is its weight. The three numbers
are fitted on the validation split by :class:`Calibration` (negative
log-likelihood, as temperature scaling does: Guo et al., "On calibration of modern
neural networks", ICML 2017). With ``clustering.overlap`` an identity near a boundary is
a member of two clusters; when both are candidates its probability is the sum of the
two terms (:func:`sum_shared`), as the mixture defines it, and its class-mean softmax
term counts half in each (``share``: one over the number of the face's candidate
clusters that hold it), so that the class means weigh each identity once: with ``g =
1`` the unit is nearest class mean over the candidates' identities, overlap or not.
Each candidate's score is
a probability, so a sub-net that never saw the face's identity no longer outvotes the
right one by answering confidently: more candidates (``top_m``) can only add evidence.

``route.decision=linear`` is the earlier unit: ``(1 - alpha) * subnet_cosine +
alpha * class_mean_similarity``; alpha 0 is the sub-nets unit alone, alpha 1 the
clustering unit alone (nearest class mean within the candidate clusters).

Scores are computed in float32 under any autocast (``moe``'s log-probabilities in
float64, then ranked in float32: a log-probability near 0, a confident face's, keeps
its digits there; two candidates within about 1e-7 of each other elsewhere tie, and
the lower identity id wins). An
open-set threshold compares each answer's similarity (:func:`evidence` under ``moe``,
the fused score itself under ``linear``), not its posterior.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

TEMPERATURES = torch.logspace(math.log10(0.005), 0.0, 40, dtype=torch.float64)
"""Temperatures tried by the calibration (log-spaced, 0.005 to 1)."""
MEMBER_BLOCK = 16_384
"""Class means per block of the calibration's router pass (:meth:`Calibration.cluster_log_mass`)."""
WEIGHTS = torch.linspace(0.0, 1.0, 21, dtype=torch.float64)
"""Generalist weights tried by the calibration."""


@dataclass(frozen=True)
class MoeParams:
    """The fitted numbers of ``route.decision=moe`` (see the module doc)."""

    router_temperature: float
    subnet_temperature: float
    generalist_weight: float

    def to_route(self) -> dict[str, float]:
        return asdict(self)


def moe_scores(
    cluster_log_weight: Tensor,
    subnet_cosine: Tensor | None,
    class_mean_similarity: Tensor,
    params: MoeParams,
    not_mine: Tensor | None = None,
    share: Tensor | None = None,
) -> Tensor:
    """``[n, m]`` log-probabilities of a cluster's m identities for n faces.

    Logarithms in float64, not probabilities: a confident face's probability rounds
    to 1.0 in float32, its log-probability does not (down to 1 - p of about 1e-15), so
    candidates keep distinct scores however sure the networks are.

    Args:
        cluster_log_weight: ``[n]`` log of the cluster's probability among the candidates.
        subnet_cosine: ``[n, m]`` the cluster's sub-net cosines (None when the
            generalist weight is 1).
        class_mean_similarity: ``[n, m]`` stage-1 similarities to the class means.
        not_mine: ``[n, 1]`` the sub-net's cosine to its "not mine" row (None: none).
        share: ``[n, m]`` log of each identity's share of its class-mean term (see the
            module doc; None: all 0, no identity in two candidate clusters).
    """
    g = params.generalist_weight
    # float64: in float32 a log-softmax rounds to 0 once p > 1 - 1e-6 (the ulp of the
    # largest logit), which would tie every confident face at the top of the scale
    logits = class_mean_similarity.double() / params.router_temperature
    mean = torch.log_softmax(logits if share is None else logits + share, dim=1)
    if g == 1.0:
        mixed = mean
    else:
        subnet = _subnet_log_softmax(subnet_cosine, not_mine, params.subnet_temperature)
        mixed = (
            subnet + math.log1p(-g)
            if g == 0.0
            else torch.logaddexp(subnet + math.log1p(-g), mean + math.log(g))
        )
    return cluster_log_weight[:, None].double() + mixed


def _subnet_log_softmax(cosine: Tensor, not_mine: Tensor | None, temperature: float) -> Tensor:
    """``[n, m]`` a sub-net's log-probabilities of its m identities: the softmax over them
    and, when it has one, its "not mine" class, whose share is then left out."""
    scores = cosine.double() if not_mine is None else torch.cat([cosine, not_mine], 1).double()
    return torch.log_softmax(scores / temperature, dim=1)[:, : cosine.shape[1]]


def similarity(a: Tensor, b: Tensor) -> Tensor:
    """``a @ b.T`` in float32 whatever the autocast: cosines that a temperature of 0.01
    divides need more than bf16's 3 significant digits."""
    with torch.autocast(a.device.type, enabled=False):
        return a.float() @ b.float().T


class Calibration:
    """Fits :class:`MoeParams` on validation faces by negative log-likelihood.

    For every face, :meth:`update` adds the NLL of its true cluster under the router at
    each temperature of :data:`TEMPERATURES`, and the NLL of its identity under the
    within-cluster mixture (its true cluster's sub-net and class means) at each
    (router temperature, sub-net temperature, weight) of the grid. :meth:`fit` takes the
    router temperature with the lowest router NLL (among those tied, the one whose best
    mixture NLL is lowest), then the sub-net temperature and weight with the lowest
    mixture NLL at that router temperature. Only sums are kept: memory
    does not grow with the number of faces.
    """

    def __init__(self) -> None:
        t, w = len(TEMPERATURES), len(WEIGHTS)
        self.router_nll = torch.zeros(t, dtype=torch.float64)
        self.within_nll = torch.zeros(t, t, w, dtype=torch.float64)
        self.faces = 0
        self.left_out = 0  # faces embedded with no direction (NaN, inf, zero), not fitted on

    @staticmethod
    def cluster_log_mass(similarity: Tensor, share: Tensor) -> Tensor:
        """``[T, n]``: the log of one cluster's router mass for n faces at each
        temperature of :data:`TEMPERATURES`, ``log sum_j share_j exp(s_j / t)`` over its
        members j (what routed inference over every cluster computes for it).

        Args:
            similarity: ``[n, m]`` the faces' similarities to the cluster's class means.
            share: ``[m]`` each member's share of its term: 1, or 1/2 for an identity
                that ``clustering.overlap`` puts in two clusters (each identity counts
                once in the total over the clusters).
        """
        log_share = share.to(similarity.device, torch.float64).log()
        n = len(similarity)
        out = torch.full((len(TEMPERATURES), n), -torch.inf, dtype=torch.float64,
                         device=similarity.device)  # fmt: skip
        # members in blocks: [n, block] at a time in float64 (whose exp keeps a far
        # cluster's mass above 0 where float32's would underflow below e^-87), not a
        # cluster's [n, m] per temperature (16 GB for 256 faces and 2M identities)
        for start in range(0, similarity.shape[1], MEMBER_BLOCK):
            block = similarity[:, start : start + MEMBER_BLOCK].double()
            weight = log_share[start : start + MEMBER_BLOCK]
            for i, t in enumerate(TEMPERATURES.tolist()):
                out[i] = torch.logaddexp(out[i], torch.logsumexp(block / t + weight, dim=1))
        return out

    def update_router(self, log_mass: Tensor, right: Tensor) -> None:
        """Add faces' router NLL.

        A face is routed right to any cluster that has its identity (with
        ``clustering.overlap``, possibly two).

        Args:
            log_mass: ``[T, n, K]`` each cluster's :meth:`cluster_log_mass` for n faces.
            right: ``[n, K]`` whether each cluster has the face's identity.
        """
        right = right.to(log_mass.device)
        found = torch.logsumexp(log_mass.masked_fill(~right, -torch.inf), dim=2)
        self.router_nll += (torch.logsumexp(log_mass, dim=2) - found).sum(dim=1).cpu()
        self.faces += log_mass.shape[1]

    def update_within(
        self,
        subnet_cosine: Tensor,
        class_mean_similarity: Tensor,
        local_label: Tensor,
        not_mine: Tensor | None = None,
    ) -> None:
        """Add the mixture NLL of faces whose true cluster is the one scored here.

        The cluster is scored alone, as routed inference at ``top_m=1`` (the default)
        scores it: with ``clustering.overlap`` no member's class-mean term is shared
        with another searched cluster (:func:`moe_scores`' ``share`` is 0).

        Args:
            subnet_cosine: ``[n, m]`` that cluster's sub-net cosines.
            class_mean_similarity: ``[n, m]`` similarities to its class means.
            local_label: ``[n]`` each face's identity among the m.
            not_mine: ``[n, 1]`` the sub-net's cosine to its "not mine" row (None: none).
        """

        def probability(scores: Tensor) -> Tensor:  # [T, n]: p(true identity) per temperature
            # one temperature at a time: [n, m] at once, not [T, n, m] (40 temperatures of
            # a cluster's scores in float64: 2.6 GB for 32 faces of a 257K-identity
            # cluster, computed: 40 x 32 x 257K x 8 bytes)
            scores = scores.double()
            true = scores.gather(1, local_label[:, None].to(scores.device))[:, 0]
            return torch.stack(
                [
                    (true / t - torch.logsumexp(scores / t, dim=1)).exp()
                    for t in TEMPERATURES.tolist()
                ]
            )

        scores = subnet_cosine if not_mine is None else torch.cat([subnet_cosine, not_mine], 1)
        p_sub, p_mean = probability(scores), probability(class_mean_similarity)
        w = WEIGHTS.to(p_sub.device)[None, None, :, None]
        for start in range(0, p_sub.shape[1], 64):  # [Tr, Ts, W, faces] in chunks
            sub = p_sub[None, :, None, start : start + 64]
            mean = p_mean[:, None, None, start : start + 64]
            mix = (1.0 - w) * sub + w * mean
            self.within_nll += -mix.clamp_min(1e-300).log().sum(dim=3).cpu()

    def fit(self) -> MoeParams:
        if self.faces == 0 and self.left_out:
            raise ValueError(
                f"calibration: every validation face ({self.left_out}) embeds with no "
                "direction (NaN, inf or zero) in the stage-1 backbone or in its sub-net: "
                "the networks' weights or inputs are broken"
            )
        if self.faces == 0:
            raise ValueError("calibration saw no validation faces (data.val_fraction is 0?)")
        # router temperatures that fit the router alike (within a millionth of a nat a
        # face) are told apart by the within-cluster mixture, whose class-mean softmax
        # takes the same temperature: with one cluster, or every face routed right, the
        # router NLL is flat (or falls without end as t -> 0), and its first minimum,
        # the coldest temperature, left the class means no weight
        tied = self.router_nll <= self.router_nll.min() + 1e-6 * self.faces
        candidates = tied.nonzero().flatten()
        r = int(candidates[self.within_nll[candidates].flatten(1).amin(1).argmin()])
        within = self.within_nll[r]
        s, w = divmod(int(within.argmin()), within.shape[1])
        return MoeParams(float(TEMPERATURES[r]), float(TEMPERATURES[s]), float(WEIGHTS[w]))


def evidence(
    subnet_cosine: Tensor | None, class_mean_similarity: Tensor, params: MoeParams
) -> Tensor:
    """``[n, m]`` how close a face is to each identity, in cosine units, under ``moe``: the
    sub-net and class-mean cosines weighted as the mixture weights them,
    ``(1 - g) * subnet_cosine + g * class_mean_similarity``.

    This is what an open-set threshold compares, not the posterior: a posterior is
    normalised over the enrolled identities, so a stranger whose nearest identity is far
    still gets p near 1 when every other identity is farther. On the demo's unseen faces
    (docs/DEPLOYMENT.md, one run) FNIR at FPIR 1% was 40.62% with it against 47.00% on
    the log-posterior for routed inference, and 40.62% against 39.50% for the mixture over
    every cluster (then the ISM row)."""
    return fuse(subnet_cosine, class_mean_similarity, params.generalist_weight)


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


SHARED_CHUNK = 1 << 24
"""Elements (a face's column in one candidate cluster's shared members) that
:func:`sum_shared` merges at a time. Its peak is about 73 bytes an element above the
parts (2M elements on CPU, measured 2026-12-06): 1.2 GB a chunk, where a batch of 256
faces at top_m = K over 800K shared columns (2M identities, 20% overlap) would take
15 GB at once (computed)."""


def sum_shared(
    parts: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]], chunk: int = SHARED_CHUNK
) -> None:
    """``route.decision=moe`` with ``clustering.overlap``: an identity that two candidate
    clusters both score gets, in both, the sum of their probabilities, which is what the
    mixture gives it (and what :meth:`Calibration.update_router` counts a face routed
    to either of its clusters as); its similarity and cluster become those of the larger
    of the two terms (the first cluster in ``parts`` on a tie). In place.

    Args:
        parts: one ``(rows, members, score, close, source)`` per candidate cluster, over
            its members that are in another cluster too: the images it scored (indices
            into the batch), those members' global ids, and ``[rows, members]`` their
            scores (log-probabilities), similarities and cluster id.
        chunk: at most this many elements are merged at once (faces are independent:
            the same result, in groups of whole faces).
    """
    parts = [part for part in parts if len(part[0]) and len(part[1])]
    if not parts:
        return
    faces = 1 + max(int(rows.max()) for rows, *_ in parts)
    step = max(1, chunk // sum(len(members) for _, members, *_ in parts))
    if step >= faces:
        _sum_shared(parts)
        return
    for start in range(0, faces, step):
        pieces = []  # (part, its rows among these faces, those rows' copies)
        for i, (rows, members, score, close, source) in enumerate(parts):
            at = ((rows >= start) & (rows < start + step)).nonzero().squeeze(1)
            piece = (rows[at], members, score[at], close[at], source[at])
            pieces += [(i, at, piece)] if len(at) else []
        if pieces:  # (no candidate cluster scored these faces' shared members)
            _sum_shared([piece for *_, piece in pieces])
        for i, at, (_, _, score, close, source) in pieces:
            parts[i][2][at], parts[i][3][at], parts[i][4][at] = score, close, source


def _sum_shared(parts: Sequence[tuple[Tensor, Tensor, Tensor, Tensor, Tensor]]) -> None:
    """:func:`sum_shared` over every face of ``parts`` at once."""
    size = 1 + max(int(members.max()) for _, members, *_ in parts)
    key = torch.cat(
        [(rows[:, None] * size + members[None, :]).flatten() for rows, members, *_ in parts]
    )
    value = torch.cat([score.flatten() for _, _, score, _, _ in parts])
    unique, inverse = torch.unique(key, return_inverse=True)
    top = value.new_full((len(unique),), -math.inf).scatter_reduce(0, inverse, value, "amax")
    shift = top.where(top.isfinite(), torch.zeros_like(top))  # all -inf: the sum is -inf
    total = torch.zeros_like(top).scatter_add(0, inverse, torch.exp(value - shift[inverse]))
    summed = (shift + total.log())[inverse]
    position = torch.arange(len(value), device=value.device)
    largest = value == top[inverse]
    first = torch.full_like(top, len(value), dtype=torch.long)
    first = first.scatter_reduce(0, inverse[largest], position[largest], "amin")[inverse]
    closes = torch.cat([close.flatten() for *_, close, _ in parts])
    sources = torch.cat([source.flatten() for *_, source in parts])
    start = 0
    for _, _, score, close, source in parts:
        end = start + score.numel()
        score.copy_(summed[start:end].view(score.shape))
        close.copy_(closes[first[start:end]].view(score.shape))
        source.copy_(sources[first[start:end]].view(score.shape))
        start = end


def top_columns(score: Tensor, k: int) -> Tensor:
    """Per row, the columns of the ``k`` highest scores, best first, equal scores by
    lower column: ``torch.sort(score, descending=True, stable=True).indices[:, :k]``,
    without sorting every column.

    A cluster of 250K identities (2M, K=8) scored for 64 faces, k=5: 147 ms against
    1.9 s for the whole sort (one thread, measured). ``torch.topk`` picks among columns equal
    to the k-th score in no set order, so the rows where more than k columns reach it
    (or where NaN makes fewer) are sorted whole.
    """
    n = score.shape[1]
    if k == 1:  # argmax returns the first maximum: the lowest column among ties
        return score.argmax(dim=1, keepdim=True)
    if k >= n:
        return torch.sort(score, dim=1, descending=True, stable=True).indices[:, :k]
    values, picked = torch.topk(score, k, dim=1)
    picked = picked.sort(dim=1).values  # in column order: the stable sort keeps it in ties
    local = picked.gather(
        1, torch.sort(score.gather(1, picked), dim=1, descending=True, stable=True).indices
    )
    # topk counts NaN above every number: a row's NaN took a place too
    reach = (score >= values[:, -1:]) | score.isnan()
    unclear = (reach.sum(dim=1) != k).nonzero().squeeze(1)
    if len(unclear):
        local[unclear] = torch.sort(score[unclear], dim=1, descending=True, stable=True).indices[
            :, :k
        ]
    return local


def keep_top(
    best_score: Tensor,
    best_id: Tensor,
    rows: Tensor,
    score: Tensor,
    members: Tensor,
    carried: Sequence[tuple[Tensor, Tensor]] = (),
    empty_id: int | None = None,
) -> None:
    """Merge one cluster's candidates into running per-image top-k lists, in place.

    Args:
        best_score, best_id: ``[B, k]`` running best scores and identities, best
            first (``-inf`` and an id past the last identity where empty).
        rows: the images (indices into B) the cluster scored.
        score: ``[len(rows), n]`` decision scores of the cluster's ``n`` identities.
        members: ``[n]`` their global ids, ascending.
        carried: ``(running [B, k], new [len(rows), n])`` pairs of values kept alongside
            the candidates: their similarities (:func:`evidence`), the cluster that
            scored them. An empty place holds ``-inf`` (floats) or -1.
        empty_id: the id of an empty place. An identity that two clusters score
            (``clustering.overlap``) keeps its better score, and its values from the
            cluster that gave it; its other entry is emptied (None: the lists cannot
            hold an id twice).

    Equal scores rank the lower identity id first, so the answer does not depend on
    the order in which clusters are visited (batched and one-by-one inference agree).
    """
    k = best_score.shape[1]
    local = top_columns(score, k)
    scores = torch.cat([best_score[rows], score.gather(1, local)], dim=1)
    ids = torch.cat([best_id[rows], members[local]], dim=1)
    values = [torch.cat([best[rows], new.gather(1, local)], dim=1) for best, new in carried]

    def reorder(order: Tensor) -> None:
        nonlocal scores, ids
        scores, ids = scores.gather(1, order), ids.gather(1, order)
        values[:] = [v.gather(1, order) for v in values]

    if empty_id is not None:  # equal ids: the better score first, the rest emptied
        reorder(torch.sort(scores, dim=1, descending=True, stable=True).indices)
    reorder(ids.argsort(dim=1, stable=True))
    if empty_id is not None:
        repeat = torch.zeros_like(ids, dtype=torch.bool)
        repeat[:, 1:] = (ids[:, 1:] == ids[:, :-1]) & (ids[:, 1:] != empty_id)
        scores = scores.masked_fill(repeat, -torch.inf)
        ids = ids.masked_fill(repeat, empty_id)
        values = [
            v.masked_fill(repeat, -torch.inf if v.is_floating_point() else -1) for v in values
        ]
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :k]
    best_score[rows] = scores.gather(1, order)
    best_id[rows] = ids.gather(1, order)
    for (best, _), v in zip(carried, values, strict=True):
        best[rows] = v.gather(1, order)
