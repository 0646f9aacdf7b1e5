"""The identity-to-cluster partition that drives the two-stage framework.

Ahmadi & Dianat, "A two-stage clustering-based distributed framework for
large-scale face identification", JSDP 21(1), 2024: identities are grouped into
``K`` clusters, one sub-network is trained per cluster, and at test time a face
is routed to the cluster that owns the identity whose class-mean embedding is
nearest to it. :class:`ClusterAssignment` is the single object that every stage
shares: which cluster owns each identity, the identity's index inside that
cluster's sub-net classifier, the class means used for routing and the cluster
centroids. It is persisted with an atomic :meth:`ClusterAssignment.save` so a
crash mid-write never leaves a truncated file for later stages to trip on.

Plain torch only: this module must not import lightning or other facecluster
packages, so it can be used from data loaders, scripts and workers alike.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import torch

from facecluster.io import atomic_torch_save, load_plain

__all__ = ["ASSIGNMENT_FORMAT", "ASSIGNMENT_VERSION", "ClusterAssignment"]

ASSIGNMENT_FORMAT = "facecluster.cluster_assignment"
ASSIGNMENT_VERSION = 2
"""Version 2 added ``overlap``; version 1 files (no overlap) are still read."""

# Class means and centroids are stored L2-normalised; routing by inner product
# silently degrades if they are not, so construction checks it. The tolerance
# admits float32 rounding and means that went through fp16/bf16 storage.
_NORM_TOL = 1e-2

_TENSOR_KEYS = ("class_to_cluster", "local_index", "class_means", "centroids", "overlap")


def _no_overlap() -> torch.Tensor:
    return torch.zeros(0, 2, dtype=torch.long)


def _memberships(class_to_cluster: torch.Tensor, overlap: torch.Tensor) -> torch.Tensor:
    """Every (identity, cluster) membership, ``[C + M, 2]``: each identity's own cluster,
    then the ``overlap`` rows."""
    own = torch.stack([torch.arange(class_to_cluster.numel()), class_to_cluster.cpu()], dim=1)
    return torch.cat([own, overlap.cpu()])


def _local_index(
    class_to_cluster: torch.Tensor, num_clusters: int, overlap: torch.Tensor | None = None
) -> torch.Tensor:
    """Rank of each identity among the members of its cluster, by global id.

    A cluster's members are the identities it owns and those that ``overlap`` adds to
    it. Vectorised: sorting the memberships by ``cluster * C + identity`` lists each
    cluster's members in increasing global id, so a membership's local index is its
    position in that order minus the position where its cluster's block starts.

    Args:
        class_to_cluster: ``[C]`` long tensor of cluster ids in ``[0, K)``.
        num_clusters: ``K``.
        overlap: ``[M, 2]`` extra (identity, cluster) memberships (None: none).

    Returns:
        ``[C]`` long tensor, each identity's index in its own cluster; within
        cluster ``k`` its members in increasing global id get ``0 .. size_k - 1``.
    """
    num_classes = class_to_cluster.numel()
    pairs = _memberships(class_to_cluster, _no_overlap() if overlap is None else overlap)
    key = pairs[:, 1] * num_classes + pairs[:, 0]
    order = torch.argsort(key)
    sizes = torch.bincount(pairs[:, 1], minlength=num_clusters)
    starts = torch.cumsum(sizes, 0) - sizes
    local = torch.empty(len(pairs), dtype=torch.long)
    local[order] = torch.arange(len(pairs)) - starts[pairs[order, 1]]
    return local[:num_classes].to(class_to_cluster.device)


def _as_tensor(value: Any, name: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value.detach()
    try:
        return torch.as_tensor(value)
    except Exception as exc:  # lists of mixed types, None, ...
        raise ValueError(f"ClusterAssignment.{name} must be a tensor, got {type(value)!r}") from exc


_ROWS = 65_536
"""Rows per block of the checks and sums over all C class means: no float64 or bool
copy of the whole [C, d] matrix (at 2M x 512: 7.6 and 1 GiB, in every process)."""


def _check_unit_rows(t: torch.Tensor, name: str) -> None:
    # One float32 norm a row, block by block: a row holding NaN or inf has a non-finite
    # norm, so no separate finiteness pass (a bool copy reduced row by row) and no float64
    # copy of each block: 0.7 s at 2M x 512 where those took 16 s (two threads, measured),
    # in every process that builds an assignment. A finite row too large for float32's
    # norm is not unit either.
    norms = torch.cat([torch.linalg.vector_norm(b, dim=1) for b in t.split(_ROWS)])
    broken = (~torch.isfinite(norms)).nonzero().flatten()  # NaN/inf, or past float32
    nan = [b[~torch.isfinite(t[b]).all(dim=1)] for b in broken.split(_ROWS)]
    nan = torch.cat(nan) if nan else broken
    if nan.numel():
        raise ValueError(
            f"ClusterAssignment.{name} contains NaN/inf values (rows {nan[:10].tolist()})"
        )
    off = (~((norms - 1.0).abs() <= _NORM_TOL)).nonzero().flatten()
    if off.numel():
        rows = off[:10].tolist()
        shown = [round(float(torch.linalg.vector_norm(t[i].double())), 4) for i in rows]
        raise ValueError(
            f"ClusterAssignment.{name} must be L2-normalised row-wise; {off.numel()} row(s) are "
            f"not (e.g. rows {rows} with norms {shown})"
        )


@dataclass(eq=False, repr=False)
class ClusterAssignment:
    """Partition of ``C`` identities into ``K`` clusters (one sub-net each).

    Attributes:
        class_to_cluster: ``[C]`` long, the cluster id of each identity.
        local_index: ``[C]`` long, the index of each identity inside its own
            cluster: within cluster ``k`` its members (with ``overlap``'s) in
            increasing global id get ``0 .. size_k - 1``. This is the label a
            sub-net classifier is trained on, and ``classes_of(k)[local_index[c]] == c``.
        class_means: ``[C, d]`` float32, L2-normalised class-mean embeddings
            (used at test time to route a face to the cluster of its nearest
            class mean).
        centroids: ``[K, d]`` float32, L2-normalised cluster centroids.
        method: how the partition was made: ``"kmeans"``, ``"balanced"`` or
            ``"random"`` (the ISM baseline).
        overlap: ``[M, 2]`` long, extra memberships ``(identity, cluster)``
            (``clustering.overlap``): the identity also belongs to that cluster,
            which is not its own; its sub-net classifies it too. Rows sorted by
            cluster, then identity; empty by default. A cluster's members
            (:meth:`classes_of`) are the identities it owns and those it gains
            here, in increasing global id; ``local_index`` counts them all.

    Construction validates shapes, dtypes, ranges and consistency and raises
    :class:`ValueError` with a message saying what is wrong. Every cluster
    must own at least one identity, because each cluster gets a sub-net with a
    classifier over its identities. Integer tensors are converted to long and
    floating tensors to float32; devices are left as given but must agree.
    """

    class_to_cluster: torch.Tensor
    local_index: torch.Tensor
    class_means: torch.Tensor
    centroids: torch.Tensor
    method: str
    overlap: torch.Tensor = field(default_factory=_no_overlap)

    def __post_init__(self) -> None:
        c2c = _as_tensor(self.class_to_cluster, "class_to_cluster")
        local = _as_tensor(self.local_index, "local_index")
        means = _as_tensor(self.class_means, "class_means")
        cents = _as_tensor(self.centroids, "centroids")
        overlap = _as_tensor(self.overlap, "overlap")

        if not isinstance(self.method, str) or not self.method:
            raise ValueError(
                f"ClusterAssignment.method must be a non-empty string, got {self.method!r}"
            )

        for name, t in (("class_to_cluster", c2c), ("local_index", local)):
            if t.dim() != 1:
                raise ValueError(
                    f"ClusterAssignment.{name} must be 1-D [C], got shape {tuple(t.shape)}"
                )
            if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
                raise ValueError(
                    f"ClusterAssignment.{name} must be an integer tensor, got {t.dtype}"
                )
        for name, t, what in (("class_means", means, "[C, d]"), ("centroids", cents, "[K, d]")):
            if t.dim() != 2:
                raise ValueError(
                    f"ClusterAssignment.{name} must be 2-D {what}, got shape {tuple(t.shape)}"
                )
            if not t.is_floating_point():
                raise ValueError(
                    f"ClusterAssignment.{name} must be a floating tensor, got {t.dtype}"
                )

        if overlap.numel() == 0:
            overlap = _no_overlap()
        integer = not (overlap.is_floating_point() or overlap.is_complex())
        if (
            overlap.dim() != 2
            or overlap.shape[1] != 2
            or not integer
            or overlap.dtype == torch.bool
        ):
            raise ValueError(
                "ClusterAssignment.overlap must be an integer [M, 2] tensor of (identity, "
                f"cluster) rows, got {overlap.dtype} {tuple(overlap.shape)}"
            )
        devices = {t.device for t in (c2c, local, means, cents)}
        if len(devices) > 1:
            raise ValueError(
                f"ClusterAssignment tensors must be on one device, got {sorted(map(str, devices))}"
            )

        c2c, local = c2c.long(), local.long()
        means, cents = means.float(), cents.float()
        num_classes, dim = means.shape
        num_clusters = cents.shape[0]
        if num_classes < 1 or num_clusters < 1 or dim < 1:
            raise ValueError(
                f"ClusterAssignment needs at least one identity, one cluster and one embedding "
                f"dim; got "
                f"class_means {tuple(means.shape)}, centroids {tuple(cents.shape)}"
            )
        if cents.shape[1] != dim:
            raise ValueError(
                f"ClusterAssignment.centroids has dim {cents.shape[1]} "
                f"but class_means has dim {dim}"
            )
        for name, t in (("class_to_cluster", c2c), ("local_index", local)):
            if t.numel() != num_classes:
                raise ValueError(
                    f"ClusterAssignment.{name} has {t.numel()} entries but class_means has "
                    f"{num_classes} rows (one per identity)"
                )
        lo, hi = int(c2c.min()), int(c2c.max())
        if lo < 0 or hi >= num_clusters:
            raise ValueError(
                f"ClusterAssignment.class_to_cluster values must be in [0, {num_clusters}) "
                f"(K = centroids.shape[0]), got range [{lo}, {hi}]"
            )
        sizes = torch.bincount(c2c, minlength=num_clusters)
        empty = (sizes == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"ClusterAssignment has {empty.numel()} empty cluster(s) {empty[:10].tolist()}; "
                "every cluster needs at least one identity for its sub-net"
            )
        overlap = overlap.long().cpu()
        if len(overlap):
            self._check_overlap(overlap, c2c, num_classes, num_clusters)
        expected = _local_index(c2c, num_clusters, overlap)
        if not torch.equal(local, expected):
            bad = (local != expected).nonzero().flatten()[:10].tolist()
            raise ValueError(
                "ClusterAssignment.local_index is inconsistent with class_to_cluster: within each "
                "cluster, its members (overlap's too) in increasing global id get 0..size-1 "
                f"(first mismatching identities: {bad}); use ClusterAssignment.from_labels"
            )
        _check_unit_rows(means, "class_means")
        _check_unit_rows(cents, "centroids")

        self.class_to_cluster, self.local_index = c2c, local
        self.class_means, self.centroids = means, cents
        self.overlap = overlap

    @staticmethod
    def _check_overlap(
        overlap: torch.Tensor, c2c: torch.Tensor, num_classes: int, num_clusters: int
    ) -> None:
        ids, clusters = overlap[:, 0], overlap[:, 1]
        if int(ids.min()) < 0 or int(ids.max()) >= num_classes:
            raise ValueError(
                f"ClusterAssignment.overlap identities must be in [0, {num_classes}), got "
                f"range [{int(ids.min())}, {int(ids.max())}]"
            )
        if int(clusters.min()) < 0 or int(clusters.max()) >= num_clusters:
            raise ValueError(
                f"ClusterAssignment.overlap clusters must be in [0, {num_clusters}), got "
                f"range [{int(clusters.min())}, {int(clusters.max())}]"
            )
        own = (c2c.cpu()[ids] == clusters).nonzero().flatten()
        if own.numel():
            raise ValueError(
                "ClusterAssignment.overlap adds identities to their own cluster (rows "
                f"{own[:10].tolist()}); an overlap row names another cluster"
            )
        key = clusters * num_classes + ids
        if not bool((key[1:] > key[:-1]).all()):
            raise ValueError(
                "ClusterAssignment.overlap rows must be sorted by cluster, then identity, "
                "without repeats"
            )

    # ------------------------------------------------------------------ shape
    @property
    def num_clusters(self) -> int:
        """``K``, the number of clusters (= sub-nets)."""
        return int(self.centroids.shape[0])

    @property
    def num_classes(self) -> int:
        """``C``, the number of identities."""
        return int(self.class_means.shape[0])

    @property
    def embedding_dim(self) -> int:
        """``d``, the embedding dimension of class means and centroids."""
        return int(self.class_means.shape[1])

    def cluster_sizes(self) -> torch.Tensor:
        """Number of identities per cluster (its sub-net's classes: the identities it
        owns and those ``overlap`` adds).

        Returns:
            ``[K]`` long tensor.
        """
        return torch.bincount(
            _memberships(self.class_to_cluster, self.overlap)[:, 1], minlength=self.num_clusters
        ).to(self.class_to_cluster.device)

    def neighbours(self, k: int) -> torch.Tensor:
        """The identities that are not members of cluster ``k``, nearest its centroid
        first (cosine of their class means; ties to the lower id): whose images teach
        sub-net ``k`` what is not its own (``stage2.negatives``)."""
        members = self.classes_of(k).cpu()
        # every identity's cosine (no copy of the C x d means), the members' set to -inf:
        # they sort last, and the stable sort keeps the lower id first among ties
        cosine = self.class_means.cpu() @ self.centroids.cpu()[k]
        cosine[members] = -torch.inf
        order = torch.argsort(cosine, descending=True, stable=True)
        return order[: self.num_classes - len(members)]

    def memberships(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Every (identity, cluster) membership as two ``[C + M]`` tensors: each identity
        with its own cluster, then ``overlap``'s rows."""
        pairs = _memberships(self.class_to_cluster, self.overlap)
        return pairs[:, 0], pairs[:, 1]

    def contains(self, ids: torch.Tensor, clusters: torch.Tensor) -> torch.Tensor:
        """Whether cluster ``clusters[i]`` has identity ``ids[i]`` among its members (owns
        it, or gains it by ``overlap``); shapes broadcast. Routing is right when it is."""
        ids, clusters = torch.broadcast_tensors(ids, clusters.to(ids.device))
        mine = self.class_to_cluster.to(ids.device)[ids] == clusters
        if not len(self.overlap):
            return mine
        # a binary search of the keys, sorted once: torch.isin sorted them at every call
        # (per batch of every routed pass): 21 ms a batch of 256 at 400K overlap rows of
        # 2M identities against 0.02 ms, one thread on this machine (2026-12-06)
        keys = self._overlap_keys.to(ids.device)
        query = clusters * self.num_classes + ids
        return mine | (keys[torch.searchsorted(keys, query).clamp(max=len(keys) - 1)] == query)

    @cached_property
    def _overlap_keys(self) -> torch.Tensor:
        """``overlap``'s rows as sorted keys ``cluster * C + identity``, for :meth:`contains`."""
        return torch.sort(self.overlap[:, 1] * self.num_classes + self.overlap[:, 0]).values

    def extended(self, class_means: torch.Tensor, clusters: torch.Tensor) -> ClusterAssignment:
        """This assignment with new identities appended (ids ``C, C+1, ...``): their
        L2-normalised class means ``[n, d]`` and clusters ``[n]`` (enrolment). The
        centroids stay; every existing identity keeps its cluster and local index,
        and a new one's local index is the next in its cluster."""
        c2c = torch.cat([self.class_to_cluster.cpu(), clusters.long().cpu()])
        return ClusterAssignment(
            class_to_cluster=c2c,
            local_index=_local_index(c2c, self.num_clusters, self.overlap),
            class_means=torch.cat([self.class_means.cpu(), class_means.float().cpu()]),
            centroids=self.centroids.cpu(),
            method=self.method,
            overlap=self.overlap,
        )

    def with_overlap(self, overlap: torch.Tensor) -> ClusterAssignment:
        """This partition with the extra memberships ``overlap`` (``[M, 2]`` rows of
        identity and another cluster, any order; they replace any there were)."""
        rows = torch.as_tensor(overlap, dtype=torch.long).reshape(-1, 2).cpu()
        rows = rows[torch.argsort(rows[:, 1] * self.num_classes + rows[:, 0])]
        c2c = self.class_to_cluster.cpu()
        if len(rows):  # before the local indices, which assume valid rows
            self._check_overlap(rows, c2c, self.num_classes, self.num_clusters)
        return ClusterAssignment(
            class_to_cluster=c2c,
            local_index=_local_index(c2c, self.num_clusters, rows),
            class_means=self.class_means.cpu(),
            centroids=self.centroids.cpu(),
            method=self.method,
            overlap=rows,
        )

    def classes_of(self, k: int) -> torch.Tensor:
        """Global identity ids owned by cluster ``k``, in increasing order.

        Args:
            k: cluster id in ``[0, K)``.

        Returns:
            ``[size_k]`` long tensor with ``classes_of(k)[local_index[c]] == c``
            for every identity ``c`` of cluster ``k``.

        Raises:
            ValueError: if ``k`` is out of range.
        """
        k = int(k)
        if not 0 <= k < self.num_clusters:
            raise ValueError(f"cluster id {k} out of range [0, {self.num_clusters})")
        # nonzero() returns indices in increasing order, which is the local order.
        owned = (self.class_to_cluster == k).nonzero().flatten()
        if not len(self.overlap):
            return owned
        gained = self.overlap[self.overlap[:, 1] == k, 0].to(owned.device)
        return torch.cat([owned, gained]).sort().values

    def all_members(self) -> list[torch.Tensor]:
        """``[classes_of(k) for k in range(K)]``, from one sort of every membership: K
        scans of the C identities took 1.43 s at 2M identities, K=64, one sort 0.19 s (as a
        review measured them)."""
        ids, clusters = self.memberships()
        order = torch.sort(clusters * self.num_classes + ids).indices
        sizes = torch.bincount(clusters, minlength=self.num_clusters).tolist()
        return [part.clone() for part in ids[order].split(sizes)]

    # ----------------------------------------------------------- construction
    @classmethod
    def from_labels(
        cls,
        class_to_cluster: torch.Tensor,
        class_means: torch.Tensor,
        method: str,
        num_clusters: int | None = None,
    ) -> ClusterAssignment:
        """Build an assignment from cluster labels, deriving the rest.

        ``local_index`` follows the increasing-global-id rule and each centroid
        is the L2-normalised mean of its members' class means (so routing works
        for any partition, including the random ISM baseline).

        Args:
            class_to_cluster: ``[C]`` integer cluster ids.
            class_means: ``[C, d]`` L2-normalised class means.
            method: ``"kmeans"``, ``"balanced"`` or ``"random"``.
            num_clusters: ``K``; defaults to ``max(class_to_cluster) + 1``.
                Pass it explicitly so that a missing last cluster is reported
                as empty rather than silently dropped.

        Returns:
            A validated :class:`ClusterAssignment`.

        Raises:
            ValueError: on bad shapes, out-of-range labels or empty clusters.
        """
        c2c = _as_tensor(class_to_cluster, "class_to_cluster")
        means = _as_tensor(class_means, "class_means")
        if c2c.dim() != 1 or c2c.is_floating_point() or c2c.dtype == torch.bool:
            raise ValueError(
                f"class_to_cluster must be a 1-D integer tensor, got {c2c.dtype} {tuple(c2c.shape)}"
            )
        if means.dim() != 2 or not means.is_floating_point():
            raise ValueError(
                f"class_means must be a 2-D floating [C, d] tensor, "
                f"got {means.dtype} {tuple(means.shape)}"
            )
        if c2c.numel() != means.shape[0] or c2c.numel() == 0:
            raise ValueError(
                f"class_to_cluster has {c2c.numel()} entries "
                f"but class_means has {means.shape[0]} rows"
            )
        c2c = c2c.long().to(means.device)
        if int(c2c.min()) < 0:
            raise ValueError(f"class_to_cluster has negative cluster ids (min {int(c2c.min())})")
        k = int(c2c.max()) + 1 if num_clusters is None else int(num_clusters)
        if k < 1 or int(c2c.max()) >= k:
            raise ValueError(
                f"class_to_cluster values must be in [0, {k}), got max {int(c2c.max())}"
            )
        sizes = torch.bincount(c2c, minlength=k)
        empty = (sizes == 0).nonzero().flatten()
        if empty.numel():
            raise ValueError(
                f"{empty.numel()} of {k} clusters are empty {empty[:10].tolist()}; every cluster "
                "needs at least one identity"
            )
        # Sum in float64 so large clusters do not lose precision, a block of rows at a
        # time; then normalise.
        sums = torch.zeros(k, means.shape[1], dtype=torch.float64, device=means.device)
        for s in range(0, len(means), _ROWS):
            sums.index_add_(0, c2c[s : s + _ROWS], means[s : s + _ROWS].double())
        flat = (sums.norm(dim=1) < 1e-12).nonzero().flatten()
        if flat.numel():  # else "centroids must be L2-normalised", blaming the input
            raise ValueError(
                f"the class means of cluster(s) {flat[:10].tolist()} add up to zero (opposite "
                "means): such a cluster has no direction to route by"
            )
        centroids = torch.nn.functional.normalize(sums, dim=1).float()
        return cls(
            class_to_cluster=c2c,
            local_index=_local_index(c2c, k),
            class_means=means.float(),
            centroids=centroids,
            method=method,
        )

    # ---------------------------------------------------------- persistence
    def to_dict(self) -> dict[str, Any]:
        """Plain-data form (CPU tensors, str, int) that ``torch.load(weights_only=True)`` reads."""
        plain = {
            "format": ASSIGNMENT_FORMAT,
            "version": ASSIGNMENT_VERSION,
            "method": self.method,
            "class_to_cluster": self.class_to_cluster.detach().cpu(),
            "local_index": self.local_index.detach().cpu(),
            "class_means": self.class_means.detach().cpu(),
            "centroids": self.centroids.detach().cpu(),
            "overlap": self.overlap.detach().cpu(),
        }
        if not len(self.overlap):  # a partition: the version-1 form, which older code reads
            plain["version"] = 1
            del plain["overlap"]
        return plain

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ClusterAssignment:
        """Inverse of :meth:`to_dict`.

        Raises:
            ValueError: if ``d`` lacks the format marker, has an unsupported
                version, misses a field, or fails validation.
        """
        if not isinstance(d, Mapping):
            raise ValueError(
                f"not a facecluster cluster assignment: expected a dict, got {type(d).__name__}"
            )
        if d.get("format") != ASSIGNMENT_FORMAT:
            raise ValueError(
                f"not a facecluster cluster assignment: format marker is {d.get('format')!r}, "
                f"expected {ASSIGNMENT_FORMAT!r}"
            )
        if d.get("version") not in (1, ASSIGNMENT_VERSION):
            raise ValueError(
                f"unsupported cluster assignment version {d.get('version')!r} "
                f"(this code reads versions 1 to {ASSIGNMENT_VERSION})"
            )
        keys = [*_TENSOR_KEYS, "method"]
        if d.get("version") == 1:  # before overlap
            keys.remove("overlap")
        missing = [key for key in keys if key not in d]
        if missing:
            raise ValueError(f"cluster assignment is missing field(s) {missing}")
        return cls(**{key: d[key] for key in keys})

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the assignment with ``torch.save``, atomically.

        The data goes to a temporary file in the destination folder, is
        fsync'ed, then ``os.replace``'d over ``path``: readers (other ranks,
        later stages) see either the old file or the complete new one, never a
        truncated one. Parent folders are created. Call it from one rank only.

        Args:
            path: destination file.
        """
        atomic_torch_save(self.to_dict(), path)

    @classmethod
    def load(
        cls, path: str | os.PathLike[str], num_clusters: int | None = None
    ) -> ClusterAssignment:
        """Read an assignment written by :meth:`save` (tensors land on CPU).

        The file is memory-mapped, not read: the ``[C, d]`` class means (4 GB at 2M
        identities x 512) are then pages of the file in the page cache, which every
        process of a node that loads it shares, instead of a private copy in each (a
        write to a loaded tensor copies its page, and leaves the file as it was).

        Args:
            path: file to read.
            num_clusters: the run's ``clustering.num_clusters``, which the file must
                hold (a ``config.yaml`` edited by hand changed nothing, silently).

        Raises:
            FileNotFoundError: if ``path`` does not exist (message names it).
            ValueError: if the file is not a facecluster cluster assignment
                (unreadable, wrong format marker, invalid content), or holds another
                number of clusters; the message names ``path``.
        """
        path = os.fspath(path)
        # plain data only: a file from elsewhere cannot run code (UnsafeFileError)
        data = load_plain(path, what="cluster assignment", mmap=True)
        try:
            assignment = cls.from_dict(data)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from exc
        if num_clusters is not None and assignment.num_clusters != num_clusters:
            raise ValueError(
                f"{path} holds {assignment.num_clusters} clusters, but the run's "
                f"clustering.num_clusters is {num_clusters}: its config.yaml was edited? "
                "A run keeps the clustering it trained on; a new number of clusters is a "
                "new run"
            )
        return assignment

    # ------------------------------------------------------------- dunders
    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ClusterAssignment):
            return NotImplemented
        return self.method == other.method and all(
            torch.equal(getattr(self, key).cpu(), getattr(other, key).cpu()) for key in _TENSOR_KEYS
        )

    __hash__ = None  # type: ignore[assignment]  # mutable tensors: not hashable

    def __repr__(self) -> str:
        sizes = self.cluster_sizes()
        return (
            f"ClusterAssignment(method={self.method!r}, num_classes={self.num_classes}, "
            f"num_clusters={self.num_clusters}, embedding_dim={self.embedding_dim}, "
            f"cluster_sizes=[{int(sizes.min())}..{int(sizes.max())}], "
            f"overlap={len(self.overlap)})"
        )
