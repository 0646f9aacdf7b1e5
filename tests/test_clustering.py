"""Invariants of facecluster.clustering on seeded synthetic embeddings.

The data are synthetic on purpose: blobs on the unit sphere make clustering
properties (recovery, dispersion, balance) checkable without a trained model.
Tests assert invariants, not exact values.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from facecluster.clustering import (
    METHODS,
    ClusterAssignment,
    accumulate_class_sums,
    cluster_identities,
    dispersion,
    finalize_class_means,
    kmeans,
)


def blobs(num_blobs: int, per_blob: int, dim: int = 32, noise: float = 0.05, seed: int = 0):
    """Unit-norm points around ``num_blobs`` random directions; returns (x, blob id)."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(num_blobs, dim, generator=g), dim=1)
    x = centers.repeat_interleave(per_blob, 0) + noise * torch.randn(
        num_blobs * per_blob, dim, generator=g
    )
    return F.normalize(x, dim=1), torch.arange(num_blobs).repeat_interleave(per_blob)


def random_means(num: int, dim: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(num, dim, generator=g), dim=1)


def check_consistent(a: ClusterAssignment) -> None:
    """local_index / classes_of / sizes agree, and every cluster is non-empty."""
    sizes = a.cluster_sizes()
    assert sizes.shape == (a.num_clusters,)
    assert int(sizes.sum()) == a.num_classes
    assert (sizes >= 1).all()
    seen = torch.zeros(a.num_classes, dtype=torch.bool)
    for k in range(a.num_clusters):
        members = a.classes_of(k)
        assert members.numel() == int(sizes[k])
        assert torch.all(members[1:] > members[:-1])  # increasing global ids
        assert (a.class_to_cluster[members] == k).all()
        assert torch.equal(a.local_index[members], torch.arange(members.numel()))
        seen[members] = True
    assert seen.all()
    c = torch.arange(a.num_classes)
    for k in range(a.num_clusters):
        in_k = c[a.class_to_cluster == k]
        assert torch.equal(a.classes_of(k)[a.local_index[in_k]], in_k)
    torch.testing.assert_close(a.centroids.norm(dim=1), torch.ones(a.num_clusters))
    torch.testing.assert_close(a.class_means.norm(dim=1), torch.ones(a.num_classes))


# ------------------------------------------------------------------ k-means
@pytest.mark.parametrize("seed", [0, 1, 2, 2**32 - 1])  # the last: past faiss's C int
def test_kmeans_recovers_separated_blobs_up_to_permutation(seed):
    x, blob = blobs(5, 15, seed=seed)
    a = cluster_identities(x, 5, "kmeans", seed=seed, nredo=10)
    pairs = set(zip(blob.tolist(), a.class_to_cluster.tolist(), strict=True))
    # A bijection blob <-> cluster: exactly 5 distinct (blob, cluster) pairs.
    assert len(pairs) == 5
    assert len({k for _, k in pairs}) == 5
    assert a.method == "kmeans"
    check_consistent(a)


@pytest.mark.parametrize("num_clusters", [20, 23, 24])
def test_kmeans_never_leaves_an_empty_cluster_with_duplicates(num_clusters):
    # 6 distinct means, each repeated 4 times: k-means alone would leave clusters empty.
    means = random_means(6, seed=3).repeat_interleave(4, 0)
    a = cluster_identities(means, num_clusters, "kmeans", seed=0)
    assert a.num_clusters == num_clusters
    assert int(a.cluster_sizes().min()) >= 1
    check_consistent(a)
    # Deterministic for a seed, repair step included.
    assert a == cluster_identities(means, num_clusters, "kmeans", seed=0)


def test_kmeans_all_identical_means_k_equals_c():
    means = random_means(1).repeat(7, 1)
    a = cluster_identities(means, 7, "kmeans")
    assert torch.equal(a.cluster_sizes(), torch.ones(7, dtype=torch.long))


def test_kmeans_is_deterministic_for_a_seed():
    x, _ = blobs(6, 20, noise=0.3, seed=4)
    assert cluster_identities(x, 6, seed=7) == cluster_identities(x, 6, seed=7)

    # the seed is used: another one finds another local optimum on these overlapping
    # blobs, other groups of identities, not only the same groups numbered otherwise
    def groups(seed: int) -> set[frozenset[int]]:
        labels = cluster_identities(x, 6, seed=seed).class_to_cluster.tolist()
        return {frozenset(i for i, c in enumerate(labels) if c == k) for k in set(labels)}

    assert groups(7) != groups(8)


