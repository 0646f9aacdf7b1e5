"""The mixture-of-experts decision unit and its calibration, on hand-made embeddings;
shared trunks (model.shared_layers) on real backbones and a real smoke run."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from facecluster.config import ConfigError, load_config
from facecluster.evaluation import evaluate_run
from facecluster.inference import StageOneModel, TwoStageIdentifier, count_parameters, decision
from facecluster.inference.decision import (
    TEMPERATURES,
    Calibration,
    MoeParams,
    moe_scores,
    similarity,
    top_columns,
)
from facecluster.io import load_plain
from facecluster.models.components import create_backbone, shareable_stages
from facecluster.pipeline import train
from facecluster.run import RunFolder
from tests.conftest import SMOKE, smoke_overrides
from tests.test_inference import BACKBONE, ROUTE, _assignment, _random_identifier

MOE = {"decision": "moe", "router_temperature": 0.1, "subnet_temperature": 0.05}


def _moe_identifier(weight: float, seed: int = 0):
    ident, queries = _random_identifier(seed=seed)
    ident.route_config.update(MOE, generalist_weight=weight)
    return ident, queries


def _brute_force(ident, queries, candidates):
    """p(c | x) over the candidate clusters times the within-cluster mixture, by hand."""
    q = F.normalize(queries, dim=1)
    p = ident.moe
    scores = torch.zeros(len(q), ident.assignment.num_classes)
    for i in range(len(q)):
        # an identity in two searched clusters (clustering.overlap) counts half in each
        # cluster's class means: the class means weigh every identity once
        held = torch.zeros(ident.assignment.num_classes)
        for k in candidates[i]:
            held[ident.members(k)] += 1
        logits = {
            k: (q[i] @ ident.assignment.class_means[ident.members(k)].T) / p.router_temperature
            - held[ident.members(k)].log()
            for k in candidates[i]
        }
        mass = {k: torch.logsumexp(s, 0) for k, s in logits.items()}
        total = torch.logsumexp(torch.stack(list(mass.values())), 0)
        for k in candidates[i]:
            members = ident.members(k)
            sub = torch.softmax(q[i] @ ident.head(k).T / p.subnet_temperature, 0)
            mean = torch.softmax(logits[k], 0)
            mixed = (1 - p.generalist_weight) * sub + p.generalist_weight * mean
            # an identity in two searched clusters (clustering.overlap): both terms
            scores[i, members] += torch.exp(mass[k] - total) * mixed
    return scores


@pytest.mark.parametrize("top_m", [1, 2, 4])
@pytest.mark.parametrize("weight", [0.0, 0.4, 1.0])
def test_moe_scores_are_the_cluster_probability_times_the_mixture(top_m, weight):
    ident, queries = _moe_identifier(weight)
    result = ident.identify(queries, top_m=top_m, k=3)
    expected = _brute_force(ident, queries, result.clusters.tolist())
    best = expected.topk(3, dim=1)
    assert torch.equal(result.candidates, best.indices)
    # scores are log-probabilities
    assert torch.allclose(result.candidate_scores.exp(), best.values, atol=1e-6)
    # the similarity an open-set threshold compares: the two cosines, weighted as mixed
    q = F.normalize(queries, dim=1)
    for i, j in enumerate(result.identity.tolist()):
        c = int(ident.class_to_cluster[j])
        row = int(ident.assignment.local_index[j])
        close = (1 - weight) * (q[i] @ ident.head(c)[row]) + weight * (
            q[i] @ ident.assignment.class_means[j]
        )
        assert result.similarity[i].item() == pytest.approx(close.item(), abs=1e-5)
    threshold = result.similarity.median().item()
    assert torch.equal(result.answer(threshold) == -1, result.similarity < threshold)
    # probabilities: over the candidates' identities they sum to 1
    assert torch.allclose(expected.sum(1), torch.ones(len(queries)), atol=1e-5)
    assert result.subnet_forwards == (0 if weight == 1.0 else len(queries) * top_m)
    # batched answers equal one-by-one answers
    for i in range(0, len(queries), 16):
        one = ident.identify(queries[i : i + 1], top_m=top_m)
        assert one.identity.item() == result.identity[i].item()


def _overlap_identifier(identities: int, overlap: list[list[int]]) -> TwoStageIdentifier:
    """A moe identifier over 4 clusters (identity i in cluster i % 4) of random 8-d class
    means and heads, with ``overlap``'s (identity, cluster) rows."""
    a = _assignment(torch.randn(identities, 8), [i % 4 for i in range(identities)])
    a = a.with_overlap(torch.tensor(overlap))
    heads = [F.normalize(torch.randn(len(a.classes_of(k)), 8), dim=1) for k in range(4)]
    route = dict(ROUTE, **MOE, generalist_weight=0.4)
    names = [f"id{i}" for i in range(identities)]
    return TwoStageIdentifier(
        BACKBONE, torch.nn.Identity(), [torch.nn.Identity()] * 4, heads, a, names, route
    )


