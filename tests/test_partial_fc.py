"""Partial FC: a margin head sharded over 3 gloo processes (and sampled) against the
whole head in one process: same loss, same backbone and head gradients, same
predictions, same clipping; every positive kept and the sampled count exact; a
whole-head checkpoint split over the processes and gathered back."""

from __future__ import annotations

import math

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

from facecluster.models.backbone_module import BackboneSystem
from facecluster.models.base import clip_gradients_
from facecluster.models.components import AdaFace, ArcFace, CosFace
from facecluster.models.components.partial_fc import gather_to_first, sample_columns, shard_range

CLASSES, DIM, IN = 11, 16, 12
WORLD = 3  # shards of 4, 4 and 3 rows
BATCH = [slice(0, 4), slice(4, 7), slice(7, 8)]  # each rank's rows of the batch: unequal


def _data(head_cls):
    torch.manual_seed(0)
    backbone = nn.Linear(IN, DIM)
    head = head_cls(CLASSES, DIM, s=16.0)
    x = torch.randn(8, IN, dtype=torch.float32)
    y = torch.tensor([0, 3, 5, 10, 6, 9, 2, 6])  # classes on both shards ([0, 6), [6, 11))
    return backbone, head, x, y


class _Net(nn.Module):
    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.backbone(x)


HEADS = {"arcface": ArcFace, "cosface": CosFace, "adaface": AdaFace}


def _worker(rank: int, store: str, out: dict) -> None:
    # forked from a process whose OpenMP pool may be running: one thread, as
    # DataLoader's forked workers do
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD)
    try:
        result = {name: _sharded_step(rank, head_cls) for name, head_cls in HEADS.items()}
        out[rank] = result | {  # one assignment:
            "checkpoint": _checkpoint_round_trip(rank),
            "fp16": _fp16_overflow_steps(rank),
        }  # a manager's dict does not see changes made inside its values
    finally:
        dist.destroy_process_group()


