"""Routed inference on hand-made embeddings where the right answer is known, and
evaluate.py end to end on a tiny finished run."""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import math
import os
import re
import shutil
import unicodedata
from pathlib import Path
from types import SimpleNamespace

import faiss
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import evaluate
from facecluster import cli, evaluation
from facecluster.clustering import ClusterAssignment, cluster_identities
from facecluster.config import ConfigError, load_config
from facecluster.data import scored
from facecluster.data.pack import main as pack_main
from facecluster.deploy import export_threshold
from facecluster.evaluation import eval_autocast, evaluate_run, top_m_sweep
from facecluster.inference import UNKNOWN, Router, TwoStageIdentifier, fuse
from facecluster.inference.identifier import ENROLL_ROUTE_BATCH
from facecluster.io import UnsafeFileError
from facecluster.pipeline import train
from facecluster.run import RunFolder, _lock_owner
from tests.conftest import DEMO, SMOKE, run_script, smoke_overrides

ROUTE = {
    "top_m": 1,
    "alpha": 0.0,
    "index": "flat",
    "neighbours": 64,
    "ivf_nlist": None,
    "ivf_nprobe": 16,
    "hnsw_m": 32,
    "hnsw_ef_search": 256,
    "ivf_codes": "flat",
    "lists_per_cluster": 1,
}
BACKBONE = {"name": "tiny", "embedding_dim": 8, "image_size": 8}


def _assignment(means: torch.Tensor, clusters: list[int]) -> ClusterAssignment:
    return ClusterAssignment.from_labels(
        torch.tensor(clusters), F.normalize(means, dim=1), "kmeans"
    )


def _identifier(means, clusters, heads=None, route=None) -> TwoStageIdentifier:
    """Identity networks: 'images' are embeddings, so every score is hand-computable."""
    a = _assignment(means, clusters)
    heads = heads or [a.class_means[a.classes_of(k)] for k in range(a.num_clusters)]
    return TwoStageIdentifier(
        BACKBONE,
        nn.Identity(),
        [nn.Identity()] * a.num_clusters,
        heads,
        a,
        [f"id{i}" for i in range(len(clusters))],
        dict(ROUTE, **(route or {})),
    )


def test_router_picks_the_cluster_of_the_nearest_class_mean_and_ranks_top_m():
    means = torch.eye(4)  # identity i on axis i
    router = Router(
        F.normalize(means, dim=1),
        torch.tensor([0, 0, 1, 2]),
        F.normalize(torch.tensor([[1.0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]), dim=1),
    )
    query = torch.tensor(
        [[0.1, 0.2, 0.9, 0.3]]
    )  # nearest: identity 2 (cluster 1), then 3 (cluster 2)
    assert router.route(query, 1).tolist() == [[1]]
    assert router.route(query, 2).tolist() == [[1, 2]]
    assert router.route(query, 3).tolist() == [[1, 2, 0]]
    with pytest.raises(ValueError, match="^top_m=4 must be in"):
        router.route(query, 4)


def test_a_faiss_gpu_index_goes_to_this_processs_gpu(monkeypatch):
    # with faiss-gpu, every router index went to GPU 0: under torchrun all the processes'
    # indexes, scratch memory and CUDA contexts on one GPU (a review). No GPU or
    # faiss-gpu here: their calls are stand-ins that record the device asked for.
    from facecluster.inference import router as router_module

    moved = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)  # torchrun's LOCAL_RANK 3
    monkeypatch.setattr(router_module.faiss, "StandardGpuResources", object, raising=False)
    monkeypatch.setattr(
        router_module.faiss,
        "index_cpu_to_gpu",
        lambda res, device, index: moved.append(device) or index,
        raising=False,
    )
    torch.manual_seed(0)
    a = cluster_identities(F.normalize(torch.randn(300, 16), dim=1), 4, "kmeans", seed=0)
    for kind in ("ivf", "clusters", "hnsw"):  # faiss has no GPU HNSW: it stays
        Router(a.class_means, a.class_to_cluster, a.centroids, kind, ivf_nlist=8)
    assert moved == [3, 3]


def test_flat_router_ranks_every_cluster_by_its_best_class_mean():
    # index=flat compares every class mean: a cluster's rank is its best member's
    # similarity, down to the last cluster, also where none of its members is among the
    # query's nearest 64 (the faiss search it replaced ranked those by centroid)
    torch.manual_seed(0)
    means = F.normalize(torch.randn(600, 16), dim=1)
    a = cluster_identities(means, 12, "kmeans", seed=0)
    router = Router(a.class_means, a.class_to_cluster, a.centroids, "flat")
    queries = F.normalize(torch.randn(100, 16), dim=1)
    sims = queries @ a.class_means.T
    best = torch.stack([sims[:, a.classes_of(k)].amax(1) for k in range(12)], dim=1)
    expected = torch.sort(best, dim=1, descending=True, stable=True).indices
    assert torch.equal(router.route(queries, 12), expected)
    # blocks of class means at a time give the same ranks
    import facecluster.inference.router as router_module

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(router_module, "_BLOCK", 1)  # 1,024 class means per product
        big = F.normalize(torch.randn(5000, 16), dim=1)
        b = ClusterAssignment.from_labels(torch.arange(5000) % 3, big, "random")
        blocked = Router(b.class_means, b.class_to_cluster, b.centroids, "flat")
        best = torch.stack(
            [(queries @ b.class_means[b.classes_of(k)].T).amax(1) for k in range(3)], dim=1
        )
        expected = torch.sort(best, dim=1, descending=True, stable=True).indices
        assert torch.equal(blocked.route(queries, 3), expected)


def test_the_decision_unit_reads_each_clusters_class_means_in_member_order():
    # means(k) holds cluster k's class means in members(k) order (the moe terms' columns):
    # views of the flat router's blocks, copies with clustering.overlap; enrolment
    # extends them (test_enrolment_embeds_a_person_in_batches_with_the_same_rows); not
    # in the state dict
    torch.manual_seed(0)
    means = F.normalize(torch.randn(30, 8), dim=1)
    ident = _identifier(means, [i % 3 for i in range(30)])
    grouped = ident.router.grouped
    for k in range(3):
        assert torch.equal(ident.means(k), ident.assignment.class_means[ident.members(k)])
        assert ident.means(k).untyped_storage().data_ptr() == grouped.untyped_storage().data_ptr()
    assert not any("means" in key for key in ident.state_dict())
    # routing scans these blocks where the identifier is (a GPU), with the router's ranks
    queries = F.normalize(torch.randn(20, 8), dim=1)
    seen = []
    route = ident.router.route
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(ident.router, "route", lambda *a: seen.append(a[2]) or route(*a))
        ident.identify(queries)
    assert seen[0] is ident.grouped_means
    assert torch.equal(route(queries, 3, ident.grouped_means.clone()), route(queries, 3))
    with pytest.raises(ValueError, match="blocks of"):
        route(queries, 1, ident.grouped_means[1:])
    # moved (to a GPU: every buffer copied, as here), the router keeps no copy of its
    # own where the identifier was (4 GB of host memory at 2M x 512)
    before = route(queries, 3)
    ident._apply(torch.Tensor.clone)
    assert ident.grouped_means.data_ptr() != grouped.data_ptr()
    assert ident.router.grouped is ident.grouped_means
    assert torch.equal(ident.router.route(queries, 3), before)
    ident.enroll({"new": torch.randn(2, 8)})  # a new router, with the same one copy
    assert ident.router.grouped is ident.grouped_means
    a = _assignment(means, [i % 3 for i in range(30)]).with_overlap(torch.tensor([[0, 1], [4, 2]]))
    heads = [a.class_means[a.classes_of(k)] for k in range(3)]
    shared = TwoStageIdentifier(
        BACKBONE, nn.Identity(), [nn.Identity() for _ in range(3)], heads, a,
        [f"id{i}" for i in range(30)], dict(ROUTE),
    )  # fmt: skip
    for k in range(3):
        assert torch.equal(shared.means(k), a.class_means[a.classes_of(k)])
    assert 0 in shared.members(1).tolist() and 4 in shared.members(2).tolist()


def test_cluster_lists_index_holds_each_class_mean_in_its_own_cluster():
    # index=clusters: the clustering's clusters are the inverted lists. Probing all of
    # them is exact search; probing one searches only the nearest centroid's cluster.
    torch.manual_seed(0)
    means = F.normalize(torch.randn(300, 16), dim=1)
    assignment = cluster_identities(means, 6, "kmeans", seed=0)
    a = assignment
    exact = Router(a.class_means, a.class_to_cluster, a.centroids, "flat")
    every = Router(a.class_means, a.class_to_cluster, a.centroids, "clusters", ivf_nprobe=6)
    queries = F.normalize(means[:80] + 0.3 * torch.randn(80, 16), dim=1)
    assert torch.equal(every.route(queries, 3), exact.route(queries, 3))
    one = Router(a.class_means, a.class_to_cluster, a.centroids, "clusters", ivf_nprobe=1)
    index = one.index
    assert index.ntotal == 300 and index.nlist == 6
    for k in range(6):  # list k holds exactly cluster k's identities
        ids = faiss.rev_swig_ptr(index.invlists.get_ids(k), index.invlists.list_size(k))
        assert sorted(ids.tolist()) == a.classes_of(k).tolist()
    nearest_centroid = (queries @ a.centroids.T).argmax(1)
    _, found = index.search(queries.numpy(), 1)
    assert torch.equal(a.class_to_cluster[torch.from_numpy(found[:, 0])], nearest_centroid)


def test_cluster_lists_split_inside_each_cluster():
    # lists_per_cluster: each cluster's identities split into lists of their own (a
    # k-means inside the cluster); probing every list is exact search, with 8-bit codes
    # too on these well-separated class means.
    torch.manual_seed(0)
    means = F.normalize(torch.randn(300, 16), dim=1)
    a = cluster_identities(means, 6, "kmeans", seed=0)
    exact = Router(a.class_means, a.class_to_cluster, a.centroids, "flat")
    split = Router(
        a.class_means, a.class_to_cluster, a.centroids, "clusters",
        ivf_nprobe=24, lists_per_cluster=4,
    )  # fmt: skip
    index = split.index
    assert index.ntotal == 300 and index.nlist == 24
    for k in range(6):  # lists 4k..4k+3 hold exactly cluster k's identities
        ids = [
            i
            for j in range(4 * k, 4 * k + 4)
            for i in faiss.rev_swig_ptr(index.invlists.get_ids(j), index.invlists.list_size(j))
        ]
        assert sorted(ids) == a.classes_of(k).tolist()
    queries = F.normalize(means[:80] + 0.3 * torch.randn(80, 16), dim=1)
    assert torch.equal(split.route(queries, 3), exact.route(queries, 3))


def test_kmeans_trains_on_every_class_mean_not_faiss_sample():
    # faiss samples 256 points per centroid unless told otherwise: with 2 clusters and
    # 1,200 class means it would train on 512 of them. Every one is used.
    torch.manual_seed(0)
    x = F.normalize(torch.randn(1200, 8), dim=1)
    data = np.ascontiguousarray(x.numpy())

    def partition(centroids) -> set:
        labels = (data @ np.asarray(centroids).T).argmax(1)
        return {frozenset(np.flatnonzero(labels == k).tolist()) for k in range(2)}

    ours = cluster_identities(x, 2, "kmeans", seed=3)
    full = faiss.Kmeans(8, 2, niter=20, spherical=True, seed=3, max_points_per_centroid=1200)
    full.train(data)
    sampled = faiss.Kmeans(8, 2, niter=20, spherical=True, seed=3)
    sampled.train(data)
    found = {frozenset(ours.classes_of(k).tolist()) for k in range(2)}
    assert found == partition(full.centroids)
    assert found != partition(sampled.centroids)


APPROXIMATE_INDEXES = [
    ("ivf", {}),
    ("ivf", {"ivf_codes": "sq8"}),
    ("clusters", {"ivf_codes": "sq8", "lists_per_cluster": 4}),
    ("hnsw", {}),
]