@pytest.mark.parametrize("top_m", [1, 2, 4])
def test_moe_sums_an_identity_over_its_two_searched_clusters(top_m):
    # clustering.overlap: identities 0, 3, 6, ... are also members of the next cluster.
    # The mixture gives such an identity both clusters' terms when both are searched
    # (the calibration's router likelihood counts it so); keeping the larger term alone
    # left the candidates' probabilities summing to less than 1.
    torch.manual_seed(5)
    ident = _overlap_identifier(30, [[c, (c % 4 + 1) % 4] for c in range(0, 30, 3)])
    a = ident.assignment
    queries = torch.randn(64, 8)
    result = ident.identify(queries, top_m=top_m, k=30)
    expected = _brute_force(ident, queries, result.clusters.tolist())
    kept = result.candidates < 30
    assert torch.allclose(
        result.candidate_scores.exp(),
        expected.gather(1, result.candidates.clamp(max=29)) * kept,
        atol=1e-6,
    )
    assert torch.equal(result.identity, expected.argmax(1))
    # each identity once, and their probabilities sum to 1
    for row in result.candidates[kept.all(1)].tolist():
        assert len(set(row)) == len(row)
    assert torch.allclose(result.candidate_scores.exp().sum(1), torch.ones(64), atol=1e-5)
    # its cluster and similarity are those of the larger of its two terms
    q = F.normalize(queries, dim=1)
    p = ident.moe
    for i in range(0, 64, 7):
        clusters = result.clusters[i].tolist()
        held = torch.zeros(30)  # how many searched clusters hold each identity
        for c in clusters:
            held[ident.members(c)] += 1
        logits = {
            c: q[i] @ a.class_means[ident.members(c)].T / 0.1 - held[ident.members(c)].log()
            for c in clusters
        }
        total = torch.logsumexp(torch.stack([torch.logsumexp(logits[c], 0) for c in clusters]), 0)
        for j, by, close in zip(
            result.candidates[i].tolist(),
            result.candidate_clusters[i].tolist(),
            result.candidate_similarities[i].tolist(),
            strict=True,
        ):
            if j == 30:  # an empty place: fewer identities were searched
                continue
            terms = {}
            for c in clusters:
                members = ident.members(c)
                if j in members.tolist():
                    row = members.tolist().index(j)
                    sub = torch.softmax(q[i] @ ident.head(c).T / p.subnet_temperature, 0)[row]
                    mean = torch.softmax(logits[c], 0)[row]
                    mass = torch.logsumexp(logits[c], 0)
                    terms[c] = (
                        (torch.exp(mass - total) * (0.6 * sub + 0.4 * mean)).item(),
                        (
                            0.6 * (q[i] @ ident.head(c)[row]) + 0.4 * (q[i] @ a.class_means[j])
                        ).item(),
                    )
            larger = max(terms[c][0] for c in terms)
            assert terms[by][0] == pytest.approx(larger, rel=1e-5)  # float32 ties aside
            assert close == pytest.approx(terms[by][1], abs=1e-5)
    # with the class means alone (g = 1) the unit is nearest class mean over the
    # candidates' identities: a shared identity's mean counted twice had outvoted a
    # nearer one (routed and over every cluster)
    ident.route_config["generalist_weight"] = 1.0
    for kwargs in ({"top_m": top_m}, {"top_m": ident.num_clusters}):
        alone = ident.identify(queries, **kwargs)
        sims = q @ a.class_means.T
        searched = a.contains(torch.arange(30)[None, :, None], alone.clusters[:, None, :]).any(2)
        nearest = sims.masked_fill(~searched, -2).argmax(1)
        assert torch.equal(alone.identity, nearest), kwargs
    ident.route_config["generalist_weight"] = 0.4
    # the weight given to identify (the evaluation's weight sweep) is the weight in the
    # config: the same answers, with the fitted temperatures; outside [0, 1] refused
    for weight in (0.0, 1.0):
        given = ident.identify(queries, top_m=top_m, generalist_weight=weight, k=5)
        ident.route_config["generalist_weight"] = weight
        kept = ident.identify(queries, top_m=top_m, k=5)
        ident.route_config["generalist_weight"] = 0.4
        assert torch.equal(given.candidates, kept.candidates)
        assert given.subnet_forwards == kept.subnet_forwards
        assert torch.equal(given.candidate_scores, kept.candidate_scores)
    assert ident.moe.generalist_weight == 0.4  # the identifier's own is left as it was
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"generalist_weight=.*: a weight in \[0, 1\]"):
            ident.identify(queries, generalist_weight=bad)
    # an empty batch gives an empty answer, as without overlap
    assert ident.identify(queries[:0], top_m=top_m, k=30).candidates.shape == (0, 30)
    # batched answers equal one-by-one answers
    for i in range(0, 64, 9):
        one = ident.identify(queries[i : i + 1], top_m=top_m, k=30)
        assert torch.equal(one.candidates[0], result.candidates[i])
        assert torch.equal(one.candidate_clusters[0], result.candidate_clusters[i])