def _fp16_overflow_steps(rank: int) -> dict[str, tuple]:
    """GroupSkipMixedPrecision's step with sharded heads when only rank 1's shards
    overflow: of sub-net 1 (``one``), of both (``all``), of stage 1's single group
    (``stage1``). Per case: which groups stepped on this rank, and the scale after."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    from facecluster.models.precision import group_skip_plugin

    class Model:  # what the plugin reads of a StageSystem
        automatic_optimization = True

        def __init__(self, groups: list[list[nn.Module]]) -> None:
            self.groups = groups

        def clip_groups(self) -> list[list[nn.Module]]:
            return self.groups

    out = {}
    for case, bad in (("one", [1]), ("all", [0, 1]), ("stage1", [0])):
        torch.manual_seed(0)
        heads = [ArcFace(CLASSES, IN, s=16.0) for _ in range(2 if case != "stage1" else 1)]
        for head in heads:
            head.shard(rank, WORLD)
        groups = [[nn.Linear(IN, IN), head] for head in heads]
        params = [[p for m in group for p in m.parameters()] for group in groups]
        optimizer = torch.optim.SGD([p for group in params for p in group], lr=0.1, momentum=0.9)
        lightning_plugin = MixedPrecision(
            "16-mixed", "cpu", torch.amp.GradScaler("cpu", init_scale=4.0)
        )
        plugin = group_skip_plugin(lightning_plugin, WORLD)
        plugin._after_closure = lambda model, optimizer: None  # hooks and clipping: none
        before = [[p.detach().clone() for p in group] for group in params]

        def closure():
            for group in params:  # noqa: B023
                for p in group:
                    p.grad = torch.full_like(p, 4.0)
            if rank == 1:  # this rank's shards only: no other process sees them
                for g in bad:  # noqa: B023
                    groups[g][1].weight.grad[0, 0] = math.inf  # noqa: B023
            return plugin.scaler.scale(torch.tensor(1.0))  # noqa: B023

        plugin.optimizer_step(optimizer, model=Model(groups), closure=closure)
        stepped = [
            all(not torch.equal(p, b) for p, b in zip(group, old, strict=True))
            for group, old in zip(params, before, strict=True)
        ]
        out[case] = (stepped, plugin.scaler.get_scale())
    return out


def _sharded_step(rank: int, head_cls: type) -> dict:
    backbone, head, x, y = _data(head_cls)
    head.shard(rank, WORLD)
    net = _Net(backbone, head)
    net._ddp_params_and_buffers_to_ignore = ["head.weight"]  # what StageSystem sets
    ddp = nn.parallel.DistributedDataParallel(net)
    rows = BATCH[rank]
    loss = head.loss(ddp(x[rows]), y[rows])
    loss.backward()  # DDP averages the backbone's gradients, not the head's
    result = {
        "loss": loss.item(),
        "backbone": [p.grad.clone() for p in backbone.parameters()],
        "head": head.weight.grad.clone(),
        "row_start": head.row_start,
        "predict": head.predict(backbone(x[rows]).detach()),
        "whole": gather_to_first(head.weight.detach(), CLASSES),
        # AdaFace's running statistics: of the whole batch, alike in every process
        "buffers": {name: b.clone() for name, b in head.named_buffers()},
    }
    clip_gradients_([backbone, head], 0.05, None)
    result["clipped"] = [p.grad.clone() for p in (*backbone.parameters(), head.weight)]

    # sampled: every positive kept, max(positives, ceil(r * rows)) rows used
    torch.manual_seed(1 + rank)
    big = ArcFace(40, DIM, s=16.0, sample_rate=0.3)
    big.shard(rank, WORLD)
    emb = torch.randn(4, DIM)
    labels = torch.tensor(SAMPLED_LABELS[rank])
    big.loss(emb, labels).backward()
    result["sampled_rows"] = int((big.weight.grad.abs().sum(1) > 0).sum())
    result["sampled_positive_grads"] = big.weight.grad.abs().sum(1)
    result["sampled_start"] = big.row_start
    return result


SAMPLED_LABELS = [[1, 7, 7, 33], [2, 19, 25, 26], [13, 14, 39, 0]]


def _whole_checkpoint(model: BackboneSystem) -> tuple[dict, int]:
    """A checkpoint as any device count saves it: the whole head and its momentum."""
    torch.manual_seed(5)
    index = [id(p) for g in model._param_groups() for p in g["params"]].index(id(model.head.weight))
    state = {index: {"momentum_buffer": torch.randn(CLASSES, DIM)}}
    whole = {"state_dict": {"head.weight": torch.randn(CLASSES, DIM)}}
    return whole | {"optimizer_states": [{"state": state}]}, index


def _small_model() -> BackboneSystem:
    backbone = {"name": "tiny", "embedding_dim": DIM, "image_size": 16}
    head = {"name": "arcface", "s": 16.0, "m": None}
    optim = {"name": "sgd", "lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4}
    return BackboneSystem(CLASSES, backbone, head, optim)


def _checkpoint_round_trip(rank: int) -> dict:
    # split on load (what Lightning calls after configure_model), gathered on save
    model = _small_model()
    model.shard_heads(rank, WORLD)
    loaded, index = _whole_checkpoint(model)
    model.on_load_checkpoint(loaded)
    saved = {
        "state_dict": {"head.weight": loaded["state_dict"]["head.weight"]},
        "optimizer_states": [
            {"state": {index: dict(loaded["optimizer_states"][0]["state"][index])}}
        ],
    }
    model.on_save_checkpoint(saved)
    return {
        "rows": loaded["state_dict"]["head.weight"],
        "momentum": loaded["optimizer_states"][0]["state"][index]["momentum_buffer"],
        "saved": saved["state_dict"]["head.weight"],
        "saved_momentum": saved["optimizer_states"][0]["state"][index]["momentum_buffer"],
        "ignored": model._ddp_params_and_buffers_to_ignore,
    }


@pytest.fixture(scope="module")
def processes(tmp_path_factory) -> dict:
    """Each rank's results of ``_sharded_step`` for each head, from one gloo run."""
    manager = mp.Manager()
    out = manager.dict()
    # a file store, not a port: a free port found here could be taken by another test
    # process before gloo binds it
    store = str(tmp_path_factory.mktemp("gloo") / "store")
    # from a fork server: a rank forked from this process fails in its backward once
    # an earlier test here has run autograd's threads (the order of test files decides,
    # "Autograd-and-Fork"); a spawned one imports torch and Lightning again (about 9 s
    # each here), the server imports them once for all ranks
    mp.set_forkserver_preload([__name__])
    mp.start_processes(
        _worker, args=(store, out), nprocs=WORLD, join=True, start_method="forkserver"
    )
    return {rank: dict(out[rank]) for rank in range(WORLD)}