@pytest.mark.parametrize(("index", "options"), APPROXIMATE_INDEXES)
def test_approximate_indexes_route_like_exact_search_on_separated_data(index, options):
    torch.manual_seed(0)
    means = F.normalize(torch.randn(400, 16), dim=1)
    clusters = torch.arange(400) % 8
    centroids = F.normalize(torch.stack([means[clusters == k].mean(0) for k in range(8)]), dim=1)
    queries = means[:50] + 0.01 * torch.randn(50, 16)
    exact = Router(means, clusters, centroids, "flat").route(queries, 2)
    approx = Router(means, clusters, centroids, index, ivf_nprobe=64, **options).route(queries, 2)
    assert (exact[:, 0] == approx[:, 0]).float().mean() >= 0.95


def _separated(n=400, d=16, k=8):
    torch.manual_seed(0)
    means = F.normalize(torch.randn(n, d), dim=1)
    clusters = torch.arange(n) % k
    centroids = F.normalize(torch.stack([means[clusters == c].mean(0) for c in range(k)]), dim=1)
    return means, clusters, centroids


@pytest.mark.parametrize(("index", "options"), APPROXIMATE_INDEXES)
def test_a_saved_router_index_is_put_together_from_plain_arrays_as_it_was(
    index, options, monkeypatch
):
    # an export keeps the index's parts as plain arrays, not faiss's serialised bytes
    # (faiss's reader trusts those: a crafted blob made it open a file of its choosing):
    # put together over the same class means, nothing trained again, it finds the same
    # neighbours with the same similarities for every query
    from facecluster.inference import router as router_module

    means, clusters, centroids = _separated()
    built = Router(means, clusters, centroids, index, ivf_nprobe=3, hnsw_ef_search=16, **options)
    parts = built.saved_parts()
    assert parts and all(p.dtype.kind in "iuf" for p in parts.values())
    for name in ("deserialize_index", "Kmeans"):
        monkeypatch.setattr(faiss, name, lambda *a, _n=name, **k: pytest.fail(f"faiss.{_n}"))
    for name in ("build_index", "cluster_lists_index"):
        monkeypatch.setattr(router_module, name, lambda *a, **k: pytest.fail("built again"))
    again = Router(
        means, clusters, centroids, index, ivf_nprobe=3, hnsw_ef_search=16, prebuilt=parts,
        **options,
    )  # fmt: skip
    queries = F.normalize(means[:60] + 0.3 * torch.randn(60, 16), dim=1).numpy()
    (sims, ids), (sims_again, ids_again) = (
        built.index.search(queries, 20),
        again.index.search(queries, 20),
    )
    assert np.array_equal(ids, ids_again) and np.array_equal(sims, sims_again)


def _crafted(parts, name, value):
    return {**parts, name: value}


def _linked_below(parts):
    """hnsw: a node's first neighbour on level 1 made one that only level 0 has (a search
    on level 1 would read that node's level-1 slots, past its own)."""
    levels, neighbors = parts["levels"], parts["neighbors"].copy()
    top, bottom = np.flatnonzero(levels >= 2)[0], np.flatnonzero(levels == 1)[-1]
    neighbors[parts["offsets"][top] + 32 * 2] = bottom  # hnsw_m=32: 64 slots on level 0
    return neighbors


@pytest.mark.parametrize(
    ("index", "options", "name", "craft"),
    [
        ("hnsw", {}, "levels", lambda p: p["levels"] + 40),  # past the graph's top level
        ("hnsw", {}, "levels", lambda p: p["levels"].astype(np.float32)),
        ("hnsw", {}, "offsets", lambda p: p["offsets"] + 8),
        ("hnsw", {}, "neighbors", lambda p: np.where(p["neighbors"] == 7, 10**6, p["neighbors"])),
        ("hnsw", {}, "neighbors", lambda p: np.where(p["neighbors"] == 7, -5, p["neighbors"])),
        ("hnsw", {}, "neighbors", lambda p: p["neighbors"][:-1]),
        ("hnsw", {}, "neighbors", _linked_below),
        ("hnsw", {}, "entry_point", lambda p: np.array([1 << 40])),
        ("hnsw", {}, "entry_point", lambda p: np.flatnonzero(p["levels"] == 1)[:1]),
        ("ivf", {}, "lists", lambda p: np.where(p["lists"] == 0, 1 << 40, p["lists"])),
        ("ivf", {}, "lists", lambda p: None),
        ("ivf", {}, "centroids", lambda p: np.full_like(p["centroids"], np.nan)),
        ("ivf", {}, "centroids", lambda p: p["centroids"][:, :8].copy()),
        ("ivf", {}, "centroids", lambda p: np.zeros((1 << 20, 16), np.float32)),
        ("ivf", {"ivf_codes": "sq8"}, "sq_trained", lambda p: p["sq_trained"][:5]),
        ("clusters", {}, "lists", lambda p: p["lists"][:-1]),
    ],
)
def test_a_crafted_router_index_part_is_refused_by_name(index, options, name, craft):
    # what faiss would take on trust is checked against the class means first: no
    # neighbour, list or level that points outside the arrays reaches faiss's search
    means, clusters, centroids = _separated()
    parts = Router(means, clusters, centroids, index, **options).saved_parts()
    crafted = _crafted(parts, name, craft(parts))
    with pytest.raises(ValueError, match=f"saved router index's {name} "):
        Router(means, clusters, centroids, index, prebuilt=crafted, **options)


def test_decision_unit_alpha_selects_and_blends_the_two_units():
    means = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0], [0, 1.0, 0, 0, 0, 0, 0, 0]])
    # Sub-net head rows disagree with the class means: head row of id0 points at axis 1.
    heads = [torch.tensor([[0.0, 1, 0, 0, 0, 0, 0, 0], [1.0, 0, 0, 0, 0, 0, 0, 0]])]
    ident = _identifier(means, [0, 0], heads=heads)
    query = F.normalize(torch.tensor([[0.9, 0.3, 0, 0, 0, 0, 0, 0]]), dim=1)
    assert ident.identify(query, alpha=0.0).identity.tolist() == [1]  # sub-net unit alone
    assert ident.identify(query, alpha=1.0).identity.tolist() == [0]  # clustering unit alone
    r = ident.identify(query, alpha=0.25)
    cos0, cos1 = query[0, 1].item(), query[0, 0].item()  # sub-net cosines of id0, id1
    sim0, sim1 = query[0, 0].item(), query[0, 1].item()  # class-mean similarities
    s0, s1 = 0.75 * cos0 + 0.25 * sim0, 0.75 * cos1 + 0.25 * sim1
    assert r.identity.item() == (0 if s0 > s1 else 1)
    assert r.score.item() == pytest.approx(max(s0, s1), abs=1e-6)
    assert r.subnet_forwards == 1 and ident.identify(query, alpha=1.0).subnet_forwards == 0
    assert torch.equal(fuse(torch.ones(1), torch.zeros(1), 0.5), torch.full((1,), 0.5))


def test_ties_go_to_the_lower_identity_whatever_the_cluster_order():
    # Identities 1 (cluster 1) and 2 (cluster 0) are the same point: a tie.
    means = torch.tensor(
        [
            [1.0, 0, 0, 0, 0, 0, 0, 0],
            [0, 1.0, 0, 0, 0, 0, 0, 0],
            [0, 1.0, 0, 0, 0, 0, 0, 0],
            [0, 0, 1.0, 0, 0, 0, 0, 0],
        ]
    )
    ident = _identifier(means, [1, 1, 0, 0])
    query = means[1:2]
    # The router's tie between clusters 0 and 1 goes to cluster 0, which holds only id 2;
    # once both clusters are searched, the decision unit's tie goes to the lower id.
    assert ident.identify(query, top_m=1).clusters.tolist() == [[0]]
    assert ident.identify(query, top_m=1).identity.tolist() == [2]
    assert ident.identify(query, top_m=2).identity.tolist() == [1]
    assert ident.identify(query, all_subnets=True).identity.tolist() == [1]


def _random_identifier(seed=0, classes=30, k=4):
    torch.manual_seed(seed)
    means = torch.randn(classes, 8)
    clusters = [i % k for i in range(classes)]
    heads = [F.normalize(torch.randn(len(range(c, classes, k)), 8), dim=1) for c in range(k)]
    return _identifier(means, clusters, heads=heads), torch.randn(64, 8)


@pytest.mark.parametrize("alpha", [0.0, 0.3, 1.0])
def test_ism_equals_brute_force_over_every_subnet(alpha):
    ident, queries = _random_identifier()
    q = F.normalize(queries, dim=1)
    scores = torch.empty(len(q), ident.assignment.num_classes)
    for k in range(ident.num_clusters):
        members = ident.members(k)
        scores[:, members] = (1 - alpha) * (q @ ident.head(k).T) + alpha * (
            q @ ident.assignment.class_means[members].T
        )
    every = {"top_m": ident.num_clusters, "alpha": alpha}  # every cluster searched
    result = ident.identify(queries, **every)
    assert torch.equal(result.identity, scores.argmax(1))
    assert result.subnet_forwards == (0 if alpha == 1.0 else len(q) * ident.num_clusters)
    # ISM, the paper's baseline: the sub-nets alone (alpha 0), whatever alpha says
    alone = torch.empty_like(scores)
    for k in range(ident.num_clusters):
        alone[:, ident.members(k)] = q @ ident.head(k).T
    ism = ident.identify(queries, alpha=alpha, all_subnets=True)
    assert torch.equal(ism.identity, alone.argmax(1))
    assert torch.equal(ism.similarity, alone.amax(1))
    assert ism.subnet_forwards == len(q) * ident.num_clusters
    # the top 5 candidates (what identify's CSV lists) are the 5 best over all identities
    top5 = ident.identify(queries, **every, k=5)
    expected = scores.topk(5, dim=1)
    assert torch.equal(top5.candidates, expected.indices)
    assert torch.allclose(top5.candidate_scores, expected.values)
    assert torch.equal(top5.identity, result.identity) and torch.equal(top5.score, result.score)
    with pytest.raises(ValueError, match="k=0: keep at least 1 candidate"):
        ident.identify(queries, **every, k=0)  # a tensor size mismatch deep in the ranking
    # open set: below the threshold the answer is UNKNOWN (-1); under the linear unit the
    # similarity a threshold compares is the fused score itself
    assert torch.equal(top5.candidate_similarities, top5.candidate_scores)
    threshold = result.similarity.median().item()
    answer = result.answer(threshold)
    assert torch.equal(answer == UNKNOWN, result.similarity < threshold)
    assert torch.equal(answer[answer != UNKNOWN], result.identity[result.similarity >= threshold])
    assert torch.equal(result.answer(None), result.identity)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_an_identity_in_two_clusters_keeps_its_better_score_once(alpha):
    # clustering.overlap: identities 0, 3, 6, ... are also in the next cluster, whose
    # sub-net scores them too; a face's candidates list each identity once, at its
    # better score (ISM), and routing to either cluster can find it
    torch.manual_seed(5)
    a = _assignment(torch.randn(30, 8), [i % 4 for i in range(30)])
    a = a.with_overlap(torch.tensor([[c, (c % 4 + 1) % 4] for c in range(0, 30, 3)]))
    heads = [F.normalize(torch.randn(len(a.classes_of(k)), 8), dim=1) for k in range(4)]
    names = [f"id{i}" for i in range(30)]
    ident = TwoStageIdentifier(
        BACKBONE, nn.Identity(), [nn.Identity()] * 4, heads, a, names, dict(ROUTE)
    )
    queries = torch.randn(64, 8)
    q = F.normalize(queries, dim=1)
    scores = torch.full((len(q), 30), -torch.inf)
    source = torch.full((len(q), 30), -1)  # the cluster that gave each identity's best
    for k in range(4):
        members = a.classes_of(k)
        fused = (1 - alpha) * (q @ ident.head(k).T) + alpha * (q @ a.class_means[members].T)
        better = fused > scores[:, members]
        source[:, members] = torch.where(better, k, source[:, members])
        scores[:, members] = torch.maximum(scores[:, members], fused)
    top5 = ident.identify(queries, top_m=4, alpha=alpha, k=5)  # every cluster searched
    expected = scores.topk(5, dim=1)
    assert torch.equal(top5.candidates, expected.indices)
    assert torch.allclose(top5.candidate_scores, expected.values)
    # each candidate's cluster is the one whose sub-net gave its kept score: for an
    # identity in two clusters, sometimes its second (what identify's CSV reports)
    assert torch.equal(top5.candidate_clusters, source.gather(1, expected.indices))
    second = top5.candidate_clusters != a.class_to_cluster[top5.candidates]
    assert second.any()
    for top_m in (1, 2, 4):
        routed = ident.identify(queries, top_m=top_m, alpha=alpha, k=8)
        for row in routed.candidates.tolist():
            assert len(set(row)) == len(row)  # never the same identity twice
        # a candidate's cluster was searched, and holds it
        kept = routed.candidates < 30
        assert (routed.candidate_clusters[~kept] == -1).all()
        for face, searched in enumerate(routed.clusters.tolist()):
            ids = routed.candidates[face][kept[face]].tolist()
            by = routed.candidate_clusters[face][kept[face]].tolist()
            for i, c in zip(ids, by, strict=True):
                assert c in searched and i in a.classes_of(c).tolist()
    # identity 0 (cluster 0, also 1) answered by sub-net 1 alone: its own head row
    face = ident.head(1)[0:1]  # sub-net 1's row for identity 0, its first member
    assert a.classes_of(1)[0] == 0
    only_one = ident.identify(face * 10, alpha=0.0, all_subnets=True)
    assert only_one.identity.tolist() == [0]