def test_moe_with_every_identity_in_two_clusters():
    # clustering.overlap=1: no cluster holds an identity of its own alone (the columns
    # merged at once were none, and an empty merge crashed every pass)
    torch.manual_seed(6)
    rows = sorted(([(i + 1) % 4, i] for i in range(12)), key=lambda r: r)  # by cluster
    ident = _overlap_identifier(12, [[i, c] for c, i in rows])
    queries = torch.randn(16, 8)
    for top_m in (1, 2, 4):
        result = ident.identify(queries, top_m=top_m)  # k=1: argmax over each cluster
        expected = _brute_force(ident, queries, result.clusters.tolist())
        assert torch.equal(result.identity, expected.argmax(1)), top_m
    # ISM: each identity's higher sub-net cosine of its two, never summed
    q = F.normalize(queries, dim=1)
    by_hand = torch.full((len(q), 12), -2.0)
    for k in range(4):
        members = ident.members(k)
        by_hand[:, members] = torch.maximum(by_hand[:, members], q @ ident.head(k).T)
    ism = ident.identify(queries, all_subnets=True, k=12)
    assert torch.equal(ism.identity, by_hand.argmax(1))
    assert torch.allclose(ism.candidate_scores, by_hand.sort(1, descending=True).values)


def test_moe_compares_each_face_with_its_candidate_clusters_class_means_only(monkeypatch):
    # a batch of varied faces touches every cluster: comparing every face with every
    # touched cluster's class means was a full scan of the identities per batch (32x the
    # pairs needed at 200K identities, K=64, in a reviewer's measurement)
    from facecluster.inference import identifier as module

    ident, queries = _moe_identifier(0.4)
    pairs = []
    real = module.similarity
    monkeypatch.setattr(
        module, "similarity", lambda a, b: pairs.append(len(a) * len(b)) or real(a, b)
    )
    result = ident.identify(queries, top_m=2)
    needed = sum(len(ident.members(c)) for row in result.clusters.tolist() for c in row)
    assert sum(pairs) == 2 * needed  # each pair's class-mean and sub-net head cosines