def test_kmeans_beats_random_and_within_decreases_with_k():
    x, _ = blobs(8, 25, noise=0.3, seed=5)
    seeds = range(3)
    km = {
        k: [dispersion(cluster_identities(x, k, "kmeans", seed=s))["within"] for s in seeds]
        for k in (2, 4, 8, 16)
    }
    rnd = {
        k: [dispersion(cluster_identities(x, k, "random", seed=s))["within"] for s in seeds]
        for k in (2, 4, 8, 16)
    }
    avg = {k: sum(v) / len(v) for k, v in km.items()}
    for k in km:
        assert max(km[k]) < min(rnd[k]), k
    ks = sorted(avg)
    for small, large in zip(ks, ks[1:], strict=False):
        assert avg[large] <= avg[small] + 1e-6, (small, large, avg)


# ----------------------------------------------------------------- balanced
@pytest.mark.parametrize(
    "num_classes,num_clusters", [(10, 3), (64, 8), (101, 10), (97, 7), (17, 17), (23, 1), (50, 49)]
)
def test_balanced_sizes_differ_by_at_most_one(num_classes, num_clusters):
    means = random_means(num_classes, seed=num_classes)
    a = cluster_identities(means, num_clusters, "balanced", seed=1)
    sizes = a.cluster_sizes()
    lo, hi = num_classes // num_clusters, -(-num_classes // num_clusters)
    assert int(sizes.min()) >= lo and int(sizes.max()) <= hi
    assert int(sizes.max()) - int(sizes.min()) <= 1
    check_consistent(a)


def test_balanced_on_clustered_data_is_tight_and_no_worse_than_random():
    # Unequal blobs, so balancing must actually cut some of them.
    x1, _ = blobs(4, 40, noise=0.2, seed=6)
    x2, _ = blobs(4, 10, noise=0.2, seed=7)
    x = torch.cat([x1, x2])
    balanced = dispersion(cluster_identities(x, 8, "balanced", seed=0))
    rand = dispersion(cluster_identities(x, 8, "random", seed=0))
    assert balanced["size_max"] - balanced["size_min"] <= 1
    assert balanced["within"] <= rand["within"]
    assert balanced["ratio"] < rand["ratio"]


def test_balanced_recovers_equal_blobs():
    x, blob = blobs(4, 12, seed=8)
    a = cluster_identities(x, 4, "balanced", seed=0, nredo=5)
    assert len(set(zip(blob.tolist(), a.class_to_cluster.tolist(), strict=True))) == 4


# ------------------------------------------------------------------- random
def test_random_is_seeded_near_equal_and_seed_dependent():
    means = random_means(53)
    a = cluster_identities(means, 5, "random", seed=11)
    assert a == cluster_identities(means, 5, "random", seed=11)
    assert not torch.equal(
        a.class_to_cluster, cluster_identities(means, 5, "random", seed=12).class_to_cluster
    )
    sizes = a.cluster_sizes()
    assert int(sizes.max()) - int(sizes.min()) <= 1 and int(sizes.sum()) == 53
    # Centroids are the normalised mean of member means even for random splits.
    expected = F.normalize(torch.stack([means[a.classes_of(k)].sum(0) for k in range(5)]), dim=1)
    torch.testing.assert_close(a.centroids, expected)


@pytest.mark.parametrize("method", ["kmeans", "balanced"])
def test_features_decide_the_groups_and_class_means_still_route(method):
    # clustering.features=head: k-means groups other vectors (the head's rows) than the
    # class means; the assignment keeps the means and centroids average them.
    means, _ = blobs(4, 6, seed=1)
    features, truth = blobs(4, 6, seed=2)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    features, truth = features[order], truth[order]  # groups unrelated to the means' blobs
    a = cluster_identities(means, 4, method, seed=0, features=features)
    check_consistent(a)
    torch.testing.assert_close(a.class_means, means)
    for blob in range(4):  # each feature blob lands whole in one cluster
        assert a.class_to_cluster[truth == blob].unique().numel() == 1
    for k in range(4):
        members = a.classes_of(k)
        torch.testing.assert_close(a.centroids[k], F.normalize(means[members].sum(0), dim=0))
    with pytest.raises(ValueError, match="features has 23 rows but class_means has 24"):
        cluster_identities(means, 4, method, features=features[:23])
    with pytest.raises(ValueError, match="features contains NaN"):
        cluster_identities(means, 4, method, features=features * float("nan"))


@pytest.mark.parametrize("method", METHODS)
def test_local_index_and_classes_of_consistent_for_every_method(method):
    x, _ = blobs(5, 13, noise=0.3, seed=9)
    a = cluster_identities(x, 6, method, seed=2)
    assert a.method == method
    assert (a.num_classes, a.num_clusters, a.embedding_dim) == (65, 6, 32)
    check_consistent(a)
    torch.testing.assert_close(a.class_means, x)


