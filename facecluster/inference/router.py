"""The router: which clusters' sub-nets should look at a face.

Ahmadi & Dianat (JSDP 2024): the clustering unit groups identities by their
class-mean embeddings, so a test face's cluster can be found by comparing its
stage-1 embedding with the class means. The router ranks each cluster by the
similarity of its best class mean: over all of them (``flat``, exact), or among the
neighbours an approximate faiss index retrieves (Johnson et al., "Billion-scale
similarity search with GPUs", 2019); the ``top_m`` best clusters are the candidates.
Routing works for any partition, random ones included (then it is no better than luck
at picking the cluster, which is the point of comparing them).

Index types: ``flat`` (exact: every class mean, the default; a matrix product per
cluster over the class means stored cluster by cluster, no faiss), ``clusters`` (inverted
lists that are the clustering's own clusters: the K centroids are the coarse
quantizer and each class mean sits in its cluster's list, so nothing is trained
again and a probe visits whole clusters; for hundreds of thousands of identities),
``ivf`` (faiss's own k-means lists) and ``hnsw`` (graph); IVF lists hold float32
vectors or 8-bit codes (``ivf_codes``). With faiss-gpu installed and a CUDA device
present, ivf-type indexes move to the GPU.
"""

from __future__ import annotations

import contextlib
import math

import faiss
import numpy as np
import torch
from torch import Tensor

_BLOCK = 1 << 24
"""Similarities the flat router computes at once (64 MB of float32)."""
NO_CLUSTER = -1
""":meth:`Router.route`'s cluster for a query that has no direction (:func:`has_direction`)."""


def has_direction(x: Tensor) -> Tensor:
    """``[B]`` whether each row of ``x`` ``[B, d]`` is an embedding with a direction:
    finite and not zero. ``F.normalize`` makes the others NaN (NaN or inf in them) or
    (near) zero vectors, whose similarities to every class mean are NaN or 0 alike:
    ranked, they went to cluster 0, whose best identity was then the answer. Normalised,
    a direction has length 1 (an already normalised ``x`` is tested alike)."""
    unit = torch.nn.functional.normalize(x.detach().float(), dim=1)
    return torch.linalg.vector_norm(unit, dim=1) > 0.5  # NaN: False


def _to_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


def _ivf(quantizer: faiss.Index, nlist: int, codes: str) -> faiss.IndexIVF:
    """An empty inner-product IVF over ``quantizer``: float32 vectors, or 8-bit scalar
    codes of the vectors themselves (not residuals), a quarter of the bytes to scan."""
    d = quantizer.d
    if codes == "flat":
        return faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
    if codes == "sq8":
        qtype = faiss.ScalarQuantizer.QT_8bit
        return faiss.IndexIVFScalarQuantizer(
            quantizer, d, nlist, qtype, faiss.METRIC_INNER_PRODUCT, False
        )
    raise ValueError(f"ivf_codes={codes!r} is not one of flat, sq8")


def cluster_lists_index(
    vectors: Tensor,
    lists: Tensor,
    centroids: Tensor,
    nprobe: int,
    lists_per_cluster: int = 1,
    codes: str = "flat",
) -> faiss.IndexIVF:
    """An inner-product IVF index whose inverted lists nest inside given clusters.

    Row i of ``vectors`` belongs to cluster ``lists[i]``, whose centroid is row
    ``lists[i]`` of ``centroids``. With ``lists_per_cluster`` 1 each cluster is one list
    and a query scans the ``nprobe`` nearest clusters. With more, each cluster is split
    by a spherical k-means over its own members (seeded by the cluster id) into that
    many lists: an IVF of K x lists_per_cluster lists whose training costs one small
    k-means per cluster instead of one over all C rows.
    """
    data, cents = _to_numpy(vectors), _to_numpy(centroids)
    d, k = data.shape[1], cents.shape[0]
    labels = lists.cpu().numpy().astype(np.int64)
    sub_centroids, assignment = [], np.empty(len(data), dtype=np.int64)
    for c in range(k):
        members = np.flatnonzero(labels == c)
        parts = min(lists_per_cluster, len(members))
        if parts <= 1:
            sub_centroids.append(cents[c : c + 1])
            assignment[members] = len(sub_centroids) - 1
            continue
        km = faiss.Kmeans(
            d, parts, niter=10, spherical=True, seed=c, max_points_per_centroid=len(members)
        )
        km.train(data[members])
        _, nearest = km.index.search(data[members], 1)
        assignment[members] = sum(len(x) for x in sub_centroids) + nearest[:, 0]
        sub_centroids.append(km.centroids)
    return _filled_ivf(data, np.concatenate(sub_centroids), assignment, codes, nprobe)