@pytest.mark.parametrize("top_m", [1, 2, 4])
def test_batched_grouping_gives_the_answers_of_one_by_one(top_m):
    ident, queries = _random_identifier(seed=1)
    batched = ident.identify(queries, top_m=top_m, alpha=0.2)
    for i in range(len(queries)):
        one = ident.identify(queries[i : i + 1], top_m=top_m, alpha=0.2)
        assert one.identity.item() == batched.identity[i].item()
        assert one.clusters.tolist()[0] == batched.clusters[i].tolist()
    assert batched.subnet_forwards == len(queries) * top_m


@pytest.mark.parametrize("decision", ["linear", "moe"])
def test_a_face_whose_embedding_has_no_direction_gets_no_identity(decision):
    # an embedding of NaN, inf or zeros (networks whose weights went non-finite, an input
    # they cannot embed) was routed to cluster 0 and answered with its best identity, a
    # NaN score under moe and, without a threshold, a name
    from facecluster.inference.identifier import FAILED

    ident, queries = _random_identifier(seed=2)
    ident.route_config.update(
        decision=decision, router_temperature=0.1, subnet_temperature=0.05, generalist_weight=0.4
    )
    bad = torch.stack([torch.full((8,), math.nan), torch.zeros(8), queries[2]])
    bad[2, 3] = math.inf
    faces = torch.cat([bad, queries[:5]])
    lost = torch.tensor([True] * 3 + [False] * 5)
    assert ident.router.route(faces, 2)[:3].tolist() == [[-1, -1]] * 3  # no cluster
    assert torch.equal(ident.router.route(faces, 2)[3:], ident.router.route(queries[:5], 2))
    for options in ({"top_m": 1}, {"top_m": 2, "k": 3}, {"all_subnets": True}):
        result, alone = ident.identify(faces, **options), ident.identify(queries[:5], **options)
        assert torch.equal(result.failed, lost), options
        assert result.answer(None)[:3].tolist() == result.answer(-2.0)[:3].tolist() == [FAILED] * 3
        assert torch.equal(result.answer(None)[3:], alone.answer(None))
        assert torch.equal(result.candidates[3:], alone.candidates)  # the others as alone
        assert torch.equal(result.candidate_scores[3:], alone.candidate_scores)
        # nothing compared: empty lists, no number, never a real identity
        assert bool((result.candidates[:3] == ident.assignment.num_classes).all())
        assert bool((result.candidate_scores[:3] == -math.inf).all())
        assert bool((result.candidate_similarities[:3] == -math.inf).all())
        assert bool((result.candidate_clusters[:3] == -1).all())
    # a sub-net that gives NaN fails the faces routed to its cluster, and only those
    ident.subnets[1] = ident.subnets[1].__class__()  # its own module, not the others'
    ident.subnets[1].register_forward_hook(lambda module, args, out: out * math.nan)
    result = ident.identify(queries, top_m=1)
    assert torch.equal(result.failed, result.clusters[:, 0] == 1) and bool(result.failed.any())
    assert bool((result.answer(None) == FAILED).eq(result.failed).all())
    # enrolment: a person whose faces embed to NaN is refused, nothing enrolled
    names = list(ident.class_names)
    with pytest.raises(ValueError, match=r"'nan': the stage-1 backbone's embedding of its faces"):
        ident.enroll({"nan": bad[:1]})
    routed_to_1 = queries[result.clusters[:, 0] == 1][:2]
    with pytest.raises(ValueError, match=r"'p': the sub-net 1's embedding of its faces is NaN"):
        ident.enroll({"p": routed_to_1})
    # the evaluation's scores take such a face as a miss, no identity's prediction (an
    # IndexError stopped the evaluation)
    from facecluster.evaluation import MacroScores

    identity = ident.routed(1, 0.3).predict(faces, 1)[0][:, 0]
    macro = MacroScores(ident.assignment.num_classes)
    macro.update(identity, torch.arange(len(faces)))
    assert int(macro.true.sum()) == len(faces) and int(macro.predicted.sum()) == len(faces) - 3
    assert ident.class_names == names


def test_a_tensor_held_under_several_names_is_scanned_once_and_each_name_reported(monkeypatch):
    # model.shared_layers: the frozen trunk is the router backbone's and every sub-net's,
    # and the identifier's check scanned it once per network (K + 1 times)
    from facecluster import io

    trunk, tail = torch.randn(64, 8), torch.randn(8)
    trunk[3, 1] = math.nan
    named = {"router_backbone.w": trunk, "subnets.0.w": trunk, "subnets.1.w": trunk}
    named |= {"subnets.0.b": tail, "subnets.1.b": tail.clone(), "rows": trunk[:3]}
    scanned = []
    aminmax = torch.aminmax
    monkeypatch.setattr(torch, "aminmax", lambda t: scanned.append(t) or aminmax(t))
    assert io.non_finite_keys(named) == ["router_backbone.w", "subnets.0.w", "subnets.1.w"]
    assert len(scanned) == 4  # the trunk, the tail, its copy, a view of other rows


def test_calibration_leaves_out_faces_embedded_with_no_direction(caplog):
    # one validation face of NaN stopped the decision unit's fit, and so the evaluation
    # and every export of the run, with an IndexError (argmin of an empty tensor)
    labels = torch.arange(64) % 30
    ident, queries = _random_identifier(seed=2)
    clean = ident.calibrate([(queries[1:], labels[1:])])
    bad = queries.clone()
    bad[0] = math.nan
    ident, _ = _random_identifier(seed=2)
    with caplog.at_level("WARNING", logger="facecluster.inference.identifier"):
        assert ident.calibrate([(bad, labels)]) == clean  # as without that face
    assert "1 validation face(s) embedded with no direction" in caplog.text

    # a sub-net that gives NaN: the faces of its cluster are left out of the whole fit,
    # its router terms too (they stayed in the router's), as identify fails them
    def nan_subnets(ident, clusters):
        for k in clusters:
            ident.subnets[k] = ident.subnets[k].__class__()
            ident.subnets[k].register_forward_hook(lambda module, args, out: out * math.nan)

    ident, _ = _random_identifier(seed=2)
    others = ident.class_to_cluster[labels] != 1
    without = ident.calibrate([(queries[others], labels[others])])
    ident, _ = _random_identifier(seed=2)
    nan_subnets(ident, [1])
    caplog.clear()
    with caplog.at_level("WARNING", logger="facecluster.inference.identifier"):
        assert ident.calibrate([(queries, labels)]) == without
    assert f"{int((~others).sum())} validation face(s) embedded with no direction" in caplog.text
    # every face: said, not an empty argmin, nor a fit on nothing (the sub-nets' own
    # temperature 0.005 and weight 0 when every sub-net failed)
    every = r"every validation face \({}\) embeds with no direction"
    ident, _ = _random_identifier(seed=2)
    with pytest.raises(ValueError, match=every.format(3)):
        ident.calibrate([(torch.full((3, 8), math.nan), labels[:3])])
    nan_subnets(ident, range(ident.num_clusters))
    with pytest.raises(ValueError, match=every.format(64)):
        ident.calibrate([(queries, labels)])


# --------------------------------------------------------------------------- a real run


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    return train(load_config(SMOKE, smoke_overrides(tmp, "logger=csv"))).run_dir


def test_each_process_of_an_evaluation_scores_a_shard_of_the_test_split(finished_run):
    # torchrun's processes (evaluation.Ranks) split the test split between them: no face
    # scored twice, none left out; the padding that evens the shards out is scored by none
    cfg = evaluation.RunFolder(finished_run).finished_config()
    whole = evaluation.Bench(cfg, "run", None)
    labels = torch.cat([y for _, y in whole.loader])
    positions, shards = [], []
    for rank in (0, 1):
        bench = evaluation.Bench(cfg, "run", None, evaluation.Ranks(rank, 2))
        positions.append({p for p in bench.loader.sampler if p < len(labels)})
        shards.append(torch.cat([y[scored(y)] for _, y in bench.loader]))
    assert not positions[0] & positions[1]
    assert positions[0] | positions[1] == set(range(len(labels)))
    assert len(shards[0]) == len(positions[0]) and len(shards[1]) == len(positions[1])
    assert torch.equal(torch.cat(shards).sort().values, labels.sort().values)


def test_torchruns_processes_say_each_error_once(finished_run):
    # who says what under torchrun (docs/EVALUATION.md): rank 0 every error; another
    # rank what it met alone, and what every rank meets alike only as the first process
    # of another machine; a lost peer is rank 0's to say, a timeout the waiting rank's
    from facecluster.data import BadImageError

    ranks = evaluation.Ranks(1, 2, 1, 2)
    with pytest.raises(ConfigError) as refused:  # a setting every rank refuses
        evaluate_run(finished_run, ["route.top_m=4"], ranks)
    said = evaluation.said_by_this_rank
    assert said(refused.value, 0, 0) and not said(refused.value, 1, 1)
    assert said(refused.value, 2, 0)  # another machine's first process
    alone = BadImageError("cannot decode x.jpg")  # met in this rank's shard
    assert said(alone, 1, 1)

    def failing(message):
        def op(*args, **kwargs):
            raise RuntimeError(message)

        return op

    with pytest.raises(evaluation.PeerStopped) as lost:
        ranks._collective(failing("[pair.cc:561] Connection closed by peer [127.0.0.1]:1"))
    assert said(lost.value, 0, 0) and not said(lost.value, 1, 1)
    with pytest.raises(TimeoutError, match="waited 2:00:00 for the other processes"):
        ranks._collective(failing("[unbound_buffer.cc:78] Timed out waiting 5000ms for recv"))
    with pytest.raises(BadImageError):  # share_bad_images' check: itself, on every rank
        ranks._collective(lambda: (_ for _ in ()).throw(BadImageError("at least 2 of 61")))
    summed = torch.arange(6).view(2, 3).t()  # not contiguous: it would sum a copy
    with pytest.raises(ValueError, match="contiguous"):
        ranks.sum(summed)