@pytest.mark.parametrize("weight", [0.4, 1.0])
def test_reported_subnet_forwards_and_parameters_are_what_a_pass_runs(weight):
    # at a generalist weight of 1 no routed sub-net runs: its row reports none and holds
    # none; ISM runs every sub-net and nothing else, whatever the weight
    ident, queries = _moe_identifier(weight)
    routed, ism = ident.routed(2, 0.0), ident.all_subnets()
    runs = ident.identify(queries, top_m=2).subnet_forwards > 0
    assert runs == (weight < 1)
    assert routed.subnet_forwards == (2.0 if runs else 0.0)
    assert ident.identify(queries, all_subnets=True).subnet_forwards == len(queries) * 4
    assert ism.subnet_forwards == 4.0
    # the router: its backbone and the class means it ranks the clusters by (and that
    # moe's class-mean term scores against), which the rows left out (review)
    router = count_parameters(ident.router_backbone) + ident.grouped_means.numel()
    assert (routed.params > router) == runs and routed.params >= router
    heads = sum(ident.head_rows(k).numel() for k in range(4))
    assert ism.params == count_parameters(*ident.subnets) + heads


def test_ism_is_the_subnets_alone_and_a_routing_miss_is_not_forced():
    # ISM, the paper's baseline: each sub-net's best cosine, the highest wins; no router,
    # no class means, no fitted temperature (one fitted with g = 1 is arbitrary). Under
    # moe it had been the mixture over every cluster, which leans on the class means
    ident, queries = _moe_identifier(0.3, seed=2)
    q = F.normalize(queries, dim=1)
    by_hand = torch.zeros(len(q), ident.assignment.num_classes)
    for k in range(ident.num_clusters):
        by_hand[:, ident.members(k)] = q @ ident.head(k).T
    ism = ident.identify(queries, all_subnets=True)
    assert torch.equal(ism.identity, by_hand.argmax(1))
    assert torch.allclose(ism.score, by_hand.amax(1)) and torch.equal(ism.score, ism.similarity)
    # the class means, the generalist weight and the temperatures play no part
    every = ident.identify(queries, top_m=ident.num_clusters)
    assert not torch.equal(every.identity, ism.identity)
    ident.route_config.update(generalist_weight=0.9, subnet_temperature=0.005)
    ident.grouped_means.normal_()  # what the router and the class-mean term read
    assert torch.equal(ident.identify(queries, all_subnets=True).identity, ism.identity)
    # so an uncalibrated moe identifier answers ISM (it asked for a calibration first)
    fitted = dict(ident.route_config)
    ident.route_config.update(router_temperature=None)
    assert torch.equal(ident.identify(queries, all_subnets=True).identity, ism.identity)
    with pytest.raises(ValueError, match="calibrate"):
        ident.identify(queries, top_m=4)
    ident.route_config.update(fitted)
    assert not torch.equal(ident.identify(queries, top_m=4).identity, every.identity)
    ident, queries = _moe_identifier(0.3, seed=2)
    # a candidate that the router ranks second can win when its sub-net is sure
    top1 = ident.identify(queries, top_m=1)
    top2 = ident.identify(queries, top_m=2)
    moved = top2.identity != top1.identity
    assert bool(moved.any())
    assert bool((ident.class_to_cluster[top2.identity[moved]] == top2.clusters[moved, 1]).all())