def test_single_cluster_and_dispersion_edge_cases():
    means = random_means(9)
    for method in METHODS:
        a = cluster_identities(means, 1, method)
        assert torch.equal(a.class_to_cluster, torch.zeros(9, dtype=torch.long))
        d = dispersion(a)
        assert d["between"] == 0.0 and d["within"] > 0 and d["ratio"] == float("inf")
        assert d["size_min"] == d["size_max"] == d["size_mean"] == 9.0


def test_dispersion_matches_definition(monkeypatch):
    a = cluster_identities(random_means(30, seed=1), 4, "kmeans")
    d = dispersion(a)
    monkeypatch.setattr(kmeans, "_MARGIN_CHUNK", 7)  # in blocks of identities: the same
    assert dispersion(a)["within"] == pytest.approx(d["within"], abs=1e-12)
    within = torch.stack(
        [1 - a.class_means[c] @ a.centroids[a.class_to_cluster[c]] for c in range(30)]
    ).mean()
    between = torch.stack(
        [1 - a.centroids[i] @ a.centroids[j] for i in range(4) for j in range(4) if i != j]
    ).mean()
    assert d["within"] == pytest.approx(float(within), abs=1e-5)
    assert d["between"] == pytest.approx(float(between), abs=1e-5)
    assert d["ratio"] == pytest.approx(d["within"] / d["between"])
    sizes = a.cluster_sizes().float()
    assert (d["size_min"], d["size_max"], d["size_mean"]) == (
        sizes.min(),
        sizes.max(),
        sizes.mean(),
    )