def test_after_a_ddp_training_the_processes_evaluate_together_unless_a_gpu_is_not_theirs(
    smoke_cfg, monkeypatch
):
    # train.py's processes evaluate the run together, each on its own GPU or the CPU;
    # rank 0 alone evaluates on the GPU that eval.device=cuda:N names, and on a GPU after
    # a training on CPUs (gloo), whose processes all took cuda:0 or were refused as
    # more processes than GPUs, after the whole training
    import torch.distributed as dist

    class GroupMade(Exception):
        pass

    def new_group(**kwargs):
        raise GroupMade

    rank, backend, device = 0, "gloo", "cpu"
    for name, value in {
        "is_available": lambda: True,
        "is_initialized": lambda: True,
        "get_world_size": lambda: 2,
        "get_rank": lambda: rank,
        "get_backend": lambda: backend,
        "broadcast_object_list": lambda word, src: None,  # rank 0's word: True
        "new_group": new_group,
    }.items():
        monkeypatch.setattr(dist, name, value)
    monkeypatch.setattr(evaluation, "eval_device", lambda cfg: torch.device(device))

    def entered(*overrides):
        with evaluation.training_ranks(smoke_cfg(*overrides), finished=True) as ranks:
            return ranks

    for rank, backend, device in [(0, "gloo", "cpu"), (1, "nccl", "cuda"), (0, "gloo", "cuda")]:
        if (device, backend) == ("cuda", "gloo"):  # a GPU, after a training on CPUs
            assert entered() == evaluation.Ranks()
            rank = 1
            assert entered() is None
        else:  # every process evaluates: the gloo group is made
            with pytest.raises(GroupMade):
                entered()
    rank, backend, device = 0, "nccl", "cuda"
    assert entered("eval.device=cuda:1") == evaluation.Ranks()
    rank = 1
    assert entered("eval.device=cuda:1") is None
    # a group this process cannot make (its own error, or a peer gone): rank 0 says
    # the cause's first line, not only that another process stopped
    rank, backend, device = 0, "gloo", "cpu"

    def unbound(**kwargs):
        raise RuntimeError("cannot bind to port 29517: Address already in use\nC++ trace")

    monkeypatch.setattr(dist, "new_group", unbound)
    with pytest.raises(evaluation.PeerStopped) as stopped:
        entered()
    assert str(stopped.value) == (
        "another process of this run stopped (its error is above), or this one could not "
        "join it: cannot bind to port 29517: Address already in use"
    )
    rank = 1  # another rank says its own (rank 0 waits for it in the group's making)
    with pytest.raises(
        ConnectionError,
        match="could not join the evaluation's process group: "
        "cannot bind to port 29517: Address already in use$",
    ):
        entered()
    assert evaluation.said_by_this_rank(ConnectionError(), 1, 0)


def _join_evaluation(rank: int, port: int, cfg, rank1_joins: bool, out: dict) -> None:
    """A DDP training's process (2 gloo ranks) entering its evaluation's group, with a
    2-second wait to make it and 60 for its collectives; rank 1 then waits 4 s."""
    import time
    from datetime import timedelta

    import torch.distributed as dist

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    evaluation.JOIN_TIMEOUT = timedelta(seconds=2)
    evaluation.RANKS_TIMEOUT = timedelta(seconds=60)
    evaluation.eval_device = lambda cfg: torch.device("cpu")
    if rank == 1 and not rank1_joins:

        def unbound(**kwargs):
            raise RuntimeError("cannot bind to port 29517: Address already in use")

        dist.new_group = unbound
    start = time.monotonic()
    try:
        with evaluation.training_ranks(cfg, finished=True) as ranks:
            if rank == 1:
                time.sleep(4)  # rank 0 waits in the next collective
            dist.barrier(group=ranks.group)
        said = "evaluated"
    except Exception as e:
        said = f"{type(e).__name__}: {str(e).partition(chr(10))[0]}"
    finally:
        dist.destroy_process_group()
    out[rank] = (said, time.monotonic() - start)


@pytest.mark.parametrize("rank1_joins", [False, True], ids=["rank1-cannot-join", "joined"])
def test_a_rank_that_cannot_join_the_evaluation_is_not_waited_for_the_evaluations_timeout(
    smoke_cfg, rank1_joins
):
    # after a DDP training, a rank that could not make the evaluation's gloo group (a
    # port it cannot bind) left rank 0 waiting for it as long as the evaluation's
    # collectives may wait (2 h): the group is made within a wait of its own, and its
    # collectives then wait the evaluation's time (a rank that is late in one is waited for)
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = mp.Manager().dict()
    mp.set_forkserver_preload([__name__])
    mp.start_processes(_join_evaluation, args=(port, smoke_cfg(), rank1_joins, out),
                       nprocs=2, join=True, start_method="forkserver")  # fmt: skip
    if rank1_joins:
        assert [out[r][0] for r in (0, 1)] == ["evaluated", "evaluated"]
        return
    assert out[1][0] == (
        "ConnectionError: could not join the evaluation's process group: cannot bind to "
        "port 29517: Address already in use"
    )
    assert out[0][0].startswith(
        "PeerStopped: another process of this run stopped (its error is above), or this one "
        "could not join it: "
    )
    assert out[0][1] < 30  # its 2 s to make the group, not the collectives' 60


def test_each_process_computes_a_single_models_class_means_over_a_shard(
    finished_run, tmp_path, monkeypatch
):
    # a single model's class means (a pass over the training split, 17M images at
    # Glint360K's size): each of torchrun's processes embeds its shard of the split,
    # and only rank 0 keeps the means in eval/class_means.pt
    class Apart(evaluation.Ranks):  # no process group here: nothing is sent
        def _collective(self, op, *args, **kwargs):
            return None

    run = RunFolder(shutil.copytree(finished_run, tmp_path / "run"))
    run.eval_file("single_means").unlink(missing_ok=True)  # another test's
    cfg = run.finished_config()
    read, embed_sums = [], evaluation.embedding_class_sums
    monkeypatch.setattr(
        evaluation,
        "embedding_class_sums",
        lambda embed, loader, *a, **k: (
            read.append(list(loader.sampler)) or embed_sums(embed, loader, *a, **k)
        ),
    )
    for rank in (1, 0):
        bench = evaluation.Bench(cfg, "run", None, Apart(rank, 2))
        evaluation._single_model(run, cfg, bench)
        assert run.eval_file("single_means").is_file() == (rank == 0)
    train = len(bench.dm.split_labels("train"))
    assert not set(read[0]) & set(read[1]) and sorted(read[0] + read[1]) == list(range(train))


def test_top_m_sweep_doubles_up_to_k_and_keeps_the_runs_top_m():
    # sub-net passes over the test split: under 2K, not K(K+1)/2 (2,080 at K = 64)
    assert top_m_sweep(64, 1) == [1, 2, 4, 8, 16, 32, 64]
    assert sum(top_m_sweep(64, 1)) == 127
    assert top_m_sweep(8, 3) == [1, 2, 3, 4, 8]
    assert top_m_sweep(3, 1) == [1, 2, 3] and top_m_sweep(1, 1) == [1]


def test_the_top_m_sweep_records_the_values_it_scored(finished_run, monkeypatch):
    # K = 3 here, where positions and values coincide: sweep 1 and 3 only
    monkeypatch.setattr(evaluation, "top_m_sweep", lambda clusters, top_m: [1, clusters])
    sessions = []
    timings = evaluation.Bench.timings

    def recorded(bench, predictors):
        sessions.append([p.name for p in predictors])
        return timings(bench, predictors)

    monkeypatch.setattr(evaluation.Bench, "timings", recorded)
    quick = ["eval.plots=false", "eval.timing_batches=1", "route.top_m=3"]
    report = evaluate_run(finished_run, quick)
    assert [p["top_m"] for p in report.top_m_sweep] == [1, 3]
    assert report.rows[0].model == "clustered, routed (top_m=3, moe)"
    assert report.top_m_sweep[1]["top1"] == report.rows[0].top1
    # and its speed: one timing per predictor, the table's (it was timed again); the
    # sweep's other top_m in the table's session (a session of its own, apart, bent
    # its curve when the machine's speed drifted between the two)
    assert report.top_m_sweep[1]["throughput"] == report.rows[0].throughput
    # one timed batch has no range: "±0%" read as a measured spread
    assert report.rows[0].throughput_spread is None
    assert " ±" not in evaluation.format_table(report.rows)
    assert len(sessions) == 1 and "clustered, routed (top_m=1, moe)" in sessions[0]
    assert sorted(sessions[0]) == sorted({*sessions[0]})


@pytest.mark.slow
def test_macro_scores_equal_torchmetrics_and_stay_linear_in_the_identities():
    # torchmetrics' macro metrics build a [C, C] confusion matrix at every update (69 GB
    # at 93K identities); MacroScores keeps three [C] counts and gives the same numbers:
    # identities neither predicted nor present are left out, 0/0 counts 0
    from torchmetrics.classification import (
        MulticlassF1Score,
        MulticlassPrecision,
        MulticlassRecall,
    )

    from facecluster.evaluation import MacroScores

    torch.manual_seed(0)
    c = 9  # identity 8 never appears, 7 is only predicted, 6 is never predicted
    labels = torch.randint(0, 7, (300,))
    predicted = torch.where(torch.rand(300) < 0.6, labels, torch.randint(0, 8, (300,)))
    predicted[predicted == 6] = 5
    ours, theirs = (
        MacroScores(c),
        {
            "precision": MulticlassPrecision(c, average="macro"),
            "recall": MulticlassRecall(c, average="macro"),
            "f1": MulticlassF1Score(c, average="macro"),
        },
    )
    for rows in (slice(0, 128), slice(128, 300)):
        ours.update(predicted[rows], labels[rows])
        for metric in theirs.values():
            metric.update(predicted[rows], labels[rows])
    got = ours.compute()
    for name, metric in theirs.items():
        assert got[name] == pytest.approx(float(metric.compute()), abs=1e-6), name
    big = MacroScores(2_000_000)  # WebFace42M's identities: three [C] counts
    big.update(torch.tensor([5, 7, 1_999_999]), torch.tensor([5, 8, 1_999_999]))
    # identities 5, 7 (predicted only: recall 0/0, counted as 0), 8 and 1,999,999
    assert big.compute()["recall"] == pytest.approx(2 / 4)