@pytest.mark.ddp
@pytest.mark.parametrize("head_name", list(HEADS))
def test_sharded_head_on_three_processes_equals_the_whole_head_in_one(head_name, processes):
    ranks = {rank: processes[rank][head_name] for rank in range(WORLD)}
    backbone, head, x, y = _data(HEADS[head_name])
    embeddings = backbone(x)
    loss = F.cross_entropy(head(embeddings, y), y)
    loss.backward()
    grads = [p.grad.clone() for p in backbone.parameters()]

    for rank in range(WORLD):
        got = ranks[rank]
        assert got["loss"] == pytest.approx(loss.item(), abs=1e-5)
        for g, ref in zip(got["backbone"], grads, strict=True):
            torch.testing.assert_close(g, ref, rtol=0, atol=1e-5)
        start, end = shard_range(CLASSES, rank, WORLD)
        assert got["row_start"] == start
        # float32 sums in another order: head gradients of magnitude ~40 differ by a few
        # ulps (1.1e-5, 2.7e-7 relative, in a fresh install of 2026-11-29), hence rtol
        torch.testing.assert_close(got["head"], head.weight.grad[start:end], rtol=1e-6, atol=1e-5)
        expected = head.cosine(embeddings[BATCH[rank]].detach()).argmax(dim=1)
        assert torch.equal(got["predict"], expected)
    assert torch.equal(ranks[0]["whole"], head.weight.detach())
    for rank in range(WORLD):
        assert ranks[rank]["buffers"].keys() == dict(head.named_buffers()).keys()
        for name, value in head.named_buffers():
            torch.testing.assert_close(ranks[rank]["buffers"][name], value, rtol=0, atol=1e-6)
    assert ranks[1]["whole"] is None and ranks[2]["whole"] is None

    # clipping: one norm over the backbone and both shards, as over the whole head
    params = [*backbone.parameters(), head.weight]
    nn.utils.clip_grad_norm_(params, 0.05)
    for rank in range(WORLD):
        start, end = shard_range(CLASSES, rank, WORLD)
        *got_backbone, got_head = ranks[rank]["clipped"]
        for g, p in zip(got_backbone, backbone.parameters(), strict=True):
            torch.testing.assert_close(g, p.grad, rtol=0, atol=1e-6)
        torch.testing.assert_close(got_head, head.weight.grad[start:end], rtol=0, atol=1e-6)

    # sampled, r = 0.3 of 14 or 13 rows per shard; positives of every rank's labels
    gathered = torch.tensor(SAMPLED_LABELS).flatten()
    for rank in range(WORLD):
        got = ranks[rank]
        start, end = shard_range(40, rank, WORLD)
        mine = sorted({int(c) - start for c in gathered if start <= c < end})
        assert got["sampled_rows"] == max(len(mine), math.ceil(0.3 * (end - start)))
        assert all(got["sampled_positive_grads"][c] > 0 for c in mine)


@pytest.mark.ddp
def test_a_whole_head_checkpoint_is_split_on_load_and_gathered_on_save(processes):
    # what lets N processes' checkpoints resume on M (here 3): rows and momentum
    whole, index = _whole_checkpoint(_small_model())
    momentum = whole["optimizer_states"][0]["state"][index]["momentum_buffer"]
    for rank in range(WORLD):
        got = processes[rank]["checkpoint"]
        start, end = shard_range(CLASSES, rank, WORLD)
        assert torch.equal(got["rows"], whole["state_dict"]["head.weight"][start:end])
        assert torch.equal(got["momentum"], momentum[start:end])
        assert got["ignored"] == ["head.weight"]  # DDP neither broadcasts nor averages it
    assert torch.equal(processes[0]["checkpoint"]["saved"], whole["state_dict"]["head.weight"])
    assert torch.equal(processes[0]["checkpoint"]["saved_momentum"], momentum)


@pytest.mark.ddp
def test_an_fp16_overflow_in_one_shard_skips_that_subnet_on_every_process(processes):
    # a sharded head's gradients are each process's own: a process that skipped a step
    # (a sub-net's, or stage 1's) alone, or lowered its loss scale alone, would leave its
    # replicated backbone apart from the others'
    expected = {"one": ([True, False], 2.0), "all": ([False, False], 2.0), "stage1": ([False], 2.0)}
    assert [processes[rank]["fp16"] for rank in range(WORLD)] == [expected] * WORLD


def test_sample_columns_keeps_every_positive_and_the_exact_count():
    torch.manual_seed(0)
    target = torch.tensor([4, -1, 17, 4, -1, 99])
    index, remapped = sample_columns(target, (0, 100), 100, 0.1)
    assert len(index) == 10 and torch.equal(index, index.sort().values)
    assert {4, 17, 99} <= set(index.tolist())
    assert torch.equal(index[remapped[target >= 0]], target[target >= 0])
    assert remapped[1] == -1 and remapped[4] == -1
    many = torch.arange(30)  # more positives than the sample: all of them, no more
    index, _ = sample_columns(many, (0, 100), 100, 0.1)
    assert torch.equal(index, many)


def test_sampled_head_at_rate_one_is_the_whole_head():
    backbone, head, x, y = _data(ArcFace)
    sampled = ArcFace(CLASSES, DIM, s=16.0, sample_rate=0.999999)
    sampled.weight.data.copy_(head.weight.data)
    full = head.loss(backbone(x), y)
    torch.testing.assert_close(sampled.loss(backbone(x), y), full, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="sample_rate"):
        ArcFace(CLASSES, DIM, sample_rate=0.0)


def test_a_label_outside_the_head_is_refused_sampled_as_whole():
    """Sampled (as every sharded head is, under DDP) a label outside the head's
    identities stopped nothing: it trained as a row whose target logit was 0."""
    backbone, head, x, y = _data(ArcFace)
    sampled = ArcFace(CLASSES, DIM, s=16.0, sample_rate=0.5)
    for bad in (CLASSES, -1):
        labels = y.clone()
        labels[3] = bad
        with pytest.raises(ValueError, match=rf"labels \[{bad}\] are outside this head's 11"):
            sampled.loss(backbone(x), labels)
        with pytest.raises((IndexError, RuntimeError)):  # the whole head: torch's own error
            head.loss(backbone(x), labels)
