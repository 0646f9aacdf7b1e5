"""Grouping identities into clusters: the first stage of the two-stage framework.

Ahmadi & Dianat, "A two-stage clustering-based distributed framework for
large-scale face identification", JSDP 21(1), 2024: identities are clustered by
their L2-normalised class-mean embeddings so that each cluster holds *similar*
identities; one sub-network per cluster then learns to tell exactly those apart
(the hard negatives), and at test time a face is routed to the cluster of its
nearest class mean. Their baseline, ISM, splits identities at random.

Clustering uses faiss k-means (Johnson, Douze & Jégou, "Billion-scale similarity
search with GPUs", IEEE Trans. Big Data, 2019) in spherical mode, i.e. cosine
similarity, which is the metric face embeddings are trained for.

Three methods (``METHODS``):

* ``"kmeans"``: spherical k-means; every identity goes to the centroid of
  largest inner product. Empty clusters are repaired (each sub-net needs
  identities).
* ``"balanced"``: k-means centroids, then a capacity-constrained assignment so
  cluster sizes differ by at most one (equal sub-net sizes balance the
  distributed training load; ``overlap``'s extra members come on top, unbalanced);
  see :func:`_balanced_labels`.
* ``"random"``: the ISM baseline, a seeded random near-equal split.

``overlap`` (``clustering.overlap``) then lets the identities nearest a cluster
boundary also join their next nearest cluster (:func:`overlap_rows`), so that a
face the router sends there is still among that sub-net's classes.

:func:`dispersion` measures within-cluster and between-centroid cosine distance,
the quantity the paper's Figure 1 argues about.

Plain torch/numpy/faiss only: no lightning and no other facecluster packages.
The package ``__init__`` imports torch (via ``assignment``) before this module
imports faiss; both ship OpenMP and that order is the one the tests exercise.
"""

from __future__ import annotations

import operator

import faiss
import numpy as np
import torch

from .assignment import ClusterAssignment

__all__ = ["METHODS", "cluster_identities", "dispersion", "overlap_rows"]

METHODS = ("kmeans", "balanced", "random")

# Refinement rounds of the balanced method (recompute centroids, reassign with
# capacities). It usually reaches a fixed point in a few rounds.
_BALANCED_ROUNDS = 10
_SUM_CHUNK = 32_768  # rows per float32 partial sum in _normalised_centroids
_TOP = 8  # preferences sorted up front in _capacitated_assign (the rest on demand)
_MARGIN_CHUNK = 65_536  # identities per block in overlap_rows and dispersion


# --------------------------------------------------------------------- checks
def _check_inputs(
    class_means: torch.Tensor, num_clusters: object, method: object, name: str = "class_means"
) -> tuple[torch.Tensor, int]:
    if method not in METHODS:
        raise ValueError(
            f"method={method!r} is not valid; choose one of {', '.join(map(repr, METHODS))}"
        )
    if not isinstance(class_means, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(class_means).__name__}")
    if class_means.dim() != 2:
        raise ValueError(
            f"{name} must be a 2-D [num_classes, dim] tensor, got shape {tuple(class_means.shape)}"
        )
    if not class_means.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {class_means.dtype}")
    if isinstance(num_clusters, bool):
        raise ValueError(f"num_clusters must be an integer, got {num_clusters!r}")
    try:
        k = operator.index(num_clusters)  # accepts int / numpy ints, refuses 2.5
    except TypeError as exc:
        raise ValueError(f"num_clusters must be an integer, got {num_clusters!r}") from exc
    num_classes = class_means.shape[0]
    if k < 1:
        raise ValueError(f"num_clusters={k} must be >= 1")
    if k > num_classes:
        raise ValueError(
            f"num_clusters={k} but only {num_classes} identities; every cluster needs "
            "at least one identity"
        )
    means = class_means.detach().to("cpu", torch.float32)
    finite = torch.isfinite(means).all(dim=1)
    if not finite.all():
        bad = (~finite).nonzero().flatten()
        raise ValueError(
            f"{name} contains NaN/inf in {bad.numel()} row(s), e.g. identities {bad[:10].tolist()}"
        )
    norms = means.norm(dim=1)
    if (norms == 0).any():
        bad = (norms == 0).nonzero().flatten()
        raise ValueError(
            f"{name} has all-zero rows (no direction), e.g. identities {bad[:10].tolist()}"
        )
    return unit_rows(means), k