def test_a_subnet_that_says_not_mine_gives_its_identities_less():
    # stage2.negatives: the sub-net's softmax also covers its "not mine" row, whose share
    # no identity gets; the identifier splits that row off the trained head
    p = MoeParams(0.1, 0.05, 0.3)
    cosine, means = torch.tensor([[0.6, 0.2, 0.1]]), torch.tensor([[0.5, 0.3, 0.2]])
    weight = torch.tensor([0.5]).log()
    for not_mine in (torch.tensor([[-0.2]]), torch.tensor([[0.9]])):
        scores = moe_scores(weight, cosine, means, p, not_mine).exp()
        sub = torch.softmax(torch.cat([cosine, not_mine], 1).double() / 0.05, 1)[:, :3]
        mean = torch.softmax(means.double() / 0.1, 1)
        assert torch.allclose(scores, 0.5 * (0.7 * sub + 0.3 * mean))
    sure = moe_scores(weight, cosine, means, p, torch.tensor([[0.9]])).exp().sum()
    assert float(sure) < 0.5 * 0.31  # "not mine": little more than the generalist's share
    ident, queries = _random_identifier()
    heads = [torch.cat([ident.head(k), F.normalize(torch.randn(1, 8), dim=1)]) for k in range(4)]
    names, a = ident.class_names, ident.assignment

    def build(rows):
        args = (ident.backbone_args, ident.router_backbone, ident.subnets, rows, a, names)
        return TwoStageIdentifier(*args, dict(ident.route_config))

    split = build(heads)
    for k in range(4):
        assert torch.allclose(split.head(k), ident.head(k))
        assert split.head_rows(k).shape[0] == len(a.classes_of(k)) + 1  # what export writes
    with pytest.raises(ValueError, match="sub-net 0's head has 10 rows for its 8 identities"):
        build([torch.cat([h, h[:1]]) for h in heads])
    # the linear unit does not use the row: the same answers
    every = {"top_m": 4, "alpha": 0.3}
    assert torch.equal(
        split.identify(queries, **every).identity, ident.identify(queries, **every).identity
    )