def test_evaluation_reads_the_test_split_once_and_each_subnet_embeds_a_face_once(
    finished_run, monkeypatch
):
    """Every predictor (the table's, the top_m sweep's, the decision weights') answers
    each test batch in one pass over the split, and each network embeds each face once
    in it: a pass per predictor read the split 11 times here, and ran about 3K + 3
    sub-net forwards a face beside a backbone forward per predictor (at K = 64, 209
    network forwards against 65 now, docs/EVALUATION.md)."""
    passes, embedded, counting = [], {}, []
    answers, embed_from = evaluation.Bench._answers, TwoStageIdentifier._embed_from

    def spy(self, loader, predictors, shared, k, what="test split"):
        predictors = list(predictors)
        if predictors:  # none: no batch is read
            passes.append((what, [p.name for p in predictors]))
        counting.append(True)
        try:
            for labels, found in answers(self, loader, predictors, shared, k, what):
                embedded.setdefault(what, {}).setdefault("faces", 0)
                embedded[what]["faces"] += len(labels)
                yield labels, found
        finally:
            counting.pop()

    def count(self, net, features):
        if counting:
            seen = embedded.setdefault(passes[-1][0], {})
            seen[id(net)] = seen.get(id(net), 0) + len(features)
        return embed_from(self, net, features)

    monkeypatch.setattr(evaluation.Bench, "_answers", spy)
    monkeypatch.setattr(TwoStageIdentifier, "_embed_from", count)
    report = evaluate_run(finished_run)
    (what, names), *rest = passes
    assert what == "test split" and len(names) == len(set(names)) and not rest, passes
    routed = [name.split(",")[1] for name in names if "routed (top_m=" in name]  # K = 3
    assert routed == [" routed (top_m=1", " routed (top_m=2", " routed (top_m=3"]
    assert [f"generalist weight {w:g}" for w in evaluation.ALPHAS] == names[-5:]
    assert set(names) >= {row.model for row in report.rows}  # the table's 4 rows too
    ident = TwoStageIdentifier.from_run(finished_run)
    counts = embedded["test split"]
    faces = counts.pop("faces")
    # the router backbone and the 3 sub-nets (each net seen through its id): every face
    # once by each, whichever of the 11 predictors asked
    assert sorted(counts.values()) == [faces] * 4, counts
    assert report.top_m_sweep[0]["top1"] == report.rows[0].top1  # the table's routed row
    assert report.top_m_sweep[0]["throughput"] == report.rows[0].throughput
    assert report.top_m_sweep[-1]["top_m"] == 3 == ident.num_clusters
    # each sweep's figure is its own predictor's, as a lone identify gives it: top_m,
    # and moe's generalist weight (from 0, the sub-nets' term, to 1, the class means)
    from facecluster.builders import build_datamodule
    from facecluster.data.transforms import normalize_images

    cfg = RunFolder(finished_run).finished_config()
    ident = TwoStageIdentifier.from_run(finished_run).eval()
    right = {("top_m", m): 0 for m in (1, 2, 3)} | {("w", w): 0 for w in evaluation.ALPHAS}
    loader = build_datamodule(cfg, eval_batch_size=cfg.eval.batch_size).test_dataloader()
    with torch.no_grad():
        for images, labels in loader:
            x = normalize_images(images)
            for kind, value in right:
                ask = {"top_m": value} if kind == "top_m" else {"generalist_weight": value}
                right[kind, value] += int((ident.identify(x, **ask).answer(None) == labels).sum())
    faces = len(loader.dataset)
    swept = {("top_m", r["top_m"]): r["top1"] for r in report.top_m_sweep}
    swept |= {("w", r["generalist_weight"]): r["top1"] for r in report.alpha_sweep}
    assert swept == pytest.approx({key: n / faces for key, n in right.items()}, abs=1e-12)
    assert len({swept["w", w] for w in evaluation.ALPHAS}) > 1  # the weights differ
    # eval.sweeps=false: the table's rows are its only passes (the sweeps are about 2K
    # sub-net passes per face beside the table's K + 1, at K = 64 two thirds of the
    # evaluation), the same figures, and no sweep or sweep plot is written
    passes.clear()
    assert (finished_run / "eval" / "top_m.png").is_file()  # the full evaluation's
    table = evaluate_run(finished_run, ["eval.sweeps=false"])
    assert passes == [("test split", [row.model for row in report.rows])]
    for new, old in zip(table.rows, report.rows, strict=True):
        assert (new.model, new.top1, new.top5, new.f1) == (old.model, old.top1, old.top5, old.f1)
    assert table.top_m_sweep == table.alpha_sweep == []
    saved = json.loads((finished_run / "eval" / "results.json").read_text())
    assert saved["top_m_sweep"] == saved["alpha_sweep"] == []
    for stale in ("top_m.png", "alpha.png"):  # the earlier evaluation's: gone with it
        assert not (finished_run / "eval" / stale).exists(), stale
    assert (finished_run / "eval" / "class_means_pca.png").is_file()


def test_the_evaluation_cost_benchmark_runs_on_a_finished_run(finished_run, tmp_path, capsys):
    # docs/EVALUATION.md's measurement (bench/eval_cost.py) on a copy of the smoke run:
    # with the sweeps or without, the scoring passes send each test and unseen face
    # through the router backbone (whose embedding the stage-1 model's head and nearest
    # class mean rows share: it ran twice a face before) and the K sub-nets, and the
    # sweeps add only their timing
    run = shutil.copytree(finished_run, tmp_path / "run")
    before = {p: p.read_bytes() for p in run.glob("eval/*") if p.is_file()}  # other tests'
    out = tmp_path / "eval_cost.json"
    run_script("bench/eval_cost.py", "--run", str(run), "--rounds", "1", "--out", str(out))
    measured = json.loads(out.read_text())
    faces = measured["test_faces"] + measured["unseen_test_faces"]
    assert measured["clusters"] == 3 and measured["test_faces"] > 0
    for variant in ("sweeps", "table only"):
        assert measured[variant]["scoring_network_images"] == faces * (3 + 1), variant
    assert measured["sweeps"]["network_images"] > measured["table only"]["network_images"]
    assert measured["code"] and measured["machine"]["threads"] >= 1
    # the benchmark evaluated a copy: the run's own results as they were
    assert {p: p.read_bytes() for p in run.glob("eval/*") if p.is_file()} == before
    # a folder that is no run: refused in argparse's one line, not a traceback
    with pytest.raises(SystemExit):
        run_script("bench/eval_cost.py", "--run", str(tmp_path), "--out", str(out))
    assert "not a facecluster run folder" in capsys.readouterr().err


def test_evaluate_writes_the_table_sweeps_and_plots(finished_run):
    report = evaluate_run(finished_run)
    models = [r.model for r in report.rows]
    assert models[0].startswith("clustered, routed") and "ISM" in models[1]
    assert len(report.rows) == 4 and len(report.top_m_sweep) == 3 and len(report.alpha_sweep) == 5
    routed, ism = report.rows[0], report.rows[1]
    assert ism.routing_accuracy is None
    assert routed.subnet_forwards == 1 and ism.subnet_forwards == 3
    # routing accuracy: the test faces whose identity is in the cluster the router picks
    # for their stage-1 embedding
    from facecluster.builders import build_datamodule
    from facecluster.data.transforms import normalize_images

    # top-1: the routed answers (route.top_m, the fitted decision unit) and the stage-1
    # head's best row that equal the face's identity, counted here (a table that showed
    # another figure under top-1 passed)
    cfg = RunFolder(finished_run).finished_config()
    ident = TwoStageIdentifier.from_run(finished_run).eval()
    head = F.normalize(RunFolder(finished_run).stage1_weights().head.float(), dim=1)
    found = faces = right = stage1_right = right5 = stage1_right5 = 0
    with torch.no_grad():
        for images, labels in build_datamodule(
            cfg, eval_batch_size=cfg.eval.batch_size
        ).test_dataloader():
            x = normalize_images(images)
            embedded = ident.embed(x)
            clusters = ident.router.route(embedded, 1)
            found += int(ident.assignment.contains(labels[:, None], clusters).any(dim=1).sum())
            right += int((ident.identify(x).answer(None) == labels).sum())
            stage1_right += int(((embedded @ head.T).argmax(dim=1) == labels).sum())
            # top-5: the identity among the routed search's 5 best candidates
            five = ident.identify(x, k=5).candidates
            right5 += int((five == labels[:, None]).any(dim=1).sum())
            best5 = (embedded @ head.T).topk(5, dim=1).indices
            stage1_right5 += int((best5 == labels[:, None]).any(dim=1).sum())
            faces += len(labels)
    assert routed.routing_accuracy == pytest.approx(found / faces, abs=1e-12)
    assert 0 < found < faces  # at this size the router misses some faces, not all
    assert routed.top1 == pytest.approx(right / faces, abs=1e-12)
    assert models[2] == "stage-1 model (one head)"
    assert report.rows[2].top1 == pytest.approx(stage1_right / faces, abs=1e-12)
    assert routed.top5 == pytest.approx(right5 / faces, abs=1e-12) and routed.top5 > routed.top1
    assert report.rows[2].top5 == pytest.approx(stage1_right5 / faces, abs=1e-12)
    assert all(r.top1 <= r.top5 <= 1 for r in report.rows)
    # every cluster searched: every face's own among them
    assert report.top_m_sweep[-1]["routing_accuracy"] == 1.0
    out = finished_run / "eval"
    for name in (
        "results.md",
        "results.csv",
        "results.json",
        "top_m.png",
        "alpha.png",
        "class_means_pca.png",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "results.json").read_text())["rows"][0]["model"] == models[0]

    # results.md and results.csv: each cell, read by its column's name, is the report's
    # figure under that name (a figure written under another column's name passed)
    def cells(line):
        return [cell.strip() for cell in line.strip().strip("|").split("|")]

    header, _, *body = [cells(line) for line in (out / "results.md").read_text().splitlines()]
    table = [dict(zip(header, line, strict=True)) for line in body]
    with open(out / "results.csv", newline="") as f:
        saved = list(csv.DictReader(f))
    assert len(table) == len(saved) == len(report.rows)
    assert not any(column.startswith("FNIR") for column in header)  # a closed-set run
    for row, md, flat in zip(report.rows, table, saved, strict=True):
        spread = row.throughput_spread
        shown = {
            "run": row.run,
            "model": row.model,
            "top-1": f"{row.top1:.2%}",
            "top-5": f"{row.top5:.2%}",
            "macro P": f"{row.precision:.2%}",
            "macro R": f"{row.recall:.2%}",
            "macro F1": f"{row.f1:.2%}",
            "routing acc": "" if row.routing_accuracy is None else f"{row.routing_accuracy:.2%}",
            "sub-net fwd/img": f"{row.subnet_forwards:g}",
            f"img/s @{report.batch_size}": f"{row.throughput:.0f}"
            + ("" if spread is None else f" ±{spread:.0%}"),
            "ms @1": f"{row.latency_ms:.1f}",
            "params": f"{row.params / 1e6:.2f}M",
        }
        for column in header:
            if column.endswith(" verif."):
                name = column.removesuffix(" verif.")
                value, std = row.verification.get(name), row.verification_std.get(name)
                shown[column] = "" if value is None else f"{value:.2%} ±{std:.2%}"
        assert md == shown, row.model
        # the CSV: every figure as str() writes it (exact), "" for None and for a field
        # only other rows have
        fields = dataclasses.asdict(row)
        assert fields.pop("fnir") == {}
        fields.update({f"{k}_verification": v for k, v in fields.pop("verification").items()})
        std = fields.pop("verification_std")
        fields.update({f"{k}_verification_std": v for k, v in std.items()})
        assert set(fields) <= set(flat)
        written = {k: "" if v is None else str(v) for k, v in fields.items()}
        assert flat == {**dict.fromkeys(flat, ""), **written}, row.model
    # a write that fails half-way (a full disk) leaves the last complete results, all three
    before = {p.name: p.read_bytes() for p in out.glob("results.*")}
    run = RunFolder(finished_run)
    report.rows[0] = dataclasses.replace(report.rows[0], top1=0.5)  # another evaluation
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(evaluation.json, "dumps", lambda *a, **k: (_ for _ in ()).throw(OSError(28)))
        with pytest.raises(OSError):
            evaluation._write(report, run, run.finished_config([]), [], evaluation.Ranks())
    assert {p.name: p.read_bytes() for p in out.glob("results.*")} == before
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_the_class_means_plot_projects_a_sample_of_many_identities(tmp_path, monkeypatch):
    # at 300K identities the PCA of every mean took 25 s and 1.8 GB: a seeded sample
    # is projected and shown; the dispersion in the titles still covers every identity
    from facecluster import plots

    torch.manual_seed(0)
    means = F.normalize(torch.randn(60, 8), dim=1)
    assignment = cluster_identities(means, 3, "kmeans", seed=0)
    monkeypatch.setattr(plots, "PLOTTED_MEANS", 25)
    svd_rows = []
    real_svd = torch.linalg.svd
    monkeypatch.setattr(
        torch.linalg, "svd", lambda x, **k: svd_rows.append(len(x)) or real_svd(x, **k)
    )
    path = plots.class_means_plot(tmp_path / "means.png", assignment, seed=0)
    assert path.is_file() and svd_rows == [25]


def test_evaluation_times_faces_drawn_across_the_test_split(finished_run):
    # the split's first batch is a few identities in a row (they route to a few
    # sub-nets): the timing batch is drawn across the split instead, the same each time
    cfg = RunFolder(finished_run).finished_config(["eval.batch_size=16"])
    bench = evaluation.Bench(cfg, "run", None)
    first = next(iter(bench.loader))[1].tolist()
    faces, labels = bench.timing_faces
    assert len(faces) == len(labels) == 16
    assert len(set(labels)) > len(set(first))
    again = evaluation.Bench(cfg, "run", None)
    assert torch.equal(again.timing_faces[0], faces)