def _filled_ivf(
    data: np.ndarray,
    centroids: np.ndarray,
    lists: np.ndarray,
    codes: str,
    nprobe: int,
    sq_trained: np.ndarray | None = None,
) -> faiss.IndexIVF:
    """An inner-product IVF whose list ``i`` has centroid row ``i`` of ``centroids`` and
    holds the rows of ``data`` that ``lists`` puts there, in order. ``sq8`` codes: their
    8-bit ranges trained on ``data``, or ``sq_trained`` (a saved index's)."""
    quantizer = faiss.IndexFlatIP(data.shape[1])
    quantizer.add(np.ascontiguousarray(centroids, dtype=np.float32))
    index = _ivf(quantizer, quantizer.ntotal, codes)
    if sq_trained is None:
        index.train(data)  # the quantizer is full: only 8-bit ranges are trained, if any
    else:
        faiss.copy_array_to_vector(sq_trained, index.sq.trained)
        index.is_trained = True
    ids = np.arange(len(data), dtype=np.int64)
    lists = np.ascontiguousarray(lists, dtype=np.int64)
    index.add_core(len(data), faiss.swig_ptr(data), faiss.swig_ptr(ids), faiss.swig_ptr(lists))
    index.nprobe = min(nprobe, index.nlist)
    return index


def index_parts(index: faiss.Index) -> dict[str, np.ndarray]:
    """The plain arrays that rebuild a built ``clusters``, ``ivf`` or ``hnsw`` index over
    the same vectors (:func:`rebuilt_index`): what took building (the lists' centroids
    and which list holds each vector, the 8-bit ranges; the graph), none of the vectors.
    Not ``faiss.serialize_index``'s bytes: faiss's reader trusts them, and a crafted
    blob made it open a file of its choosing, or allocate what the blob claimed."""
    if isinstance(index, faiss.IndexHNSW):
        graph = index.hnsw
        return {
            "levels": faiss.vector_to_array(graph.levels).astype(np.int32),
            "offsets": faiss.vector_to_array(graph.offsets).astype(np.int64),
            "neighbors": faiss.vector_to_array(graph.neighbors).astype(np.int32),
            "entry_point": np.array([graph.entry_point], dtype=np.int64),
        }
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    lists = np.full(ivf.ntotal, -1, dtype=np.int64)
    for number in range(ivf.nlist):
        if size := ivf.invlists.list_size(number):
            lists[faiss.rev_swig_ptr(ivf.invlists.get_ids(number), size)] = number
    parts = {"centroids": ivf.quantizer.reconstruct_n(0, ivf.nlist), "lists": lists}
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        parts["sq_trained"] = faiss.vector_to_array(ivf.sq.trained)
    return parts