def test_stage1_rows_score_in_float32_under_mixed_precision():
    """The baselines' rows compare as the routed rows do: head and class-mean cosines
    in float32 under a bf16 autocast, not rounded to bf16's 3 digits (ties)."""
    torch.manual_seed(0)
    head, means = torch.randn(1000, 64), F.normalize(torch.randn(1000, 64), dim=1)
    model = StageOneModel(torch.nn.Linear(32, 64), head, means)
    images = torch.randn(40, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the backbone runs in bf16
        embeddings = model.embed(images)
        rows = [p.predict(images, 5) for p in model.predictors()]
    for (ids, scores, _), rows_of in zip(rows, (F.normalize(head, dim=1), means), strict=True):
        exact = (embeddings @ rows_of.T).max(dim=1)
        assert scores.dtype == torch.float32 and torch.equal(ids[:, 0], exact.indices)
        torch.testing.assert_close(scores, exact.values)
        # the 5 best, best first: the evaluation's top-5
        ranked = torch.sort(embeddings @ rows_of.T, dim=1, descending=True, stable=True)
        assert torch.equal(ids, ranked.indices[:, :5])


def test_the_stage1_model_moves_its_class_means_with_its_weights():
    """A second evaluation of a single-model run reads its class means from
    eval/class_means.pt onto the CPU: on a GPU the nearest-class-mean row then failed
    with a device mismatch (the means were an attribute that .to() did not move)."""
    head, means = torch.randn(10, 4), F.normalize(torch.randn(10, 4), dim=1)
    model = StageOneModel(torch.nn.Linear(4, 4), head, means).to("meta")
    assert {t.device.type for t in (model.head, model.class_means)} == {"meta"}
    assert all(p.device.type == "meta" for p in model.parameters())
    # not part of the state dict: the run's files and exports keep their keys
    assert "class_means" not in StageOneModel(torch.nn.Linear(4, 4), head, means).state_dict()
    assert StageOneModel(torch.nn.Linear(4, 4), head).class_means is None


def test_moe_without_its_numbers_asks_for_calibration():
    ident, queries = _random_identifier()
    ident.route_config["decision"] = "moe"
    with pytest.raises(ValueError, match="calibrate"):
        ident.identify(queries)
    p = MoeParams(0.1, 0.05, 1.0)
    weight = torch.tensor([0.25]).log()
    scores = moe_scores(weight, None, torch.tensor([[0.5, 0.1]]), p)  # no sub-net needed
    assert torch.allclose(scores.float().exp(), 0.25 * torch.softmax(torch.tensor([[5.0, 1.0]]), 1))
    # a sure face keeps a score below 0 that thresholds can still order (p rounds to 1)
    sure = moe_scores(
        torch.zeros(1), torch.tensor([[0.9, 0.0]]), torch.tensor([[0.9, 0.0]]),
        MoeParams(0.05, 0.05, 0.5),
    )  # fmt: skip
    assert sure.float().exp()[0, 0] == 1.0 and -1e-7 < float(sure[0, 0]) < 0
    # under bf16 autocast the scores are still float32 from float32 products
    q = F.normalize(torch.randn(4, 8), dim=1)
    exact = q @ q.T
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(similarity(q, q), exact)
        assert not torch.equal(q @ q.T, exact)  # what autocast alone would give
    # the fitted numbers are set together or not at all
    with pytest.raises(ConfigError, match="route.router_temperature set without"):
        load_config(SMOKE, ["route.router_temperature=0.1"])


def test_calibration_recovers_the_temperatures_that_generated_the_labels():
    torch.manual_seed(0)
    n, k, per = 4000, 4, 5
    classes = k * per
    class_to_cluster = torch.arange(classes) // per
    true_router, true_subnet = 0.1, 0.03
    similarity = torch.rand(n, classes) * 0.6
    labels = torch.distributions.Categorical(logits=similarity / true_router).sample()
    calibration = Calibration()
    right = class_to_cluster[labels][:, None] == torch.arange(k)
    ones = torch.ones(per)
    log_mass = [Calibration.cluster_log_mass(similarity[:, c * per : (c + 1) * per], ones)
                for c in range(k)]  # fmt: skip
    calibration.update_router(torch.stack(log_mass, dim=2), right)
    # a cluster's class means go through in blocks (bounded memory at 2M identities): any
    # block size gives the same masses
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(decision, "MEMBER_BLOCK", 2)
        blocked = Calibration.cluster_log_mass(similarity[:, :per], ones)
    torch.testing.assert_close(blocked, log_mass[0], rtol=1e-9, atol=1e-9)
    # a face whose cluster is far below its best class mean: at the coldest temperature
    # its likelihood is tiny, not zero (in float32 it underflowed, and that temperature's
    # whole sum became infinite)
    far = Calibration()
    far_mass = [
        Calibration.cluster_log_mass(torch.tensor([[s]]), torch.ones(1)) for s in (0.9, 0.1)
    ]
    far.update_router(torch.stack(far_mass, dim=2), torch.tensor([[False, True]]))
    assert bool(torch.isfinite(far.router_nll).all())
    assert far.router_nll[0].item() == pytest.approx(0.8 / float(TEMPERATURES[0]), rel=1e-6)
    # identity 1 in both clusters (clustering.overlap): half its term in each, as routed
    # inference over every cluster counts it, so the total counts it once. A face of
    # identity 2 (cluster 1): p = (e^{s1}/2 + e^{s2}) / (e^{s0} + e^{s1} + e^{s2})
    shared = Calibration()
    s = torch.tensor([[0.5, 0.4, 0.2]], dtype=torch.float64)
    halves = torch.tensor([1.0, 0.5])
    shared_mass = [Calibration.cluster_log_mass(s[:, :2], halves),
                   Calibration.cluster_log_mass(s[:, 1:], halves.flip(0))]  # fmt: skip
    shared.update_router(torch.stack(shared_mass, dim=2), torch.tensor([[False, True]]))
    t = float(TEMPERATURES[20])
    e = torch.exp(s[0] / t)
    expected = -torch.log((e[1] / 2 + e[2]) / e.sum()).item()
    assert shared.router_nll[20].item() == pytest.approx(expected, rel=1e-6)
    # sub-net cosines whose softmax at true_subnet gives the right identity its probability
    for c in range(k):
        rows = (class_to_cluster[labels] == c).nonzero().squeeze(1)
        cosine = torch.rand(len(rows), per) * 0.3
        local = torch.distributions.Categorical(logits=cosine / true_subnet).sample()
        mean = similarity[rows][:, c * per : (c + 1) * per]
        calibration.update_within(cosine, mean, local)
    fitted = calibration.fit()
    step = math.log(float(TEMPERATURES[1] / TEMPERATURES[0]))
    assert abs(math.log(fitted.router_temperature / true_router)) <= 2 * step
    assert abs(math.log(fitted.subnet_temperature / true_subnet)) <= 2 * step
    # the labels came from the sub-nets alone: the class means get little weight
    assert fitted.generalist_weight <= 0.2
    with pytest.raises(ValueError, match="no validation faces"):
        Calibration().fit()


def test_calibration_with_a_router_that_cannot_miss_fits_the_class_means_temperature():
    # one cluster (or every face routed right): the router NLL is the same at every
    # temperature, and the fit took the coldest, 0.005, which is also the class means'
    # softmax temperature inside a cluster: the class means then got no weight
    torch.manual_seed(0)
    n, classes, true_t = 2000, 20, 0.1
    similarity = torch.rand(n, classes) * 0.6
    labels = torch.distributions.Categorical(logits=similarity / true_t).sample()
    calibration = Calibration()
    log_mass = Calibration.cluster_log_mass(similarity, torch.ones(classes))
    calibration.update_router(log_mass[:, :, None], torch.ones(n, 1, dtype=torch.bool))
    assert calibration.router_nll.abs().max() < 1e-9  # flat
    calibration.update_within(torch.rand(n, classes) * 0.3, similarity, labels)  # no signal
    fitted = calibration.fit()
    step = math.log(float(TEMPERATURES[1] / TEMPERATURES[0]))
    assert abs(math.log(fitted.router_temperature / true_t)) <= 2 * step
    assert fitted.generalist_weight >= 0.8  # the labels came from the class means


# ------------------------------------------------------------------ shared layers


@pytest.mark.parametrize("name", ["tiny", "iresnet18"])
def test_trunk_then_tail_is_the_whole_backbone(name):
    torch.manual_seed(0)
    net = create_backbone(name, embedding_dim=16, image_size=32, width=4).eval()
    images = torch.randn(3, 3, 32, 32)
    assert shareable_stages(net) == 4
    for stages in range(5):
        assert torch.allclose(net.tail(net.trunk(images, stages), stages), net(images), atol=1e-6)
    assert shareable_stages(create_backbone("resnet18", embedding_dim=16)) == 0


def test_a_backbone_without_stages_is_refused_before_training(tmp_path):
    cfg = load_config(
        SMOKE, smoke_overrides(tmp_path, "model.backbone=resnet18", "model.shared_layers=2")
    )
    with pytest.raises(ConfigError, match="model.shared_layers=2.*cannot share"):
        train(cfg)
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_shared_layers_stay_the_stage1_trunk_and_routed_inference_runs_it_once(tmp_path):
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "model.shared_layers=2", "logger=csv"))
    run = train(cfg).run_dir
    folder = RunFolder(run)
    stage1 = folder.stage1_weights().backbone
    trunk = [n for n in stage1 if n.startswith(("features.0.", "features.1.", "features.4."))]
    trained = [n for n in stage1 if n.startswith("features.6.")]  # stage 3's conv
    for subnet in folder.subnet_weights():
        assert all(torch.equal(subnet.backbone[n], stage1[n]) for n in trunk)  # BN stats too
        assert any(not torch.equal(subnet.backbone[n], stage1[n]) for n in trained)
    # training held one trunk for the 3 sub-nets, and its checkpoint stores it once
    state = load_plain(next((run / "stage2").rglob("last.ckpt")))["state_dict"]
    for n in trunk:
        stored = {state[f"subnets.{k}.{n}"].untyped_storage().data_ptr() for k in range(3)}
        assert len(stored) == 1, n
    assert len({state[f"subnets.{k}.features.6.weight"].data_ptr() for k in range(3)}) == 3
    report = evaluate_run(run)  # fits the decision unit on the validation split, once
    assert report.rows[0].model.endswith("(top_m=1, moe)")
    assert report.decision == {"decision": "moe", "alpha": 0.0, **folder.calibration()}
    shared = TwoStageIdentifier.from_run(run)
    assert shared.shared_layers == 2 and shared.moe is not None
    whole = TwoStageIdentifier.from_run(run)
    whole.shared_layers = 0  # every network from the images: the same answers
    images = torch.randn(6, 3, 112, 112)
    a, b = shared.identify(images, top_m=2, k=3), whole.identify(images, top_m=2, k=3)
    assert torch.equal(a.candidates, b.candidates)
    assert torch.allclose(a.candidate_scores, b.candidate_scores, atol=1e-5)
    # one trunk in memory and in the parameter count, not K + 1
    trunk = shared.router_backbone.trunk_modules(2)
    assert all(
        m is t for s in shared.subnets for m, t in zip(s.trunk_modules(2), trunk, strict=True)
    )
    per_net = sum(p.numel() for p in shared.router_backbone.parameters())
    in_trunk = sum(p.numel() for m in trunk for p in m.parameters())
    heads = sum(shared.head(k).numel() for k in range(shared.num_clusters))
    expected = per_net + shared.num_clusters * (per_net - in_trunk)
    means = shared.grouped_means.numel()
    assert shared.routed(1, 0.0).params == expected + heads + means