def test_evaluating_on_other_data_says_so_before_reading_its_images(finished_run, tmp_path):
    # other data whose images do not decode: the timing batch was read before the data
    # was checked against the run, so the error called it a damaged data set
    for person in "abcdef":
        (tmp_path / person).mkdir()
        for i in range(12):
            (tmp_path / person / f"{i}.jpg").write_bytes(bytes(range(200)) * 3)
    with pytest.raises(ConfigError, match=r"the data gives 6 identities, the run trained on"):
        evaluation.evaluate_run(finished_run, [f"data.root={tmp_path}"])
    with pytest.raises(ConfigError, match=r"to train on other identities, start a new run\)$"):
        evaluation.evaluate_run(finished_run, [f"data.root={tmp_path}"])


@pytest.mark.slow
def test_evaluation_runs_under_the_precisions_autocast(finished_run, tmp_path, monkeypatch):
    # trainer.precision=auto on CPU: fp32, no autocast; bf16-mixed: every predictor
    # and the single model's class-mean pass run under bf16 autocast, and still work;
    # the decision unit's fit does not: calibration.json serves every later export
    cfg = RunFolder(finished_run).finished_config([])
    assert eval_autocast(cfg, torch.device("cpu")) is contextlib.nullcontext
    bf16 = RunFolder(finished_run).finished_config(["trainer.precision=bf16-mixed"])
    with eval_autocast(bf16, torch.device("cpu"))():
        assert torch.get_autocast_dtype("cpu") == torch.bfloat16
    alias = RunFolder(finished_run).finished_config(["trainer.precision=bf16"])  # Lightning's
    assert eval_autocast(alias, torch.device("cpu")) is not contextlib.nullcontext
    fp32 = evaluate_run(finished_run)
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    (run / "calibration.json").unlink()
    fitted_under = []
    calibrate = TwoStageIdentifier.calibrate

    def spy(self, *args, **kwargs):
        fitted_under.append(torch.is_autocast_enabled("cpu"))
        return calibrate(self, *args, **kwargs)

    monkeypatch.setattr(TwoStageIdentifier, "calibrate", spy)
    mixed = evaluate_run(run, ["trainer.precision=bf16-mixed"])
    assert fitted_under == [False]
    for a, b in zip(fp32.rows, mixed.rows, strict=True):
        assert a.model == b.model and abs(a.top1 - b.top1) <= 0.1, (a.model, a.top1, b.top1)


def test_a_moved_run_evaluates_with_the_output_dir_it_is_in(finished_run, tmp_path):
    # the saved output_dir may be relative to another directory, or the run moved:
    # evaluation and export look beside the folder where it is now (output_dir/.cache)
    moved = shutil.copytree(finished_run, tmp_path / "elsewhere" / finished_run.name)
    cfg = RunFolder(moved).finished_config()
    assert cfg.output_dir == str(moved.parent) and cfg.cache_dir() == moved.parent / ".cache"
    assert RunFolder(moved).finished_config(["output_dir=/x"]).output_dir == "/x"


def test_a_clustering_that_is_not_the_runs_is_named_in_one_line(finished_run, tmp_path, capsys):
    # config.yaml's num_clusters edited by hand was ignored without a word (clusters.pt
    # decided); a damaged clusters.pt ended evaluate.py and a resume in a traceback
    run = shutil.copytree(finished_run, tmp_path / "run")
    config = run / "config.yaml"
    config.write_text(config.read_text().replace("num_clusters: 3", "num_clusters: 4"))
    said = r"clusters.pt holds 3 clusters, but the run's clustering.num_clusters is 4"
    with pytest.raises(ConfigError, match=said):
        RunFolder(run).assignment(4)
    for command in (evaluate.main, cli.train_main):
        key = "run" if command is evaluate.main else "resume"
        before = {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()}
        assert command([f"{key}={run}", "eval.plots=false"]) == 2
        assert re.search(f"error: .*{said}", capsys.readouterr().err)
        assert {p: p.stat().st_mtime_ns for p in run.rglob("*") if p.is_file()} == before
    config.write_text((finished_run / "config.yaml").read_text())
    (run / "clusters.pt").write_bytes(b"junk")
    assert evaluate.main([f"run={run}", "eval.plots=false"]) == 2
    assert "clusters.pt (cluster assignment) cannot be read" in capsys.readouterr().err


def test_routed_rows_of_two_weights_have_two_names(finished_run):
    # an evaluation scores each row name once: route.alpha=0.2500001 was named as the
    # alpha sweep's 0.25, and one of the two took the other's figures
    ident = TwoStageIdentifier.from_run(finished_run, route={"decision": "linear"})
    assert ident.decision_name(0.25) == "alpha=0.25" and ident.decision_name(1.0) == "alpha=1"
    assert ident.decision_name(0.2500001) == "alpha=0.2500001"
    assert ident.routed(1, 0.2500001).name != ident.routed(1, 0.25).name


@pytest.mark.slow
def test_exported_identifier_loads_without_training_code(finished_run, tmp_path):
    # linear: moe's fitted numbers come from an evaluation, which this test does not need
    # (it passed only after another test had evaluated the run)
    ident = TwoStageIdentifier.from_run(finished_run, route={"decision": "linear"})
    path = ident.export(tmp_path / "identifier.pt")
    loaded = TwoStageIdentifier.load(path)
    images = torch.randn(6, 3, 112, 112)
    assert torch.equal(
        ident.identify(images, top_m=2).identity, loaded.identify(images, top_m=2).identity
    )
    assert loaded.class_names == ident.class_names and len(loaded.class_names) == 12
    # A version-1 export (the config's model section and image_size) still loads.
    payload = torch.load(path, weights_only=False)
    backbone = payload.pop("backbone")
    payload["version"] = 1
    payload["class_names"] = ident.class_names  # a list before version 4
    payload["image_size"] = backbone.pop("image_size")
    payload["model"] = {
        "backbone": backbone.pop("name"),
        "embedding_dim": backbone.pop("embedding_dim"),
        "kwargs": {k: v for k, v in backbone.items() if k not in ("pretrained", "dropout")},
    }
    torch.save(payload, tmp_path / "v1.pt")
    old = TwoStageIdentifier.load(tmp_path / "v1.pt")
    assert torch.equal(old.identify(images).identity, ident.identify(images).identity)
    torch.save({"a": 1}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not an exported facecluster identifier"):
        TwoStageIdentifier.load(tmp_path / "other.pt")


@pytest.mark.parametrize("index", ["hnsw", "clusters"])
def test_an_exported_router_index_is_read_not_built_again(
    finished_run, tmp_path, monkeypatch, index
):
    # building an ivf, clusters or hnsw index over 360K identities took 1.5-6 minutes
    # (docs/SCALE.md): the export keeps it, a load with the same settings reads it
    from facecluster.inference import router as router_module

    ident = TwoStageIdentifier.from_run(finished_run, route={"index": index})
    path = ident.export(tmp_path / "identifier.pt")
    queries = torch.randn(50, ident.assignment.class_means.shape[1])
    with pytest.MonkeyPatch.context() as patch:
        for builder in ("build_index", "cluster_lists_index"):
            patch.setattr(router_module, builder, lambda *a, **k: pytest.fail("built again"))
        loaded = TwoStageIdentifier.load(path)
        assert torch.equal(loaded.router.route(queries, 2), ident.router.route(queries, 2))
    built = []
    for builder in ("build_index", "cluster_lists_index"):
        real = getattr(router_module, builder)
        wrapped = lambda *a, _real=real, **k: built.append(1) or _real(*a, **k)  # noqa: E731
        monkeypatch.setattr(router_module, builder, wrapped)
    TwoStageIdentifier.load(path, route={"ivf_nprobe": 1, "hnsw_ef_search": 8})
    assert built == [1]  # other index settings: built for them
    flat = TwoStageIdentifier.from_run(finished_run, route={"index": "flat"})
    payload = torch.load(flat.export(tmp_path / "flat.pt"), weights_only=True)
    assert "router_parts" not in payload  # a flat index is a copy of the class means


def test_an_exports_crafted_or_older_router_index_is_never_handed_to_faiss(
    finished_run, tmp_path, caplog
):
    # a crafted part is refused naming the export; faiss's serialised bytes, which
    # exports kept before 2026-12-06, are not read (built again, with a warning)
    ident = TwoStageIdentifier.from_run(finished_run, route={"index": "hnsw"})
    payload = torch.load(ident.export(tmp_path / "identifier.pt"), weights_only=True)
    neighbours = payload["router_parts"]["neighbors"]
    neighbours[neighbours == 1] = 1 << 30
    torch.save(payload, tmp_path / "crafted.pt")
    with pytest.raises(ValueError, match=r"crafted\.pt: the saved router index's neighbors"):
        TwoStageIdentifier.load(tmp_path / "crafted.pt")
    del payload["router_parts"]
    blob = faiss.serialize_index(ident.router.index)
    payload["router_index"] = torch.from_numpy(blob)
    torch.save(payload, tmp_path / "older.pt")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(faiss, "deserialize_index", lambda *a: pytest.fail("faiss read the bytes"))
        older = TwoStageIdentifier.load(tmp_path / "older.pt")
    assert "saved by an earlier facecluster as faiss's bytes" in caplog.text
    queries = torch.randn(30, ident.assignment.class_means.shape[1])
    assert torch.equal(older.router.route(queries, 2), ident.router.route(queries, 2))


def test_the_decision_unit_is_fitted_on_a_seeded_sample_of_validation_faces(
    finished_run, tmp_path, monkeypatch
):
    # route.calibration_faces: three numbers need no more faces, and each face costs
    # 40 temperatures x every identity's exponential; the whole validation split of a
    # 2M-identity set would take hundreds of CPU hours. The sample is the same each time.
    run = shutil.copytree(finished_run, tmp_path / finished_run.name)
    fitted_on = []
    calibrate = TwoStageIdentifier.calibrate

    def spy(self, loader, *args, **kwargs):
        batches = list(loader)
        fitted_on.append(torch.cat([labels for _, labels in batches]))
        return calibrate(self, batches, *args, **kwargs)

    monkeypatch.setattr(TwoStageIdentifier, "calibrate", spy)
    overrides = ["route.calibration_faces=7", "eval.timing_batches=1", "eval.plots=false"]
    for _ in range(2):
        (run / "calibration.json").unlink(missing_ok=True)
        evaluate_run(run, overrides)
    assert len(fitted_on) == 2 and len(fitted_on[0]) == 7
    assert torch.equal(fitted_on[0], fitted_on[1])
    (run / "calibration.json").unlink()
    evaluate_run(run, overrides[1:])  # the default takes the whole split here
    assert len(fitted_on[2]) > 7 and set(fitted_on[0].tolist()) <= set(fitted_on[2].tolist())


def test_a_calibrated_closed_set_run_exports_without_its_data(finished_run, tmp_path, caplog):
    # the export reads the data only for a pass over the validation split (a fit of the
    # decision unit not made yet, an open-set threshold): a run folder copied elsewhere
    from facecluster.deploy import export_run

    with caplog.at_level(logging.WARNING, logger="facecluster.deploy"):
        export_run(finished_run, tmp_path / "first", device="cpu")  # calibrates if needed
    # it says it has no unknown threshold (nothing on screen did: a walkthrough)
    assert "closed-set run (data.unseen_fraction=0): the export has no unknown" in caplog.text
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved)
    config = moved / "config.yaml"
    text = config.read_text()
    root = load_config(config).data.root
    config.write_text(text.replace(root, "/nonexistent/faces"))
    written = export_run(moved, tmp_path / "second", device="cpu")
    assert written == [tmp_path / "second" / "identifier.pt", tmp_path / "second" / "backbone.pth"]
    # evaluating needs the data: the message says how to point at its new place (it
    # said "give the folder that holds one sub-folder per identity", a walkthrough)
    with pytest.raises(
        ConfigError, match=r"'/nonexistent/faces' does not exist: .* add data.root"
    ) as e:
        evaluate_run(moved)
    # naming the commands as they are typed (it said "its resume= or evaluate.py command")
    assert "`python train.py resume=<run>` or `python evaluate.py` command" in str(e.value)