def rebuilt_index(
    parts: dict[str, np.ndarray],
    vectors: Tensor,
    kind: str,
    ivf_nprobe: int = 16,
    ivf_codes: str = "flat",
    hnsw_m: int = 32,
    hnsw_ef_search: int = 256,
) -> faiss.Index:
    """The index :func:`index_parts` took apart, put together again over ``vectors``
    (the same class means) in a fraction of its build time. Every part is checked
    against the vectors before faiss sees it (a crafted export's arrays could otherwise
    make faiss read outside them): a bad one is a ValueError naming it."""
    data = _to_numpy(vectors)
    n, d = data.shape
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        per_level = faiss.vector_to_array(index.hnsw.cum_nneighbor_per_level).astype(np.int64)
        levels = _part(parts, "levels", (n,), 1, len(per_level) - 1)
        offsets = _part(parts, "offsets", (n + 1,), 0, None)
        if offsets[0] != 0 or not np.array_equal(np.diff(offsets), per_level[levels]):
            raise ValueError(
                "the saved router index's offsets do not fit its levels (hnsw_m="
                f"{hnsw_m}: {per_level[1]} neighbours on level 0)"
            )
        neighbors = _part(parts, "neighbors", (int(offsets[-1]),), -1, n - 1)
        for level in range(1, int(levels.max())):  # a search there reads its neighbours'
            upper = np.flatnonzero(levels > level)  # slots on that level: they must have some
            slots = offsets[upper, None] + np.arange(per_level[level], per_level[level + 1])
            found = neighbors[slots]
            if bool(((found >= 0) & (levels[found.clip(0)] <= level)).any()):
                raise ValueError(
                    f"the saved router index's neighbors link level {level} to a node "
                    "that is not on it"
                )
        entry = int(_part(parts, "entry_point", (1,), 0, n - 1)[0])
        if levels[entry] != levels.max():
            raise ValueError("the saved router index's entry_point is not on its top level")
        index.storage.add(data)
        graph = index.hnsw
        faiss.copy_array_to_vector(levels.astype(np.int32), graph.levels)
        faiss.copy_array_to_vector(offsets.astype(np.uint64), graph.offsets)
        faiss.copy_array_to_vector(neighbors.astype(np.int32), graph.neighbors)
        graph.entry_point, graph.max_level = entry, int(levels[entry]) - 1
        graph.efSearch = hnsw_ef_search
        index.ntotal = n
        return index
    centroids = parts.get("centroids")
    if not (
        isinstance(centroids, np.ndarray)
        and centroids.dtype == np.float32
        and centroids.ndim == 2
        and centroids.shape[1] == d
        and 1 <= len(centroids) <= n
        and np.isfinite(centroids).all()
    ):
        raise ValueError(
            f"the saved router index's centroids are not 1 to {n} finite float32 rows of {d}"
        )
    lists = _part(parts, "lists", (n,), 0, len(centroids) - 1)
    trained = None
    if ivf_codes == "sq8":
        trained = parts.get("sq_trained")
        if not (
            isinstance(trained, np.ndarray)
            and trained.dtype == np.float32
            and trained.shape == (2 * d,)
            and np.isfinite(trained).all()
        ):
            raise ValueError(f"the saved router index's sq_trained is not {2 * d} finite float32s")
    return _filled_ivf(data, centroids, lists, ivf_codes, ivf_nprobe, trained)


def _part(
    parts: dict[str, np.ndarray], name: str, shape: tuple[int], low: int, high: int | None
) -> np.ndarray:
    """``parts[name]`` as int64: integers of ``shape``, each in [low, high]."""
    part = parts.get(name)
    if not (
        isinstance(part, np.ndarray)
        and part.dtype.kind in "iu"
        and part.shape == shape
        and (part.size == 0 or (part.min() >= low and (high is None or part.max() <= high)))
    ):
        bound = "" if high is None else f" to {high}"
        raise ValueError(
            f"the saved router index's {name} is not {shape[0]} integers from {low}{bound}"
        )
    return part.astype(np.int64)


