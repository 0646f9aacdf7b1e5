"""The router: which clusters' sub-nets should look at a face.

Ahmadi & Dianat (JSDP 2024): the clustering unit groups identities by their
class-mean embeddings, so a test face's cluster can be found by comparing its
stage-1 embedding with the class means. The router searches the class means with
faiss (Johnson et al., "Billion-scale similarity search with GPUs", 2019) and
ranks each cluster by the similarity of its best class mean among the retrieved
neighbours; the ``top_m`` best clusters are the candidates. Routing works for any
partition, random ones included (then it is no better than luck at picking the
cluster, which is the point of comparing them).

Index types: ``flat`` (exact inner product, the default), ``clusters`` (inverted
lists that are the clustering's own clusters: the K centroids are the coarse
quantizer and each class mean sits in its cluster's list, so nothing is trained
again and a probe visits whole clusters; for hundreds of thousands of identities),
``ivf`` (faiss's own k-means lists) and ``hnsw`` (graph). With faiss-gpu installed
and a CUDA device present, flat and ivf-type indexes move to the GPU.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch
from torch import Tensor


def _to_numpy(x: Tensor) -> np.ndarray:
    return np.ascontiguousarray(x.detach().float().cpu().numpy())


def cluster_lists_index(
    vectors: Tensor, lists: Tensor, centroids: Tensor, nprobe: int
) -> faiss.IndexIVFFlat:
    """An inner-product IVF index whose inverted lists are given: row i of ``vectors``
    goes to list ``lists[i]``, and ``centroids`` [K, d] are the coarse quantizer.

    A query scans the ``nprobe`` lists whose centroids are nearest. With the
    clustering's own assignment as the lists, that is the ``nprobe`` nearest clusters.
    """
    data, cents = _to_numpy(vectors), _to_numpy(centroids)
    d, k = data.shape[1], cents.shape[0]
    quantizer = faiss.IndexFlatIP(d)
    quantizer.add(cents)
    index = faiss.IndexIVFFlat(quantizer, d, k, faiss.METRIC_INNER_PRODUCT)
    index.is_trained = True
    labels = lists.cpu().numpy().astype(np.int64)
    order = np.argsort(labels, kind="stable")
    counts = np.bincount(labels, minlength=k)
    start = 0
    for c in range(k):
        ids = np.ascontiguousarray(order[start : start + counts[c]], dtype=np.int64)
        codes = np.ascontiguousarray(data[ids]).view(np.uint8)
        index.invlists.add_entries(c, len(ids), faiss.swig_ptr(ids), faiss.swig_ptr(codes))
        start += counts[c]
    index.ntotal = data.shape[0]
    index.nprobe = min(nprobe, k)
    return index


def build_index(
    vectors: Tensor,
    kind: str = "flat",
    ivf_nlist: int | None = None,
    ivf_nprobe: int = 16,
    hnsw_m: int = 32,
    use_gpu: bool | None = None,
    hnsw_ef_search: int = 256,
) -> faiss.Index:
    """An inner-product faiss index over L2-normalised ``vectors`` [N, d] (``clusters``:
    see :func:`cluster_lists_index`, built by the Router, which holds the clusters)."""
    data = _to_numpy(vectors)
    n, d = data.shape
    if kind == "flat":
        index = faiss.IndexFlatIP(d)
    elif kind == "ivf":
        nlist = ivf_nlist or max(1, min(n // 8, int(4 * math.sqrt(n))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatIP(d), d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.train(data)
        index.nprobe = min(ivf_nprobe, nlist)
    elif kind == "hnsw":
        index = faiss.IndexHNSWFlat(d, hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efSearch = hnsw_ef_search  # candidates kept while searching
    else:
        raise ValueError(f"index={kind!r} is not one of flat, ivf, hnsw")
    index.add(data)
    if use_gpu is None:
        use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
    if use_gpu and kind != "hnsw":  # faiss has no GPU HNSW
        index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)
    return index


class Router:
    """Ranks clusters for query embeddings by their nearest class means.

    Args:
        class_means: [C, d] L2-normalised class means.
        class_to_cluster: [C] cluster id of each identity.
        centroids: [K, d] L2-normalised cluster centroids (ranks clusters that no
            retrieved neighbour belongs to, after all retrieved ones).
        index: flat, clusters, ivf or hnsw.
        neighbours: class means retrieved per query (at least ``top_m * 8``).
        ivf_nlist, ivf_nprobe, hnsw_m, hnsw_ef_search: index settings.
        use_gpu: None: faiss GPU when available.
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
    ) -> None:
        self.class_to_cluster = class_to_cluster.cpu().long()
        self.centroids = centroids.detach().float().cpu()
        self.num_clusters = centroids.shape[0]
        self.num_classes = class_means.shape[0]
        self.neighbours = neighbours
        if index == "clusters":
            self.index = cluster_lists_index(
                class_means, self.class_to_cluster, self.centroids, ivf_nprobe
            )
            if use_gpu is None:
                use_gpu = torch.cuda.is_available() and hasattr(faiss, "StandardGpuResources")
            if use_gpu:
                self.index = faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, self.index)
        else:
            self.index = build_index(
                class_means, index, ivf_nlist, ivf_nprobe, hnsw_m, use_gpu, hnsw_ef_search
            )

    def cluster_scores(self, queries: Tensor, top_m: int = 1) -> Tensor:
        """[B, K] per-cluster routing scores: the best retrieved class-mean similarity.

        Clusters with no retrieved class mean score ``centroid similarity - 4`` so they
        rank after every retrieved cluster (similarities lie in [-1, 1]).
        """
        with torch.autocast("cpu", enabled=False):  # routing scores in fp32, always
            return self._cluster_scores(queries, top_m)

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

    def route(self, queries: Tensor, top_m: int = 1) -> Tensor:
        """[B, top_m] cluster ids, best first; ties go to the lower cluster id."""
        if not 1 <= top_m <= self.num_clusters:
            raise ValueError(f"top_m={top_m} must be in [1, {self.num_clusters}]")
        scores = self.cluster_scores(queries, top_m)
        # A stable sort keeps equal scores in cluster order (topk does not promise that).
        return torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :top_m]