# ------------------------------------------------------------------- errors
def test_errors_name_the_argument():
    means = random_means(5)
    with pytest.raises(ValueError, match=r"^num_clusters=8 but only 5 identities"):
        cluster_identities(means, 8)
    for bad in (0, -1):
        with pytest.raises(ValueError, match=r"^num_clusters"):
            cluster_identities(means, bad)
    with pytest.raises(ValueError, match=r"^num_clusters"):
        cluster_identities(means, 2.5)
    with pytest.raises(ValueError, match=r"^method='spectral'.*'kmeans'.*'balanced'.*'random'"):
        cluster_identities(means, 2, method="spectral")
    with pytest.raises(ValueError, match="2-D"):
        cluster_identities(means[0], 1)
    nan = means.clone()
    nan[3, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        cluster_identities(nan, 2)


def test_assignment_validation():
    means = random_means(6)
    a = ClusterAssignment.from_labels(torch.tensor([0, 1, 0, 2, 1, 0]), means, "random")
    assert torch.equal(a.local_index, torch.tensor([0, 0, 1, 0, 1, 2]))
    assert torch.equal(a.classes_of(0), torch.tensor([0, 2, 5]))
    with pytest.raises(ValueError, match="local_index"):
        ClusterAssignment(
            a.class_to_cluster,
            torch.tensor([0, 1, 1, 0, 0, 2]),
            a.class_means,
            a.centroids,
            "random",
        )
    with pytest.raises(ValueError, match="empty"):
        ClusterAssignment.from_labels(torch.tensor([0, 0, 2, 2, 0, 0]), means, "kmeans")
    with pytest.raises(ValueError, match="empty"):
        ClusterAssignment.from_labels(
            torch.tensor([0, 1, 0, 1, 0, 1]), means, "kmeans", num_clusters=3
        )
    opposite = torch.cat([means[:1], -means[:1], means[2:]])  # cluster 0: 0 and 1 cancel
    with pytest.raises(ValueError, match=r"cluster\(s\) \[0\] add up to zero"):
        ClusterAssignment.from_labels(torch.tensor([0, 0, 1, 2, 1, 2]), opposite, "random")
    with pytest.raises(ValueError, match="dim"):
        ClusterAssignment(
            a.class_to_cluster, a.local_index, a.class_means, a.centroids[:, :3], "random"
        )
    with pytest.raises(ValueError, match="L2-normalised"):
        ClusterAssignment(
            a.class_to_cluster, a.local_index, a.class_means * 2, a.centroids, "random"
        )
    with pytest.raises(ValueError, match="out of range"):
        a.classes_of(3)


def test_overlap_adds_the_identities_nearest_a_boundary_to_their_next_cluster():
    # clustering.overlap: the round(f * C) identities of smallest margin (own centroid
    # minus nearest other) also join that other cluster; each sub-net's classes are its
    # members in increasing id, and every index agrees with them
    means = random_means(40, seed=7)
    plain = cluster_identities(means, 4, "kmeans", seed=1)
    a = cluster_identities(means, 4, "kmeans", seed=1, overlap=0.2)
    assert torch.equal(a.class_to_cluster, plain.class_to_cluster)  # the partition stays
    assert torch.equal(a.centroids, plain.centroids)
    sims = means @ a.centroids.T
    own = sims.gather(1, a.class_to_cluster[:, None])[:, 0]
    sims[torch.arange(40), a.class_to_cluster] = -2.0
    margin = own - sims.max(dim=1).values
    expected = sorted(margin.argsort()[:8].tolist())
    assert sorted(a.overlap[:, 0].tolist()) == expected
    assert a.overlap[:, 1].tolist() == sorted(a.overlap[:, 1].tolist())  # by cluster
    for c, k in a.overlap.tolist():
        assert k == int(sims[c].argmax()) != int(a.class_to_cluster[c])
        members = a.classes_of(k)
        assert c in members.tolist() and bool((members[1:] > members[:-1]).all())
        assert bool(a.contains(torch.tensor(c), torch.tensor(k)))
    assert torch.equal(a.cluster_sizes(), plain.cluster_sizes() + torch.bincount(a.overlap[:, 1]))
    assert [len(a.classes_of(k)) for k in range(4)] == a.cluster_sizes().tolist()
    for each in (a, plain):  # the sub-nets' and identifier's members, from one sort
        assert list(map(torch.Tensor.tolist, each.all_members())) == [
            each.classes_of(k).tolist() for k in range(4)
        ]
    for c in range(40):  # an identity's own local index still finds it in its own cluster
        assert int(a.classes_of(int(a.class_to_cluster[c]))[a.local_index[c]]) == c
    outside = [(c, k) for c in range(40) for k in range(4) if c not in a.classes_of(k).tolist()]
    ids, ks = torch.tensor(outside).T
    assert not a.contains(ids, ks).any()
    # the file keeps it; an enrolment keeps it; a version-1 file (before overlap) reads
    assert ClusterAssignment.from_dict(a.to_dict()) == a
    grown = a.extended(means[:2], torch.tensor([0, 3]))
    assert torch.equal(grown.overlap, a.overlap) and grown.classes_of(3)[-1] == 41
    old = plain.to_dict()  # a partition is written in the version-1 form, older code reads it
    assert old["version"] == 1 and "overlap" not in old
    assert ClusterAssignment.from_dict(old) == plain
    assert a.to_dict()["version"] == 2
    assert cluster_identities(means, 1, "kmeans", overlap=0.5).overlap.shape == (0, 2)
    with pytest.raises(ValueError, match=r"overlap must be a fraction .* got 1.5"):
        cluster_identities(means, 4, overlap=1.5)


def test_overlap_rows_are_validated():
    a = ClusterAssignment.from_labels(torch.tensor([0, 1, 0, 2, 1, 0]), random_means(6), "kmeans")
    rows = a.with_overlap(torch.tensor([[5, 2], [1, 0]])).overlap
    assert torch.equal(rows, torch.tensor([[1, 0], [5, 2]]))  # sorted by cluster
    for rows, message in (
        ([[0, 0]], "adds identities to their own cluster"),
        ([[6, 1]], r"identities must be in \[0, 6\)"),
        ([[0, 3]], r"clusters must be in \[0, 3\)"),
        ([[0, 1], [0, 1]], "sorted by cluster, then identity, without repeats"),
    ):
        with pytest.raises(ValueError, match=message):
            a.with_overlap(torch.tensor(rows))
    for bad in (torch.tensor([[0.5, 1.0]]), torch.tensor([[True, False]]), torch.tensor([1, 2])):
        with pytest.raises(ValueError, match=r"integer \[M, 2\]"):
            ClusterAssignment(
                a.class_to_cluster, a.local_index, a.class_means, a.centroids, "kmeans", bad
            )
    with pytest.raises(ValueError, match=r"clusters must be in \[0, 3\)"):
        a.with_overlap(torch.tensor([[0, -1]]))  # checked before the local indices


# -------------------------------------------------------------- persistence
def test_save_load_round_trip_is_atomic(tmp_path):
    x, _ = blobs(4, 10, seed=10)
    a = cluster_identities(x, 4, "balanced")
    path = tmp_path / "sub" / "assignment.pt"
    a.save(path)
    assert os.listdir(path.parent) == ["assignment.pt"]  # no temp file left behind
    b = ClusterAssignment.load(path)
    assert b == a and b.method == "balanced"
    check_consistent(b)
    # Overwriting works and still leaves a single file.
    c = cluster_identities(x, 2, "random")
    c.save(str(path))
    assert ClusterAssignment.load(str(path)) == c
    assert os.listdir(path.parent) == ["assignment.pt"]
    assert ClusterAssignment.from_dict(a.to_dict()) == a


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_load_maps_the_class_means_and_leaves_the_file_alone(tmp_path):
    """A stage-2 job's processes share clusters.pt's pages instead of each holding the
    [C, d] means (4 GB at 2M identities); a write to a loaded tensor stays private."""
    a = cluster_identities(random_means(64), 4, "random")
    path = tmp_path / "clusters.pt"
    a.save(path)
    b = ClusterAssignment.load(path)
    with open("/proc/self/maps") as maps:
        assert str(path) in maps.read()
    assert b == a
    b.class_means.mul_(-1)  # copy-on-write: the file keeps the saved means
    del b
    assert ClusterAssignment.load(path) == a


def test_failed_save_keeps_old_file_and_leaves_no_temp(tmp_path, monkeypatch):
    a = cluster_identities(random_means(8), 2, "random")
    path = tmp_path / "assignment.pt"
    a.save(path)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError, match="disk full"):
        cluster_identities(random_means(8), 4, "random").save(path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == ["assignment.pt"]
    assert ClusterAssignment.load(path) == a


def test_load_errors_name_the_path(tmp_path):
    missing = tmp_path / "nope.pt"
    with pytest.raises(FileNotFoundError, match="nope.pt"):
        ClusterAssignment.load(missing)
    other = tmp_path / "other.pt"
    torch.save({"a": 1}, other)
    with pytest.raises(ValueError, match="other.pt"):
        ClusterAssignment.load(other)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="garbage.pt") as error:
        ClusterAssignment.load(garbage)
    assert "mmap" not in str(error.value)  # the file is mapped: not torch's save advice
    empty = tmp_path / "empty.pt"
    empty.write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty.pt \(cluster assignment\) cannot be read: EOF"):
        ClusterAssignment.load(empty)
    wrong_version = tmp_path / "v3.pt"
    d = cluster_identities(random_means(4), 2, "random").to_dict()
    d["version"] = 3
    torch.save(d, wrong_version)
    with pytest.raises(ValueError, match="v3.pt.*version"):
        ClusterAssignment.load(wrong_version)