@pytest.mark.parametrize("part", ["stage-1 backbone", "sub-net head"])
def test_exporting_a_run_whose_weights_are_not_finite_is_refused_naming_the_tensor(
    finished_run, tmp_path, monkeypatch, capsys, part
):
    # such an export answered every face with an identity of cluster 0
    from facecluster.cli import export_main
    from facecluster.deploy import export_run

    stage1, subnets = RunFolder.stage1_weights, RunFolder.subnet_weights
    backbone = stage1(RunFolder(finished_run)).backbone
    first = next(name for name, t in backbone.items() if t.is_floating_point())

    def nan_stage1(self, *args, **kwargs):
        weights = stage1(self, *args, **kwargs)
        poisoned = {**weights.backbone, first: weights.backbone[first] * math.nan}
        return dataclasses.replace(weights, backbone=poisoned)

    def inf_head(self, *args, **kwargs):
        weights = subnets(self, *args, **kwargs)
        head = weights[1].head.clone().index_fill_(1, torch.tensor([0]), math.inf)
        return [weights[0], dataclasses.replace(weights[1], head=head), *weights[2:]]

    if part == "stage-1 backbone":
        monkeypatch.setattr(RunFolder, "stage1_weights", nan_stage1)
        named = f"router_backbone.{first}"
    else:
        monkeypatch.setattr(RunFolder, "subnet_weights", inf_head)
        named = "heads.1"
    out = tmp_path / "out"
    refused = rf"^run {finished_run}: 1 tensor\(s\) hold NaN or inf \({re.escape(named)}\)$"
    with pytest.raises(ValueError, match=refused):
        export_run(finished_run, out, device="cpu")
    assert export_main([str(finished_run), str(out), "--device", "cpu"]) == 2
    assert f"1 tensor(s) hold NaN or inf ({named})" in capsys.readouterr().err
    assert not out.exists()  # refused before any work