@pytest.mark.parametrize("kind", ["ties", "normal", "minus_inf", "nan", "nan_ties"])
def test_top_columns_is_the_stable_sorts_first_k(kind):
    """identify's k candidates: the best k scores, equal ones by lower id, exactly what
    a stable sort of every column gives (topk alone picks among ties in no set order)."""
    gen = torch.Generator().manual_seed(3)
    for _ in range(40):
        rows, n = (int(v) for v in torch.randint(1, 40, (2,), generator=gen))
        if kind in ("ties", "nan_ties"):  # NaN: topk counts it above every number
            score = torch.randint(0, 3, (rows, n), generator=gen).float()
        else:
            score = torch.randn(rows, n, generator=gen)
        if kind == "minus_inf":
            score[torch.rand(rows, n, generator=gen) < 0.4] = -torch.inf
        if kind in ("nan", "nan_ties"):
            score[torch.rand(rows, n, generator=gen) < 0.2] = torch.nan
        whole = torch.sort(score, dim=1, descending=True, stable=True).indices
        for k in (1, 2, 5, n, n + 1):
            assert torch.equal(top_columns(score, k), whole[:, :k]), (kind, k)


def test_sum_shared_in_chunks_of_faces_equals_it_at_once():
    # a batch at top_m = K over a 2M-identity overlap merged 200M elements at once (15 GB,
    # computed): faces are independent, so groups of whole faces give the same sums,
    # similarities and clusters, the first cluster still winning a tie
    g = torch.Generator().manual_seed(3)
    shared = torch.randperm(60, generator=g)[:24]
    parts = []
    for c in range(3):
        members = torch.sort(shared[torch.randperm(24, generator=g)[:16]]).values
        rows = torch.sort(torch.randperm(10, generator=g)[:7]).values  # faces routed here
        score = torch.randn(7, 16, generator=g).round(decimals=1)  # ties across clusters
        score[0, :4] = -math.inf
        close = torch.randn(7, 16, generator=g)
        source = torch.full((7, 16), c, dtype=torch.long)
        parts.append((rows, members, score, close, source))
    whole = [tuple(t.clone() for t in part) for part in parts]
    decision.sum_shared(whole)
    for chunk in (1, 16, 50, 3 * 16 * 3):  # one face a time (at most), up to a few
        chunked = [tuple(t.clone() for t in part) for part in parts]
        decision.sum_shared(chunked, chunk)
        for got, want in zip(chunked, whole, strict=True):
            for a, b in zip(got[2:], want[2:], strict=True):
                assert torch.equal(a, b), chunk
    assert not all(torch.equal(a[2], b[2]) for a, b in zip(whole, parts, strict=True))