def unit_rows(means: torch.Tensor, in_place: bool = False) -> torch.Tensor:
    """``means`` renormalised row by row in float32, as :func:`cluster_identities` keeps
    them: cheap, and it guards against drift (e.g. means stored in fp16); spherical
    k-means and the inner-product routing both assume unit rows. ``in_place``: into
    ``means`` itself when it is a contiguous float32 CPU tensor (the same values; no
    second ``[C, d]`` copy, 4 GB at 2M identities x 512)."""
    means = means.detach().to("cpu", torch.float32)
    norms = means.norm(dim=1).unsqueeze(1)
    if in_place and means.is_contiguous():
        return means.div_(norms)
    return (means / norms).contiguous()


# -------------------------------------------------------------------- helpers
def _faiss_kmeans(x: np.ndarray, k: int, seed: int, niter: int, nredo: int) -> np.ndarray:
    """Spherical faiss k-means; returns ``[k, d]`` unit-norm float32 centroids."""
    km = faiss.Kmeans(
        x.shape[1],
        k,
        niter=niter,
        nredo=nredo,
        spherical=True,
        seed=seed % 2**31,  # a C int in faiss: seeds past 2**31 - 1 raised OverflowError
        verbose=False,
        # faiss warns when there are fewer than 39 points per centroid; with
        # identities (not images) as points, K close to C is legitimate.
        min_points_per_centroid=1,
        # faiss would train on a sample of 256 points per centroid (K=16: 4,096 of
        # 360K class means); every identity is used instead.
        max_points_per_centroid=max(256, -(-x.shape[0] // k)),
    )
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def _nearest_centroid(x: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the max-inner-product centroid for each row of ``x``."""
    index = faiss.IndexFlatIP(centroids.shape[1])
    index.add(centroids)
    _, ids = index.search(x, 1)
    return ids[:, 0].astype(np.int64)


def _normalised_centroids(x: np.ndarray, labels: np.ndarray, k: int) -> tuple[np.ndarray, float]:
    """Normalised mean of member rows per cluster, and the partition's total similarity
    to its own centroids (``sum_i x_i . c(i)`` = ``sum_k ||sum of members of k||``).

    Sums are float64 across chunks of float32 partial sums: converting all of ``x`` to
    float64 (1.5 GB at 360K x 512) took longer than the sums themselves.
    """
    # torch index_add_ rather than np.add.at, which is unbuffered and ~50x slower.
    sums = torch.zeros(k, x.shape[1], dtype=torch.float64)
    rows, ids = torch.from_numpy(x), torch.from_numpy(labels)
    for start in range(0, len(x), _SUM_CHUNK):
        part = torch.zeros(k, x.shape[1], dtype=rows.dtype)
        part.index_add_(0, ids[start : start + _SUM_CHUNK], rows[start : start + _SUM_CHUNK])
        sums += part.double()
    norms = torch.linalg.vector_norm(sums, dim=1, keepdim=True)
    centroids = (sums / norms.clamp(min=1e-12)).float().numpy()
    return centroids, float(norms.sum())


def _fill_empty_clusters(x: np.ndarray, labels: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Repair k-means output so that no cluster is empty.

    While some cluster is empty, the identity farthest from its own centroid
    (lowest inner product), taken from a cluster that keeps at least one member,
    is moved into it and becomes that cluster's centroid. This is the usual
    k-means empty-cluster fix; it can only be needed with near-duplicate means
    or K close to C. Ties go to the lowest identity id, so it is deterministic.
    """
    labels = labels.copy()
    k = centroids.shape[0]
    sizes = np.bincount(labels, minlength=k)
    if (sizes > 0).all():
        return labels
    sims = np.einsum("ij,ij->i", x, centroids[labels]).astype(np.float64)
    for target in np.flatnonzero(sizes == 0):
        # K <= C guarantees a donor with >= 2 members exists while a cluster is empty.
        candidates = np.where(sizes[labels] >= 2, sims, np.inf)
        moved = int(np.argmin(candidates))
        sizes[labels[moved]] -= 1
        labels[moved] = target
        sizes[target] = 1
        sims[moved] = 1.0  # it is now its own cluster's centroid
    return labels


class _Preferences:
    """Each identity's clusters, best first (similarity descending, ties to the lower
    cluster id), as ``np.argsort(-sims, axis=1, kind="stable")`` would give them.

    Only the first ``_TOP`` are sorted for everyone (an argpartition): deferred
    acceptance places nearly every identity within its first few choices. An identity
    that needs more, or whose ``_TOP``-th and next similarities tie, gets its whole row
    sorted when it first needs it.
    """

    def __init__(self, sims: np.ndarray) -> None:
        self.sims = sims
        k = sims.shape[1]
        self.top = min(_TOP, k)
        self.row_index = np.full(len(sims), -1, dtype=np.int64)  # into self.rows
        self.rows = np.empty((0, k), dtype=np.int64)  # whole rows, sorted on demand
        if self.top == k:
            self.first = np.argsort(-sims, axis=1, kind="stable")
            return
        part = np.argpartition(-sims, self.top, axis=1)
        first = part[:, : self.top]
        values = -np.take_along_axis(sims, first, axis=1)
        order = np.lexsort((first, values), axis=1)  # by similarity, then cluster id
        self.first = np.take_along_axis(first, order, axis=1)
        boundary = -sims[np.arange(len(sims)), part[:, self.top]]
        self._sort_rows(np.flatnonzero(values.max(axis=1) >= boundary))  # cut inside a tie

    def _sort_rows(self, items: np.ndarray) -> None:
        new = np.unique(items[self.row_index[items] < 0])
        if new.size:
            self.row_index[new] = len(self.rows) + np.arange(new.size)
            sorted_rows = np.argsort(-self.sims[new], axis=1, kind="stable")
            self.rows = np.concatenate([self.rows, sorted_rows])

    def choice(self, items: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        """Cluster of preference rank ``ranks[j]`` of identity ``items[j]``."""
        out = np.empty(len(items), dtype=np.int64)
        near = (ranks < self.top) & (self.row_index[items] < 0)
        out[near] = self.first[items[near], ranks[near]]
        far = ~near  # beyond the first choices, or a row sorted whole
        if far.any():
            self._sort_rows(items[far])
            out[far] = self.rows[self.row_index[items[far]], ranks[far]]
        return out


def _capacitated_assign(sims: np.ndarray, capacities: np.ndarray) -> np.ndarray:
    """Assign rows to columns maximising similarity greedily under capacities.

    Result equals the greedy over all (identity, centroid) pairs in descending
    similarity that skips assigned identities and full clusters: with a single
    shared score, that greedy matching is the unique stable matching, which
    identity-proposing deferred acceptance (Gale-Shapley) computes. Each round every
    unplaced identity proposes to its best cluster not yet tried, and each cluster
    keeps its ``capacity`` most similar proposers and holders (ties: the lower
    identity id) and rejects the rest. Each identity proposes at most K times, so it
    terminates; ``capacities.sum() == C`` so everyone is placed.

    The first round places nearly everyone; later rounds carry the few rejected
    identities along their rejection chains (68 rounds at 360,232 x 64). A cluster
    keeps its holders sorted: a full cluster rejects outright every proposal below its
    weakest holder; when some proposal beats it, the cluster sorts its holders with
    those proposals again, which costs its size (about C / K) in that round.

    Args:
        sims: ``[C, K]`` similarities.
        capacities: ``[K]`` ints summing to ``C``.

    Returns:
        ``[C]`` int64 cluster ids.
    """
    num_items, k = sims.shape
    assert int(capacities.sum()) == num_items
    prefs = _Preferences(sims)
    next_choice = np.zeros(num_items, dtype=np.int64)
    # each cluster's holders, best first (similarity descending, then identity id)
    held_items = [np.empty(0, dtype=np.int64) for _ in range(k)]
    held_sims = [np.empty(0, dtype=sims.dtype) for _ in range(k)]
    free = np.arange(num_items)
    while free.size:
        proposals = prefs.choice(free, next_choice[free])
        next_choice[free] += 1
        proposal_sims = sims[free, proposals]
        order = np.lexsort((free, -proposal_sims, proposals))  # by cluster, then best first
        items, clusters, item_sims = free[order], proposals[order], proposal_sims[order]
        bounds = np.searchsorted(clusters, np.arange(k + 1))
        rejected = []
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
            new_items = items[bounds[c] : bounds[c + 1]]
            new_sims = item_sims[bounds[c] : bounds[c + 1]]
            capacity = int(capacities[c])
            full = len(held_items[c]) == capacity
            if full and (capacity == 0 or new_sims[0] < held_sims[c][-1]):
                rejected.append(new_items)  # all below the weakest holder
                continue
            both_items = np.concatenate([held_items[c], new_items])
            both_sims = np.concatenate([held_sims[c], new_sims])
            keep = np.lexsort((both_items, -both_sims))
            rejected.append(both_items[keep[capacity:]])
            held_items[c], held_sims[c] = both_items[keep[:capacity]], both_sims[keep[:capacity]]
        free = np.sort(np.concatenate(rejected)) if rejected else free[:0]
    labels = np.empty(num_items, dtype=np.int64)
    for c in range(k):
        labels[held_items[c]] = c
    return labels


def _balanced_labels(x: np.ndarray, k: int, seed: int, niter: int, nredo: int) -> np.ndarray:
    """Near-equal-size clustering: sizes are ``ceil(C/K)`` or ``floor(C/K)``.

    Algorithm:

    1. Spherical k-means (faiss) gives initial centroids.
    2. Capacities: with ``C = qK + r``, every cluster gets ``q`` and the ``r``
       clusters most identities would pick unconstrained (largest "demand",
       ties to the lower id) get ``q + 1``, so capacities sum to ``C``.
    3. Capacitated assignment (:func:`_capacitated_assign`): the greedy over
       (identity, centroid) pairs by descending cosine similarity.
    4. Refinement: recompute centroids as the normalised mean of members and
       repeat 2-3, up to ``_BALANCED_ROUNDS`` times or until the labels stop
       changing. The greedy step is not guaranteed to improve the objective, so
       the partition with the highest total similarity to its own centroids
       (i.e. the lowest within-cluster dispersion) is kept.
    """
    num_items = x.shape[0]
    q, r = divmod(num_items, k)
    centroids = _faiss_kmeans(x, k, seed, niter, nredo)
    best_labels, best_score, previous = None, -np.inf, None
    for _ in range(_BALANCED_ROUNDS):
        sims = x @ centroids.T
        capacities = np.full(k, q, dtype=np.int64)
        if r:
            demand = np.bincount(sims.argmax(axis=1), minlength=k)
            capacities[np.argsort(-demand, kind="stable")[:r]] += 1
        labels = _capacitated_assign(sims, capacities)
        centroids, score = _normalised_centroids(x, labels, k)  # score: similarity to own
        if score > best_score + 1e-9:
            best_labels, best_score = labels, score
        if previous is not None and np.array_equal(labels, previous):
            break
        previous = labels
    return best_labels


def _random_labels(num_items: int, k: int, seed: int) -> torch.Tensor:
    """ISM baseline: seeded permutation dealt round-robin into ``k`` groups."""
    generator = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(num_items, generator=generator)
    labels = torch.empty(num_items, dtype=torch.long)
    labels[perm] = torch.arange(num_items) % k
    return labels


# ------------------------------------------------------------------------ API
def cluster_identities(
    class_means: torch.Tensor,
    num_clusters: int,
    method: str = "kmeans",
    seed: int = 0,
    niter: int = 20,
    nredo: int = 1,
    features: torch.Tensor | None = None,
    overlap: float = 0.0,
) -> ClusterAssignment:
    """Partition identities into ``num_clusters`` clusters by their class means.

    Args:
        class_means: ``[C, d]`` class-mean embeddings (L2-normalised; they are
            renormalised defensively). Any device; the result is on CPU.
        num_clusters: ``K``, the number of clusters/sub-nets, ``1 <= K <= C``.
        method: ``"kmeans"``, ``"balanced"`` or ``"random"`` (see module doc).
        seed: seeds faiss k-means (``kmeans``/``balanced``) or the permutation
            (``random``); the result is deterministic for a given seed.
        niter: k-means iterations (``kmeans``/``balanced``).
        nredo: k-means restarts, the best objective is kept.
        features: ``[C, d']`` what k-means groups instead of the class means (for
            example the stage-1 head's rows, ``clustering.features=head``); the
            assignment keeps the class means, and each centroid is still the mean of
            its members' class means, so routing is unchanged.
        overlap: the fraction of identities that also join their next nearest
            cluster (:func:`overlap_rows`); 0: a partition.

    Returns:
        A :class:`ClusterAssignment` with no empty cluster; centroids are the
        normalised means of the members' class means.

    Raises:
        ValueError: unknown ``clustering.method``, ``clustering.num_clusters``
            < 1 or > C, or ``class_means`` not 2-D / containing NaN or inf.
    """
    means, k = _check_inputs(class_means, num_clusters, method)
    grouped = means
    if features is not None:
        grouped, _ = _check_inputs(features, k, method, "features")
        if grouped.shape[0] != means.shape[0]:
            raise ValueError(
                f"features has {grouped.shape[0]} rows but class_means has {means.shape[0]} "
                "(one per identity)"
            )
    if int(niter) < 1 or int(nredo) < 1:
        raise ValueError(f"niter and nredo must be >= 1, got niter={niter}, nredo={nredo}")
    if not 0.0 <= overlap <= 1.0:
        raise ValueError(f"overlap must be a fraction of the identities in [0, 1], got {overlap}")
    num_items = means.shape[0]

    if method == "random":
        labels = _random_labels(num_items, k, seed)
    elif k == 1:
        labels = torch.zeros(num_items, dtype=torch.long)  # nothing to cluster
    else:
        x = grouped.numpy()
        if method == "kmeans":
            centroids = _faiss_kmeans(x, k, int(seed), int(niter), int(nredo))
            labels_np = _fill_empty_clusters(x, _nearest_centroid(x, centroids), centroids)
        else:
            labels_np = _balanced_labels(x, k, int(seed), int(niter), int(nredo))
        labels = torch.from_numpy(labels_np)
    assignment = ClusterAssignment.from_labels(labels, means, method, num_clusters=k)
    if overlap > 0.0:
        assignment = assignment.with_overlap(overlap_rows(assignment, overlap))
    return assignment


def overlap_rows(assignment: ClusterAssignment, fraction: float) -> torch.Tensor:
    """The extra memberships of ``clustering.overlap``: ``[M, 2]`` rows (identity, cluster).

    An identity's margin is the cosine of its class mean to its own centroid minus
    that to the nearest other centroid; the ``round(fraction * C)`` (Python's
    rounding, half to even) identities of
    smallest margin (the nearest a boundary, ties to the lower id) also join that
    other cluster. These are the identities whose faces the router most often sends
    to the wrong cluster. O(C K d) in blocks of identities, like the k-means
    assignment itself, so it stays cheap at millions of identities.
    """
    count = round(fraction * assignment.num_classes)
    k = assignment.num_clusters
    if count == 0 or k == 1:
        return torch.zeros(0, 2, dtype=torch.long)
    means, centroids = assignment.class_means.cpu(), assignment.centroids.cpu()
    own = assignment.class_to_cluster.cpu()
    margins, others = [], []
    for start in range(0, len(means), _MARGIN_CHUNK):
        sims = means[start : start + _MARGIN_CHUNK] @ centroids.T
        rows = torch.arange(len(sims))
        mine = sims[rows, own[start : start + _MARGIN_CHUNK]]
        sims[rows, own[start : start + _MARGIN_CHUNK]] = -torch.inf
        best, other = sims.max(dim=1)
        margins.append(mine - best)
        others.append(other)
    margin, other = torch.cat(margins), torch.cat(others)
    chosen = torch.sort(torch.argsort(margin, stable=True)[:count]).values
    return torch.stack([chosen, other[chosen]], dim=1)


def dispersion(assignment: ClusterAssignment) -> dict[str, float]:
    """Within-cluster vs between-cluster spread (the paper's Figure 1 idea).

    Clustering by similarity should give tight clusters (low ``within``) of
    similar, hard-to-separate identities, which a random split does not.

    Args:
        assignment: the partition to measure.

    Returns:
        Floats: ``within`` = mean over identities of ``1 - cos(class mean,
        own centroid)``; ``between`` = mean of ``1 - cos`` over pairs of
        distinct centroids (``0.0`` when K == 1); ``ratio`` = within / between
        (``inf`` when between is 0 and within is not, ``0.0`` when both are);
        ``size_min``, ``size_max``, ``size_mean`` = identities per cluster.
    """
    means = assignment.class_means.detach().cpu()
    centroids = assignment.centroids.detach().double().cpu()
    labels = assignment.class_to_cluster.cpu()
    # in blocks of identities: no float64 copy of all C means (16 GB at 2M x 512 x 2)
    cosines = torch.cat([
        (means[s : s + _MARGIN_CHUNK].double() * centroids[labels[s : s + _MARGIN_CHUNK]]).sum(1)
        for s in range(0, len(means), _MARGIN_CHUNK)
    ])  # fmt: skip
    within = float((1.0 - cosines).mean())
    k = centroids.shape[0]
    if k > 1:
        gram = centroids @ centroids.T
        off_diagonal = ~torch.eye(k, dtype=torch.bool)
        between = float((1.0 - gram[off_diagonal]).mean())
    else:
        between = 0.0
    if between > 0.0:
        ratio = within / between
    else:
        ratio = float("inf") if within > 0.0 else 0.0
    sizes = assignment.cluster_sizes().double()
    return {
        "within": within,
        "between": between,
        "ratio": ratio,
        "size_min": float(sizes.min()),
        "size_max": float(sizes.max()),
        "size_mean": float(sizes.mean()),
    }