class _RunsCode:
    """Unpickling this runs a shell command: what a malicious model file holds."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


@pytest.mark.slow
def test_files_from_elsewhere_that_would_run_code_are_refused(finished_run, tmp_path):
    marker = tmp_path / "code-ran"
    export = TwoStageIdentifier.from_run(finished_run).export(tmp_path / "identifier.pt")
    payload = torch.load(export, weights_only=True)
    torch.save({**payload, "extra": _RunsCode(marker)}, tmp_path / "crafted.pt")
    with pytest.raises(
        UnsafeFileError, match=r"crafted\.pt \(exported identifier\).*posix\.system"
    ):
        TwoStageIdentifier.load(tmp_path / "crafted.pt")
    # a run folder someone sent: evaluation reads its checkpoints as plain data too
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    subnet = RunFolder(run).subnet_file(1)
    torch.save({**torch.load(subnet, weights_only=True), "x": _RunsCode(marker)}, subnet)
    with pytest.raises(UnsafeFileError, match="sub-net 1"):
        evaluate_run(run)
    torch.save(_RunsCode(marker), RunFolder(run).clusters_path)
    with pytest.raises(UnsafeFileError, match="cluster assignment"):
        RunFolder(run).assignment()
    assert not marker.exists()


def test_lightnings_checkpoint_reads_are_weights_only_whatever_torch_is_told(tmp_path, monkeypatch):
    # Lightning's reader passes weights_only=None where its caller gave none: torch's
    # default then followed TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1, and a crafted checkpoint
    # ran its code (a security review)
    import pickle

    from facecluster.checkpoint_io import AtomicCheckpointIO

    marker = tmp_path / "code-ran"
    torch.save({"state_dict": {}, "x": _RunsCode(marker)}, tmp_path / "crafted.ckpt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    with pytest.raises(pickle.UnpicklingError, match="posix.system"):
        AtomicCheckpointIO().load_checkpoint(tmp_path / "crafted.ckpt", weights_only=None)
    assert not marker.exists()


def test_a_plot_or_table_left_as_a_link_is_replaced_not_written_through(tmp_path):
    # a run folder from elsewhere whose eval/alpha.png named a file of the user's: the
    # evaluation wrote its plot over that file (a security review)
    from facecluster import plots

    victim = tmp_path / "mine.txt"
    victim.write_text("keep")
    link = tmp_path / "run" / "eval" / "alpha.png"
    link.parent.mkdir(parents=True)
    link.symlink_to(victim)
    plt = plots._pyplot()
    plots._save(plt.figure(), link)
    assert victim.read_text() == "keep" and not link.is_symlink()
    assert link.read_bytes().startswith(b"\x89PNG")
    table = tmp_path / "run" / "results.md"
    table.symlink_to(victim)
    RunFolder(tmp_path / "run").save_training_report({}, "| table |")
    assert victim.read_text() == "keep" and table.read_text() == "| table |\n"


@pytest.mark.slow
def test_evaluate_cli_prints_one_table_and_refuses_unfinished_runs(
    finished_run, tmp_path, capsys, monkeypatch
):
    assert evaluate.main([f"run={finished_run}", "eval.plots=false", "eval.timing_batches=1"]) == 0
    assert "clustered, all sub-nets (ISM)" in capsys.readouterr().out
    # a run named twice was evaluated twice, its rows printed twice
    with pytest.raises(SystemExit) as refused:
        evaluate.main([f"run={finished_run}", f"run={finished_run}/"])
    assert refused.value.code == 2
    assert f"run={finished_run}/ names a run given already" in capsys.readouterr().err
    unfinished = tmp_path / "unfinished"
    unfinished.mkdir()
    (unfinished / "config.yaml").write_text((finished_run / "config.yaml").read_text())
    assert evaluate.main([f"run={unfinished}"]) == 2
    assert "finish it with `python train.py resume=" in capsys.readouterr().err
    # a run a command is training now: its resume would be refused, so not advised
    lock = RunFolder(unfinished).stage1_lock_path
    lock.parent.mkdir()
    lock.write_text(json.dumps(_lock_owner()))  # this process's: alive
    assert evaluate.main([f"run={unfinished}"]) == 2
    err = capsys.readouterr().err
    assert f"it is training now (host {_lock_owner()['host']}, pid {os.getpid()}" in err
    assert "resume=" not in err
    lock.unlink()
    # several runs: every one is checked before the first is evaluated
    with monkeypatch.context() as m:
        for name in ("evaluate_run", "_evaluate"):
            m.setattr(evaluation, name, lambda *a: pytest.fail("evaluated before checks"))
        assert evaluate.main([f"run={finished_run}", f"run={unfinished}"]) == 2
    assert "not finished" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="not a facecluster run folder"):
        evaluate_run(tmp_path)
    # a split other than the run's would test on training images: refused, and a
    # resume may not move images between the splits either
    seed = RunFolder(finished_run).config().seed
    with pytest.raises(ConfigError, match=rf"seed: the run has {seed}, the command line 7"):
        evaluate_run(finished_run, ["seed=7", "data.test_fraction=0.3"])
    assert evaluate.main([f"run={finished_run}", "data.val_fraction=0.2"]) == 2
    assert "data.val_fraction: the run has" in capsys.readouterr().err
    # a key only training reads changed nothing, silently
    assert evaluate.main([f"run={finished_run}", "stage2.max_epochs=9", "seed=3"]) == 2
    err = capsys.readouterr().err
    assert "stage2.max_epochs=9: a training setting, which an evaluation does not read" in err
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=4, launcher.name=slurm: training"):
        evaluate_run(finished_run, ["trainer.max_epochs=4", "launcher.name=slurm"])
    # data.* keys only training reads too (evaluation loaders decode on the CPU)
    with pytest.raises(ConfigError, match=r"data.decode=device, data.verification_every=3: tr"):
        evaluate_run(finished_run, ["data.decode=device", "data.verification_every=3"])
    # and model.weights, inside the model section an evaluation keeps: where stage 1
    # started (it was compared with the run's and passed, changing nothing)
    with pytest.raises(ConfigError, match=r"model.weights=w.pt: a training setting"):
        evaluate_run(finished_run, ["model.weights=w.pt"])
    with pytest.raises(ConfigError, match=r"model.weights: the run has it unset, the command"):
        evaluate_run(finished_run, ["model={weights: w.pt}"])  # the section, as a whole
    # nor any trainer.* but the precision (the device is eval.device's), nor run_name
    with pytest.raises(ConfigError, match=r"trainer.devices=2: a training .*eval.device="):
        evaluate_run(finished_run, ["trainer.devices=2", "trainer.precision=32-true"])
    with pytest.raises(ConfigError, match=r"run_name=b, trainer.num_nodes=1: training settings"):
        evaluate_run(finished_run, ["run_name=b", "trainer.num_nodes=1"])
    with pytest.raises(ConfigError, match=r"(?s)resume=.*data.test_fraction: the run has"):
        RunFolder.config_for_resume(str(finished_run), ["data.test_fraction=0.3"])
    # nor by data.root at the same identities with their images in another order (a
    # --shuffle pack of the run's folder): the per-identity split differs, and the test
    # split would hold training images; it was evaluated, and its table written over
    # the run's
    shuffled = tmp_path / "shuffled"
    assert pack_main([str(DEMO), str(shuffled), "--shuffle"]) == 0
    assert evaluate.main([f"run={finished_run}", f"data.root={shuffled}"]) == 2
    assert "not split as the run's were" in capsys.readouterr().err
    # nor by a whole section's override, nor at another image size (the networks'
    # input; an IResNet's fc layer is sized by it: a raw size mismatch after loading)
    with pytest.raises(ConfigError, match=r"data.test_fraction: the run has 0.2, the command"):
        evaluate_run(finished_run, ["data={test_fraction: 0.3, val_fraction: 0.05}"])
    size = RunFolder(finished_run).config().data.image_size
    with pytest.raises(ConfigError, match=rf"data.image_size: the run has {size}, the command"):
        evaluate_run(finished_run, [f"data.image_size={size * 2}"])
    with pytest.raises(ConfigError, match=r"(?s)resume=.*data.image_size: the run has"):
        RunFolder.config_for_resume(str(finished_run), [f"data.image_size={size * 2}"])
    # nor a key inside a fixed section (the model's shape); its speed options may change
    with pytest.raises(
        ConfigError, match=r"model.embedding_dim: the run has \d+, the command line 32\n"
    ):
        evaluate_run(finished_run, ["model.embedding_dim=32"])
    assert RunFolder(finished_run).finished_config(["model.channels_last=true"]).model.channels_last
    # the check starts from the run's config with the other overrides applied: one that
    # repairs a setting no longer valid here (a moved verification file) is enough
    moved = tmp_path / "moved"
    shutil.copytree(finished_run, moved, ignore=shutil.ignore_patterns("*.ckpt", "*.pt"))
    config = moved / "config.yaml"
    config.write_text(
        config.read_text().replace("verification: []", "verification: [/gone/lfw.bin]")
    )
    assert RunFolder(moved).finished_config(["data.verification=[]"]).data.verification == []


@pytest.mark.slow
def test_evaluation_goes_to_the_runs_wandb_run_offline(finished_run, monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    evaluate_run(finished_run, ["logger=wandb", "eval.timing_batches=1"])
    runs = list((finished_run / "wandb").glob("offline-run-*"))
    run_id = json.loads((finished_run / "run.json").read_text())["run_id"]
    assert runs and all(r.name.endswith(run_id) for r in runs), "the training run's W&B id"
    assert list(runs[-1].glob("*.wandb"))


@pytest.mark.parametrize("decision", ["moe", "linear"])
def test_an_export_threshold_holds_only_at_the_top_m_it_was_chosen_at(decision):
    # Under either decision unit more candidate clusters raise the answer's similarity,
    # so unknown faces pass a threshold chosen at top_m=1 more often than its FPIR says.
    ident, _ = _random_identifier()
    ident.route_config["decision"] = decision
    ident.open_set = {
        "threshold": 0.3,
        "fpir": 0.01,
        "probes": 9,
        "top_m": 1,
        "score": "similarity",
    }
    assert export_threshold(ident, "m") == export_threshold(ident, "m", 1) == 0.3
    with pytest.raises(ValueError, match=r"chosen at top_m=1; with top_m=2"):
        export_threshold(ident, "m", 2)
    # an earlier export that did not record it: only the export's own top_m is safe
    # (identify has already put the asked top_m into route_config)
    del ident.open_set["top_m"]
    ident.route_config["top_m"] = 2
    assert export_threshold(ident, "m") == 0.3
    with pytest.raises(ValueError, match=r"does not record the top_m"):
        export_threshold(ident, "m", 2)


def test_enrolment_embeds_a_person_in_batches_with_the_same_rows():
    # A person with many photos: the networks see at most batch_size images at a
    # time, and the new class mean and head row are still the normalised means of the
    # normalised embeddings.
    ident, _ = _random_identifier(seed=3)
    faces = {"new": torch.randn(10, 8)}
    seen = []
    ident.router_backbone.register_forward_pre_hook(lambda _, args: seen.append(len(args[0])))
    clusters = ident.enroll(faces, batch_size=3)
    assert seen[:4] == [3, 3, 3, 1]  # the class mean's pass (then the router's index)
    k, new = clusters["new"], ident.class_names.index("new")
    expected = F.normalize(F.normalize(faces["new"], dim=1).mean(0), dim=0)
    assert torch.allclose(ident.assignment.class_means[new], expected, atol=1e-6)
    assert torch.allclose(ident.means(k)[-1], expected, atol=1e-6)  # the decision unit's
    assert torch.allclose(ident.head(k)[-1], expected, atol=1e-6)  # identity sub-nets


def _fails_once(build):
    calls = []

    def first_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise MemoryError("no room for the new router")
        return build(*args, **kwargs)

    return first_fails


def test_enrolment_takes_one_person_at_a_time_and_changes_nothing_until_all_are_done():
    # enroll_folder hands people over one at a time (a bulk enrolment need not hold
    # every image); each is routed against the gallery before the call, so the order
    # does not matter, and a bad person later on leaves the identifier as it was. They
    # are routed ENROLL_ROUTE_BATCH at a time, each to the cluster it gets alone
    torch.manual_seed(4)
    people = {f"p{i}": torch.randn(4, 8) for i in range(ENROLL_ROUTE_BATCH + 4)}
    forward, backward = _random_identifier(seed=3)[0], _random_identifier(seed=3)[0]
    alone = _random_identifier(seed=3)[0]
    held = []

    def one_at_a_time(order):
        for name in order:
            held.append(name)
            yield name, people[name]

    a = forward.enroll(one_at_a_time(list(people)))
    b = backward.enroll(one_at_a_time(list(people)[::-1]))
    assert a == b and len(held) == 2 * len(people)
    for name, images in people.items():
        mean = F.normalize(F.normalize(alone.embed(images), dim=1).sum(0)[None], dim=1)
        assert a[name] == int(alone.router.route(mean, 1)[0, 0])
    assert len(set(a.values())) > 1, "the people went to more than one cluster"
    # a failure after the old router was let go (out of memory at 2M identities, where
    # it is let go first) leaves the identifier as it was, not without a router
    queries = torch.randn(12, 8)
    answers = forward.identify(queries)
    names, heads = list(forward.class_names), [forward.head(k).clone() for k in range(4)]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(forward, "_build_router", _fails_once(forward._build_router))
        with pytest.raises(MemoryError):
            forward.enroll({"late": torch.randn(3, 8)})
    assert forward.class_names == names
    assert all(torch.equal(forward.head(k), heads[k]) for k in range(4))
    again = forward.identify(queries)
    assert torch.equal(again.identity, answers.identity) and torch.equal(again.score, answers.score)
    for name in people:
        i, j = forward.class_names.index(name), backward.class_names.index(name)
        assert torch.equal(forward.assignment.class_means[i], backward.assignment.class_means[j])
    before = (list(forward.class_names), forward.assignment.class_means.clone())
    again = iter([("q", torch.randn(3, 8)), ("p0", torch.randn(3, 8))])
    with pytest.raises(ValueError, match="'p0' is enrolled already"):
        forward.enroll(again)
    assert forward.class_names == before[0] and torch.equal(
        forward.assignment.class_means, before[1]
    )
    with pytest.raises(ValueError, match="'r' is given twice"):
        forward.enroll(iter([("r", torch.randn(3, 8)), ("r", torch.randn(3, 8))]))
    # the same name however its characters are composed (a macOS folder's "José" is
    # decomposed) or with spaces around it: a second identity no answer told apart
    forward.enroll({"José Müller": torch.randn(3, 8)})
    decomposed = unicodedata.normalize("NFD", "José Müller")
    assert decomposed != "José Müller"
    for again_named in (decomposed, "José Müller ", " p0"):
        with pytest.raises(ValueError, match="is enrolled already as '"):
            forward.enroll({again_named: torch.randn(3, 8)})
    with pytest.raises(ValueError, match="'s ' is given twice as 's'"):
        forward.enroll(iter([("s", torch.randn(3, 8)), ("s ", torch.randn(3, 8))]))
    # a blank name (answers that print nothing) and a line break (a table row split
    # in two) were enrolled
    held = list(forward.class_names)
    for bad in (" ", "", "Ann\nLee", "Ann\tLee", "Ann\u2028Lee", "\u200b", "\xa0"):
        with pytest.raises(ValueError, match="needs a visible character and no line break"):
            forward.enroll({bad: torch.randn(3, 8)})
    assert forward.class_names == held
    # a no-break space, a zero-width non-joiner (Persian names) are parts of names
    forward.enroll(
        {
            "Ann\xa0Lee": torch.randn(3, 8),
            "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645": torch.randn(3, 8),
        }
    )


def test_the_onnx_folder_keeps_the_router_index_too(tmp_path, monkeypatch, caplog):
    # the gallery holds the built index's parts as plain arrays (allow_pickle=False),
    # put together by a load with the same index settings; the networks stand in for
    # ONNX sessions
    from facecluster.inference import onnx as onnx_module
    from facecluster.inference import router as router_module

    torch.manual_seed(0)
    means, clusters = torch.randn(40, 8), [i % 4 for i in range(40)]
    ident = _identifier(means, clusters, route={"index": "hnsw"})
    onnx_module.write_gallery(ident, tmp_path)

    def stand_in(path, device):
        network = nn.Identity()
        network.image_size = None  # as a graph of any input size says
        return network

    monkeypatch.setattr(onnx_module, "OnnxBackbone", stand_in)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(router_module, "build_index", lambda *a, **k: pytest.fail("built again"))
        loaded = onnx_module.load_onnx(tmp_path)
    queries = torch.randn(30, 8)
    assert torch.equal(loaded.router.route(queries, 2), ident.router.route(queries, 2))
    built = []
    real = router_module.build_index
    counted = lambda *a, **k: built.append(1) or real(*a, **k)  # noqa: E731
    monkeypatch.setattr(router_module, "build_index", counted)
    onnx_module.load_onnx(tmp_path, route={"hnsw_ef_search": 16})
    assert built == [1]  # other index settings: built for them
    # a gallery of an earlier facecluster holds faiss's bytes instead: not read, the
    # index built with a warning (the ONNX folder was refused, the review of the change)
    gallery = tmp_path / onnx_module.ONNX_GALLERY
    arrays = {k: v for k, v in np.load(gallery).items() if not k.startswith("router_parts.")}
    arrays["router_index"] = faiss.serialize_index(ident.router.index)
    with open(gallery, "wb") as f:
        np.savez(f, **arrays)
    monkeypatch.setattr(faiss, "deserialize_index", lambda *a: pytest.fail("faiss read it"))
    with caplog.at_level(logging.WARNING):
        older = onnx_module.load_onnx(tmp_path)
    assert built == [1, 1] and "saved by an earlier facecluster" in caplog.text
    assert torch.equal(older.router.route(queries, 2), ident.router.route(queries, 2))


def test_a_table_of_runs_timed_at_other_batch_sizes_says_each_rows_own(monkeypatch):
    # evaluate.py run=a run=b: each run is timed at its own eval.batch_size; the header
    # named the first run's for every row
    def row(run):
        return evaluation.Row(
            run, "single model (one head)", 0.5, 0.5, 0.5, 0.5, None, 0, 100.0, 1.0, 10
        )

    reports = {
        "a": evaluation.RunEvaluation(Path("a"), "single", [row("a")], 256),
        "b": evaluation.RunEvaluation(Path("b"), "single", [row("b")], 64),
    }
    monkeypatch.setattr(evaluation, "_evaluate", lambda run, cfg, o, ranks: reports[str(run.path)])
    monkeypatch.setattr(evaluation, "run_folder", lambda run: RunFolder(Path(run)))
    single = SimpleNamespace(two_stage=False)
    monkeypatch.setattr(evaluation, "_checked_config", lambda run, overrides, ranks: single)
    monkeypatch.setattr(RunFolder, "check_weights", lambda run, two_stage: None)
    monkeypatch.setattr(evaluation, "_warn_other_faces", lambda runs: None)  # no folders here
    table = evaluation.evaluate_runs(["a", "b"])
    assert "img/s @batch" in table and "@256" not in table.splitlines()[0]
    assert "(img/s @256)" in table and "(img/s @64)" in table
    same = evaluation.evaluate_runs(["a", "a"])
    assert "img/s @256" in same.splitlines()[0] and "(img/s" not in same


@pytest.mark.parametrize("method", ["clustered", "single", "clustered, still retraining"])
def test_an_evaluation_whose_weights_were_trained_again_meanwhile_writes_nothing(
    tmp_path, monkeypatch, finished_run, method
):
    # an evaluation that began before `resume=<run> stage2.subnets=[0]` retrained a
    # sub-net wrote the old sub-net's figures over the retrain's own, exit 0 (a review);
    # one that ends while the retrain runs finds the sub-net's file gone
    import shutil

    from facecluster import evaluation

    if method == "single":
        run = train(load_config(SMOKE, smoke_overrides(tmp_path, "method=single"))).run_dir
        rewritten = RunFolder(run).last_checkpoint(1)
    else:
        run = shutil.copytree(finished_run, tmp_path / "run")
        rewritten = run / "stage2" / "subnets" / "subnet0.pt"
    results = run / "eval" / "results.json"
    results.parent.mkdir(exist_ok=True)
    results.write_text("the retrain's own\n")
    passes = evaluation.Bench.rows

    def retrained_meanwhile(*args, **kwargs):
        rows = passes(*args, **kwargs)
        if method.endswith("still retraining"):
            RunFolder(run).restart_subnets([[0]])  # what the resume does as it starts
        else:
            shutil.copy(rewritten, tmp_path / "new")
            os.replace(tmp_path / "new", rewritten)  # what a retrain's atomic save does
        return rows

    monkeypatch.setattr(evaluation.Bench, "rows", retrained_meanwhile)
    what = "stage-1 checkpoint" if method == "single" else "sub-net 0"
    with pytest.raises(ConfigError, match=f"its {what} changed while this evaluation ran"):
        evaluation.evaluate_runs([run])
    assert results.read_text() == "the retrain's own\n"


def test_a_bar_in_a_table_cell_is_escaped_and_keeps_the_columns():
    # a run folder named "a|b" shifted its row's columns in results.md (a review)
    from facecluster.results import markdown_table

    table = markdown_table(["run", "top-1"], [["runs/a|b", "50.00%"]], "lr")
    assert table.splitlines()[2] == "| runs/a\\|b | 50.00% |"
    assert [len(re.findall(r"(?<!\\)\|", line)) for line in table.splitlines()] == [3, 3, 3]