# -------------------------------------------------------------- class means
def test_accumulate_in_halves_equals_one_pass_and_naive_loop():
    g = torch.Generator().manual_seed(12)
    num_classes, dim, n = 7, 10, 200
    emb = torch.randn(n, dim, generator=g) * 3  # not normalised: the function must do it
    labels = torch.randint(0, num_classes, (n,), generator=g)

    s1, c1 = (
        torch.zeros(num_classes, dim, dtype=torch.float64),
        torch.zeros(num_classes, dtype=torch.long),
    )
    accumulate_class_sums(emb, labels, s1, c1)
    s2, c2 = (
        torch.zeros(num_classes, dim, dtype=torch.float64),
        torch.zeros(num_classes, dtype=torch.long),
    )
    accumulate_class_sums(emb[:77], labels[:77], s2, c2)
    accumulate_class_sums(emb[77:].half(), labels[77:].int(), s2, c2)  # other dtypes allowed
    torch.testing.assert_close(c1, c2)
    torch.testing.assert_close(s1, s2, atol=5e-3, rtol=0)  # the half batch loses a little precision

    naive = []
    for c in range(num_classes):
        rows = F.normalize(emb[labels == c], dim=1)
        naive.append(F.normalize(rows.mean(0), dim=0))
    naive = torch.stack(naive)
    means = finalize_class_means(s1, c1)
    assert means.dtype == torch.float32 and means.shape == (num_classes, dim)
    torch.testing.assert_close(means, naive, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(c1, torch.bincount(labels, minlength=num_classes))

    s3, c3 = torch.zeros(num_classes, dim), torch.zeros(num_classes)  # float32 accumulators
    accumulate_class_sums(emb.requires_grad_(), labels, s3, c3)
    assert not s3.requires_grad
    torch.testing.assert_close(finalize_class_means(s3, c3), naive, atol=1e-5, rtol=1e-5)


def test_the_passes_over_all_class_means_give_the_same_in_blocks(monkeypatch):
    # At 2M identities the class means are 4 GiB: their final division, the unit-norm
    # and finiteness checks and the centroid sums go a block of rows at a time (float64
    # copies of the whole matrix were 8 GiB each); blocks of 3 rows give what one does
    from facecluster.clustering import assignment as assignment_module
    from facecluster.clustering import means as means_module

    g = torch.Generator().manual_seed(5)
    sums = torch.randn(10, 6, dtype=torch.float64, generator=g)
    counts = torch.randint(1, 9, (10,), generator=g)
    whole = finalize_class_means(sums, counts)
    labels = torch.arange(10) % 3
    one = ClusterAssignment.from_labels(labels, whole, num_clusters=3, method="kmeans")
    for module in (means_module, assignment_module):
        monkeypatch.setattr(module, "_ROWS", 3)
    blocked = finalize_class_means(sums, counts, device="cpu")
    torch.testing.assert_close(blocked, whole, atol=0, rtol=0)
    torch.testing.assert_close(F.normalize(sums / counts[:, None], dim=1).float(), whole)
    three = ClusterAssignment.from_labels(labels, whole, num_clusters=3, method="kmeans")
    torch.testing.assert_close(three.centroids, one.centroids, atol=1e-7, rtol=0)
    bad = whole.clone()
    bad[7, 2] = float("nan")
    with pytest.raises(ValueError, match=r"class_means contains NaN/inf values \(rows \[7\]\)"):
        ClusterAssignment.from_labels(labels, bad, num_clusters=3, method="kmeans")
    bad[7] = whole[7] * 1.5
    with pytest.raises(ValueError, match=r"1 row\(s\) are not \(e.g. rows \[7\]"):
        ClusterAssignment.from_labels(labels, bad, num_clusters=3, method="kmeans")
    # rows too large for a float32 norm (inf) fill more than a block before a NaN row:
    # the NaN is still named as such, and those rows' true norms are shown
    bad[:5] = 1e30
    bad[8, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN/inf values \(rows \[8\]\)"):
        ClusterAssignment.from_labels(labels, bad, num_clusters=3, method="kmeans")
    bad[8] = whole[8]
    with pytest.raises(ValueError, match=r"6 row\(s\) are not \(e.g. rows \[0, 1, 2, 3, 4, 7\] "
                       r"with norms \[2.449\d*e\+30, "):  # fmt: skip
        ClusterAssignment.from_labels(labels, bad, num_clusters=3, method="kmeans")


def test_accumulate_rejects_bad_input():
    sums, counts = torch.zeros(3, 4), torch.zeros(3, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        accumulate_class_sums(torch.randn(2, 4), torch.tensor([0, 3]), sums, counts)
    with pytest.raises(ValueError, match="embeddings"):
        accumulate_class_sums(torch.randn(2, 5), torch.tensor([0, 1]), sums, counts)
    with pytest.raises(ValueError, match="labels"):
        accumulate_class_sums(torch.randn(2, 4), torch.tensor([0, 1, 2]), sums, counts)
    assert counts.sum() == 0


def test_finalize_names_empty_classes():
    sums, counts = torch.zeros(5, 3), torch.zeros(5, dtype=torch.long)
    accumulate_class_sums(torch.randn(4, 3), torch.tensor([0, 2, 2, 4]), sums, counts)
    with pytest.raises(ValueError, match=r"class ids 1, 3$"):
        finalize_class_means(sums, counts)
    many = torch.zeros(30, 3), torch.zeros(30)
    with pytest.raises(
        ValueError,
        match=r"30 of 30 classes.*ids 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, \.\.\. \(30 in all\)",
    ):
        finalize_class_means(*many)


# ------------------------------------------------------------ torch + faiss
def test_torch_then_faiss_in_one_process():
    """torch and faiss each bring OpenMP; run both, threaded, in a fresh process."""
    code = textwrap.dedent(
        """
        import torch
        import faiss
        import numpy as np
        torch.set_num_threads(2)
        a = torch.randn(512, 512)
        for _ in range(3):
            b = a @ a
            x = np.ascontiguousarray(torch.nn.functional.normalize(b, dim=1).numpy())
            km = faiss.Kmeans(512, 8, niter=5, spherical=True, seed=0, verbose=False)
            km.train(x)
        from facecluster.clustering import cluster_identities
        assert cluster_identities(torch.nn.functional.normalize(a, dim=1), 8).num_clusters == 8
        print("ok", float((a @ a).sum()) == float(b.sum()))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok True"


def test_capacitated_assignment_equals_greedy_over_pairs():
    """The vectorised balanced step matches the documented greedy (private helper),
    with tied similarities and with more clusters than identities too; its lazily
    sorted preferences equal a full stable argsort."""
    import numpy as np

    from facecluster.clustering.kmeans import _capacitated_assign, _Preferences

    rng = np.random.default_rng(0)
    cases = [(13, 4, False), (40, 6, False), (9, 9, False), (40, 12, False), (30, 16, True)]
    cases += [(12, 20, True), (50, 10, True)]
    for num_items, k, tied in cases:
        if tied:  # three values: most comparisons are ties
            sims = rng.integers(0, 3, (num_items, k)).astype(np.float32)
        else:
            sims = rng.standard_normal((num_items, k)).astype(np.float32)
        prefs, full = _Preferences(sims), np.argsort(-sims, axis=1, kind="stable")
        for r in range(k):
            items = np.arange(num_items)
            np.testing.assert_array_equal(prefs.choice(items, np.full(num_items, r)), full[:, r])
        caps = np.full(k, num_items // k)
        caps[: num_items % k] += 1
        greedy, fill = np.full(num_items, -1), np.zeros(k, dtype=int)
        for flat in np.argsort(-sims, axis=None, kind="stable"):
            i, c = divmod(int(flat), k)
            if greedy[i] < 0 and fill[c] < caps[c]:
                greedy[i], fill[c] = c, fill[c] + 1
        np.testing.assert_array_equal(_capacitated_assign(sims, caps), greedy)


@pytest.mark.parametrize("overlap", [0.0, 0.25])
def test_neighbours_are_the_outsiders_nearest_the_centroid(overlap):
    # stage2.negatives' order: every identity that is not a member of cluster k (with
    # clustering.overlap, not a second member either), nearest k's centroid first
    a = cluster_identities(random_means(40, seed=2), 4, "kmeans", overlap=overlap)
    for k in range(4):
        members = set(a.classes_of(k).tolist())
        outside = [i for i in range(40) if i not in members]
        cosine = {i: float(a.class_means[i] @ a.centroids[k]) for i in outside}
        assert a.neighbours(k).tolist() == sorted(outside, key=lambda i: (-cosine[i], i))


@pytest.mark.parametrize("rank", [0, 1])
def test_a_clustering_that_fails_on_rank_0_stops_every_rank(tmp_path, monkeypatch, rank):
    # k-means and its save run on rank 0 alone while the others wait in the broadcast:
    # a failure there (a full disk) is sent to them, so they stop too instead of waiting
    # for the process group's timeout
    from types import SimpleNamespace

    from facecluster.callbacks import ClusteringCallback
    from facecluster.callbacks import clustering as module

    sent = []

    def broadcast(payload, src=0):
        sent.append(payload)
        return payload if rank == 0 else {"error": "OSError: [Errno 28] No space left"}

    strategy = SimpleNamespace(
        broadcast=broadcast, barrier=lambda *a: None, reduce_boolean_decision=lambda d, all: d
    )
    trainer = SimpleNamespace(global_rank=rank, strategy=strategy, received_sigterm=False)
    unit = ClusteringCallback(None, 2, "kmeans", 0, tmp_path / "clusters.pt")
    monkeypatch.setattr(unit, "class_means", lambda *a: torch.eye(4))

    def full_disk(*a, **k):
        raise OSError(28, "No space left")

    monkeypatch.setattr(module, "cluster_identities", full_disk)
    expected = OSError if rank == 0 else RuntimeError
    with pytest.raises(expected, match="No space left"):
        unit.cluster(trainer, None)
    assert len(sent) == 1  # every rank went through the broadcast
    if rank == 0:
        assert "No space left" in sent[0]["error"]


def _mapped_from(tensor: torch.Tensor, path) -> bool:
    """Whether ``tensor``'s memory lies in a mapping of the file ``path``."""
    address, name = tensor.data_ptr(), str(path.resolve())
    with open("/proc/self/maps") as maps:
        for line in maps:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == name:
                start, end = (int(x, 16) for x in fields[0].split("-"))
                if start <= address < end:
                    return True
    return False


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads /proc/self/maps")
def test_every_rank_that_clustered_maps_the_saved_class_means(tmp_path):
    # stage 1 and stage 2 in one command: the [C, d] class means last through stage 2
    # (the warm start reads them). Each rank now maps clusters.pt, as a stage-2 job
    # does, so a node's processes share its pages: before, each held its own copy
    # (4 GB at 2M identities x 512). A file that holds another assignment (a network
    # file system's older view) is not used.
    from types import SimpleNamespace

    from facecluster.callbacks import ClusteringCallback

    means = random_means(40)
    path = tmp_path / "clusters.pt"
    sent, handed = [], []
    dm = SimpleNamespace(
        hparams=SimpleNamespace(subnet_negatives=0.0),
        connect_clusters=lambda members, subnets, neighbours: handed.append(
            [m.tolist() for m in members]
        ),
    )

    def trainer(rank):
        def broadcast(payload, src=0):
            if rank == 0:
                sent.append(payload)
            return sent[0]

        strategy = SimpleNamespace(
            broadcast=broadcast, barrier=lambda *a: None, reduce_boolean_decision=lambda d, all: d
        )
        return SimpleNamespace(
            global_rank=rank, strategy=strategy, received_sigterm=False, logger=None
        )

    done = {}
    for rank in (0, 1):
        unit = ClusteringCallback(dm, 4, "balanced", 0, path)
        unit.class_means = lambda *a: means.clone()
        done[rank] = unit.cluster(trainer(rank), None)
        assert unit.assignment is done[rank]
        assert _mapped_from(done[rank].class_means, path), rank
    saved = ClusterAssignment.load(path)
    assert done[0] == done[1] == saved
    assert handed[0] == handed[1] == [saved.classes_of(k).tolist() for k in range(4)]
    # rank 1 again, with a file that is not rank 0's clustering: its own copy stays
    cluster_identities(means, 4, "random").save(path)
    unit = ClusteringCallback(dm, 4, "balanced", 0, path)
    unit.class_means = lambda *a: means.clone()
    kept = unit.cluster(trainer(1), None)
    assert kept == done[0] and not _mapped_from(kept.class_means, path)


def test_a_cluster_of_one_identity_is_warned_of(tmp_path):
    # num_clusters close to the identity count made sub-nets over one identity, whose
    # ArcFace loss is zero at every step, without a word
    import warnings
    from types import SimpleNamespace

    from facecluster.callbacks import ClusteringCallback

    means = random_means(6)
    trainer = SimpleNamespace(global_rank=0, logger=None)

    def warned(labels, negatives=0.0):
        dm = SimpleNamespace(hparams=SimpleNamespace(subnet_negatives=negatives))
        unit = ClusteringCallback(dm, 3, "kmeans", 0, tmp_path / "clusters.pt")
        assignment = ClusterAssignment.from_labels(torch.tensor(labels), means, "kmeans", 3)
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            unit._log(trainer, assignment)
        return [str(w.message) for w in seen]

    said = warned([0, 0, 1, 2, 2, 2])
    assert len(said) == 1 and said[0].startswith("clustering: cluster 1 of 3 holds one identity")
    assert "clusters 0, 1 of 3 hold one identity" in warned([0, 1, 2, 2, 2, 2])[0]
    assert warned([0, 0, 1, 1, 2, 2]) == []
    assert warned([0, 0, 1, 2, 2, 2], negatives=0.25) == []  # a "not mine" class to learn


@pytest.mark.parametrize("k", [1, 16, 30])
def test_the_class_mean_plot_gives_every_cluster_its_own_colour(k, tmp_path, monkeypatch):
    # "tab10" spread K > 10 cluster ids over 10 colours (clusters 0 and 1 shared one at
    # K = 16); one identity, a rank-1 PCA, raised an IndexError
    from matplotlib.axes import Axes

    from facecluster.plots import class_means_plot

    drawn = []
    real = Axes.scatter
    monkeypatch.setattr(
        Axes, "scatter", lambda ax, *a, **kw: drawn.append(kw) or real(ax, *a, **kw)
    )
    torch.manual_seed(0)
    means = F.normalize(torch.randn(max(k, 40) if k > 1 else 1, 8), dim=1)
    assignment = cluster_identities(means, k, "balanced")
    assert class_means_plot(tmp_path / "means.png", assignment, 0).is_file()
    colours = {tuple(drawn[0]["cmap"](drawn[0]["norm"](c))) for c in range(k)}
    assert len(colours) == k


def test_a_stage2_job_ranks_each_clusters_outsiders_once(tmp_path, monkeypatch):
    # stage2.negatives: a job restores the assignment (every cluster), then narrows the
    # datamodule to its group; each ranking is a product with all C means and a full
    # sort (0.6-0.9 s per cluster at 2M x 512), so it is done once per cluster
    from types import SimpleNamespace

    from facecluster.callbacks import ClusteringCallback

    served = []
    dm = SimpleNamespace(
        hparams=SimpleNamespace(subnet_negatives=0.25),
        connect_clusters=lambda members, subnets, neighbours: served.append(
            (subnets, [n.tolist() for n in neighbours])
        ),
    )
    path = tmp_path / "clusters.pt"
    saved = cluster_identities(random_means(12), 3, "balanced")
    saved.save(path)
    unit = ClusteringCallback(dm, 3, "balanced", 0, path)
    ranked = []
    real = ClusterAssignment.neighbours
    monkeypatch.setattr(
        ClusterAssignment, "neighbours", lambda self, k: ranked.append(k) or real(self, k)
    )
    unit.restore()
    unit.connect([1])
    assert sorted(ranked) == [0, 1, 2]
    expected = [saved.neighbours(k).tolist() for k in range(3)]
    assert served == [(None, expected), ([1], expected)]
    assert unit._neighbours is None  # not held through stage 2 (1 GB at 2M ids, K=64)