def build_index(
    vectors: Tensor,
    kind: str = "flat",
    ivf_nlist: int | None = None,
    ivf_nprobe: int = 16,
    hnsw_m: int = 32,
    use_gpu: bool | None = None,
    hnsw_ef_search: int = 256,
    ivf_codes: str = "flat",
) -> faiss.Index:
    """An inner-product faiss index over L2-normalised ``vectors`` [N, d] (``clusters``:
    see :func:`cluster_lists_index`, built by the Router, which holds the clusters)."""
    data = _to_numpy(vectors)
    n, d = data.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_nlist or max(1, min(n // 8, int(4 * math.sqrt(n))))
        index = _ivf(faiss.IndexFlatIP(d), nlist, ivf_codes)
        index.train(data)
        index.nprobe = min(ivf_nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search  # candidates kept while searching
    else:
        raise ValueError(f"index={kind!r} is not one of flat, ivf, hnsw")
    index.add(data)
    return index if kind == "hnsw" else on_faiss_gpu(index, use_gpu)  # no GPU HNSW in faiss


def on_faiss_gpu(index: faiss.Index, use_gpu: bool | None) -> faiss.Index:
    """``index`` moved to this process's current CUDA device where ``use_gpu`` (None:
    where faiss has GPU support, faiss-gpu, and a GPU is visible), else itself. Under
    torchrun, and in train.py's shared evaluation, the current device is each process's
    own GPU; GPU 0 for every process put their indexes, their scratch memory and a
    CUDA context each on one GPU (a review)."""
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
    if not use_gpu:
        return index
    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), torch.cuda.current_device(), index)


class Router:
    """Ranks clusters for query embeddings by their nearest class means.

    Args:
        class_means: [C, d] L2-normalised class means.
        class_to_cluster: [C] cluster id of each identity.
        centroids: [K, d] L2-normalised cluster centroids (ranks clusters that no
            retrieved neighbour belongs to, after all retrieved ones).
        index: flat, clusters, ivf or hnsw.
        neighbours: class means an approximate index retrieves per query (at least
            ``top_m * 8``; ``flat`` compares every class mean).
        ivf_nlist, ivf_nprobe, ivf_codes, lists_per_cluster, hnsw_m, hnsw_ef_search:
            index settings (lists_per_cluster: index=clusters only).
        use_gpu: None: faiss GPU when available (not ``flat``: see ``blocks``).
        prebuilt: the parts of an index of these settings over these class means, as
            :meth:`saved_parts` gave them: put together instead of built (an ivf or hnsw
            index over 360K identities took 1.5 to 6 minutes to build, docs/SCALE.md).
    """

    def __init__(
        self,
        class_means: Tensor,
        class_to_cluster: Tensor,
        centroids: Tensor,
        index: str = "flat",
        neighbours: int = 64,
        ivf_nlist: int | None = None,
        ivf_nprobe: int = 16,
        hnsw_m: int = 32,
        use_gpu: bool | None = None,
        hnsw_ef_search: int = 256,
        ivf_codes: str = "flat",
        lists_per_cluster: int = 1,
        prebuilt: dict[str, np.ndarray] | None = None,
    ) -> None:
        self.class_to_cluster = class_to_cluster.cpu().long()
        self.centroids = centroids.detach().float().cpu()
        self.num_clusters = centroids.shape[0]
        self.num_classes = class_means.shape[0]
        self.neighbours = neighbours
        self.kind = index
        if index == "flat":
            # Each cluster's class means in one block: a query's best similarity in a
            # cluster is one matrix product and a max over its block. faiss's IndexFlatIP
            # took 8.36 ms per query against 1.77 at 360K x 512, K=64, batch 256 (docs/
            # SCALE.md), and ranked clusters without a retrieved neighbour by centroid.
            # Made on the CPU; a caller may pass the same blocks where it runs (route's
            # ``blocks``), and TwoStageIdentifier moves these with it (one copy)
            if prebuilt is not None:
                raise ValueError("index=flat is built from the class means, not read")
            order = torch.sort(self.class_to_cluster, stable=True).indices
            self.grouped = class_means.detach().float().cpu()[order].contiguous()
            sizes = torch.bincount(self.class_to_cluster, minlength=self.num_clusters)
            self.bounds = [0, *torch.cumsum(sizes, 0).tolist()]
        elif prebuilt is not None:
            self.index = rebuilt_index(
                prebuilt, class_means, index, ivf_nprobe, ivf_codes, hnsw_m, hnsw_ef_search
            )
            if index != "hnsw":
                self.index = on_faiss_gpu(self.index, use_gpu)
        elif index == "clusters":
            self.index = cluster_lists_index(
                class_means,
                self.class_to_cluster,
                self.centroids,
                ivf_nprobe,
                lists_per_cluster,
                ivf_codes,
            )
            self.index = on_faiss_gpu(self.index, use_gpu)
        else:
            self.index = build_index(
                class_means,
                index,
                ivf_nlist,
                ivf_nprobe,
                hnsw_m,
                use_gpu,
                hnsw_ef_search,
                ivf_codes,
            )

    def saved_parts(self) -> dict[str, np.ndarray] | None:
        """The built index's parts (:func:`index_parts`) for ``prebuilt``; None for
        ``flat``, whose build is a copy of the class means, quicker than reading one."""
        if self.kind == "flat":
            return None
        index = self.index
        if hasattr(faiss, "index_gpu_to_cpu") and not isinstance(index, faiss.IndexHNSW):
            with contextlib.suppress(Exception):  # a CPU index is returned as it is
                index = faiss.index_gpu_to_cpu(index)
        return index_parts(index)

    def cluster_scores(
        self, queries: Tensor, top_m: int = 1, blocks: Tensor | None = None
    ) -> Tensor:
        """[B, K] per-cluster routing scores: the best retrieved class-mean similarity.

        Clusters with no retrieved class mean score ``centroid similarity - 4`` so they
        rank after every retrieved cluster (similarities lie in [-1, 1]). ``blocks``
        (``flat`` only): this router's class-mean blocks, equal to :attr:`grouped`,
        kept where the caller computes (a GPU): the scores are computed there.
        """
        if self.kind != "flat":
            with torch.autocast("cpu", enabled=False):  # routing scores in fp32, always
                return self._cluster_scores(queries, top_m)
        blocks = self.grouped if blocks is None else blocks
        with torch.autocast(blocks.device.type, enabled=False):
            q = torch.nn.functional.normalize(queries.detach().float().to(blocks.device), dim=1)
            return self._exact_scores(q, blocks)

    def _cluster_scores(self, queries: Tensor, top_m: int) -> Tensor:
        q = torch.nn.functional.normalize(queries.detach().float().cpu(), dim=1)
        k = min(self.num_classes, max(self.neighbours, 8 * top_m))
        sims, ids = self.index.search(_to_numpy(q), k)
        sims, ids = torch.from_numpy(sims), torch.from_numpy(ids)
        valid = ids >= 0  # ivf/hnsw may return fewer than k results
        clusters = self.class_to_cluster[ids.clamp(min=0)]
        sims = torch.where(valid, sims, torch.full_like(sims, -math.inf))
        scores = q @ self.centroids.T - 4.0
        retrieved = torch.full_like(scores, -math.inf).scatter_reduce(
            1, clusters, sims, reduce="amax"
        )
        return torch.maximum(scores, retrieved)

    def _exact_scores(self, q: Tensor, blocks: Tensor) -> Tensor:
        """``flat``: each cluster's best class-mean similarity, over all its members (an
        empty cluster: centroid similarity - 4, last), computed where ``blocks`` are."""
        if blocks.shape != self.grouped.shape:
            raise ValueError(f"blocks of {tuple(blocks.shape)} for {tuple(self.grouped.shape)}")
        scores = q @ self.centroids.to(q.device).T - 4.0
        rows = max(1024, _BLOCK // max(1, len(q)))  # [B, rows] similarities at a time
        for c in range(self.num_clusters):
            start, end = self.bounds[c], self.bounds[c + 1]
            for first in range(start, end, rows):
                block = (q @ blocks[first : min(end, first + rows)].T).amax(dim=1)
                scores[:, c] = block if first == start else torch.maximum(scores[:, c], block)
        return scores

    def route(self, queries: Tensor, top_m: int = 1, blocks: Tensor | None = None) -> Tensor:
        """[B, top_m] cluster ids, best first; equal scores go to the lower cluster id (on
        the device of ``blocks``, see :meth:`cluster_scores`; else where
        :attr:`grouped` is: the CPU, or a TwoStageIdentifier's device). The
        scores are float32 products taken in blocks whose shapes follow the batch
        size, so two clusters holding the same class mean can score a few units in the
        last place apart, and a face alone can go to the other one than in a batch. A
        query with no direction (NaN, inf or zero: :func:`has_direction`) is near no
        cluster: its row is :data:`NO_CLUSTER` (-1)."""
        if not 1 <= top_m <= self.num_clusters:
            raise ValueError(f"top_m={top_m} must be in [1, {self.num_clusters}]")
        scores = self.cluster_scores(queries, top_m, blocks)
        # A stable sort keeps equal scores in cluster order (topk does not promise that).
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_m]
        lost = ~has_direction(queries).to(order.device)
        return order.masked_fill(lost[:, None], NO_CLUSTER)
