"""The stage modules and schedules: per-sub-net clipping, warm start, LR schedules,
mixed precision, and that the real demo recipe learns."""

from __future__ import annotations

import gc
import math
import os

import pytest
import torch

from facecluster.clustering import cluster_identities
from facecluster.config import load_config
from facecluster.models import subnets_module
from facecluster.models.optim import build_optimizer, build_scheduler, lr_factor
from facecluster.models.subnets_module import SubnetSystem
from facecluster.pipeline import train
from tests.conftest import DEMO, DEVICES, ROOT, SMOKE, smoke_overrides

OPTIM = {
    "name": "sgd",
    "lr": 0.1,
    "momentum": 0.9,
    "weight_decay": 0.0,
    "betas": (0.9, 0.999),
    "scheduler": "cosine",
    "warmup_epochs": 1.0,
    "min_lr_ratio": 0.0,
    "poly_power": 2.0,
}


def _subnets(
    num_classes: int = 9, k: int = 3, overlap: float = 0.0, not_mine: bool = False
) -> tuple[SubnetSystem, object]:
    cfg = load_config(SMOKE, ["model.embedding_dim=16"])
    torch.manual_seed(0)
    means = torch.nn.functional.normalize(torch.randn(num_classes, 16), dim=1)
    assignment = cluster_identities(means, k, "balanced", seed=0, overlap=overlap)
    model = SubnetSystem(
        num_classes,
        assignment.cluster_sizes().tolist(),
        backbone=cfg.model.backbone_args(32),
        head={"name": cfg.head.name, "s": cfg.head.s, "m": cfg.head.m},
        optim=OPTIM,
        not_mine=not_mine,
    )
    model.set_assignment(assignment)
    return model, assignment


@pytest.mark.parametrize(("overlap", "not_mine"), [(0.0, False), (0.34, True)])
def test_warm_start_copies_the_backbone_and_class_means(overlap, not_mine):
    # with clustering.overlap a head also has rows for the identities its cluster gains,
    # each where the sub-net's label puts it; stage2.negatives adds a last "not mine" row
    model, assignment = _subnets(overlap=overlap, not_mine=not_mine)
    assert len(assignment.overlap) == round(overlap * 9)
    backbone = model.subnets["0"].state_dict()
    backbone = {k: v + 1.0 if v.is_floating_point() else v for k, v in backbone.items()}
    model.warm_start(backbone, init_heads_from_means=True)
    for subnet in model.subnets.values():
        for key, value in subnet.state_dict().items():
            assert torch.equal(value, backbone[key])
    for k in model.subnet_ids:
        rows = model.heads[str(k)].weight
        members = assignment.classes_of(k)
        assert len(rows) == len(members) + not_mine
        assert torch.equal(rows[: len(members)], assignment.class_means[members])


def test_subnet_dropout_draws_repeat_per_batch_and_differ_per_rank(monkeypatch):
    # A sub-net's dropout masks come from (seed, sub-net, epoch, batch): the same step
    # draws them again, whatever ran before; another DDP rank, with other images,
    # draws its own (the same masks on every rank would drop the same units everywhere).
    cfg = load_config(SMOKE, ["model.embedding_dim=16", "model.dropout=0.5"])
    model = SubnetSystem(
        9, [3, 3, 3], backbone=cfg.model.backbone_args(32),
        head={"name": cfg.head.name, "s": cfg.head.s, "m": cfg.head.m}, optim=OPTIM,
    )  # fmt: skip
    model.train()
    torch.manual_seed(1)
    batch = {0: (torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0]))}

    def loss(rank: int) -> torch.Tensor:
        monkeypatch.setattr(SubnetSystem, "global_rank", property(lambda self: rank))
        torch.manual_seed(rank + 7)  # the global stream plays no part
        with pytest.warns(UserWarning, match="self.log"):  # no Trainer here
            return model.training_step(batch, 3)["loss"].detach()

    assert torch.equal(loss(0), loss(0))
    assert not torch.equal(loss(1), loss(0))
    assert torch.equal(loss(1), loss(1))


def _saved_bytes(fn):
    """fn() and the bytes of the distinct tensors autograd keeps for the backward pass."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return out, sum(storages.values())


def test_activation_checkpointing_holds_one_subnet_at_a_time_and_trains_the_same():
    # stage2.activation_checkpointing: each sub-net's forward pass is recomputed in the
    # backward pass, so a step keeps its input images, not all K sub-nets' activations;
    # the weights, the BatchNorm statistics and the dropout draws are those of the step
    # without it (the BatchNorm layers must not count the recomputation as a batch)
    cfg = load_config(SMOKE, ["model.embedding_dim=16", "model.dropout=0.5"])
    torch.manual_seed(0)
    batch = {k: (torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])) for k in range(3)}
    trained, saved = [], []
    for on in (False, True):
        model = SubnetSystem(
            9, [3, 3, 3], backbone=cfg.model.backbone_args(32),
            head={"name": cfg.head.name, "s": cfg.head.s, "m": cfg.head.m}, optim=OPTIM,
            activation_checkpointing=on,
        )  # fmt: skip
        model.log = lambda *a, **k: None  # no Trainer here
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        for step in range(3):
            out, nbytes = _saved_bytes(lambda: model.training_step(batch, step))  # noqa: B023
            out["loss"].backward()
            optimizer.step()
            optimizer.zero_grad()
        saved.append(nbytes)
        trained.append(model.state_dict())
    assert saved[1] < saved[0] / 3, f"checkpointed step keeps {saved[1]} of {saved[0]} bytes"
    assert trained[0].keys() == trained[1].keys()
    for name, value in trained[0].items():
        assert torch.equal(value, trained[1][name]), name  # buffers: running stats, counts


def test_ddp_leaves_the_head_shards_and_the_clustering_buffers_alone():
    # DDP broadcasts rank 0's buffers before every forward: the cluster maps are set
    # alike on every rank from the clustering and never change, so they are not sent;
    # nor are the heads' shards.
    model, _ = _subnets()
    model.shard_heads(0, 2)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert ignored == {"heads.0.weight", "heads.1.weight", "heads.2.weight",
                       "class_to_cluster", "local_index"}  # fmt: skip
    assert ignored <= set(model.state_dict())


def test_the_class_means_stay_out_of_stage2_checkpoints_and_devices():
    # read once by the warm start: [C, d] in every job's checkpoints and on every GPU
    # would be 3.8 GiB each at 2M identities (computed)
    model, _ = _subnets()
    assert not any("class_means" in name for name in model.state_dict())


def test_subnets_never_load_pretrained_weights(monkeypatch):
    # model.pretrained=true: stage 1 starts from timm's weights; the sub-nets start from
    # the stage-1 backbone, so building them must not fetch the weights K times again
    built = []
    real = subnets_module.create_backbone
    monkeypatch.setattr(
        subnets_module, "create_backbone", lambda **kw: built.append(kw["pretrained"]) or real(**kw)
    )
    cfg = load_config(SMOKE, ["model.embedding_dim=16"])
    backbone = {**cfg.model.backbone_args(32), "pretrained": True}
    head = {"name": cfg.head.name, "s": cfg.head.s, "m": cfg.head.m}
    SubnetSystem(9, [3, 3, 3], backbone=backbone, head=head, optim=OPTIM)
    assert built == [False, False, False]


def test_gradient_clipping_is_per_subnet():
    # One exploding sub-net must not shrink the others' steps (a global norm would).
    model, _ = _subnets()
    for k in model.subnet_ids:
        for p in [*model.subnets[str(k)].parameters(), *model.heads[str(k)].parameters()]:
            p.grad = torch.full_like(p, 1e6 if k == 0 else 1e-4)
    before = [p.grad.clone() for p in model.subnets["1"].parameters()]
    model.configure_gradient_clipping(None, gradient_clip_val=1.0, gradient_clip_algorithm="norm")
    exploding = [p for m in (model.subnets["0"], model.heads["0"]) for p in m.parameters()]
    assert torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in exploding])) <= 1.0 + 1e-4
    for p, b in zip(model.subnets["1"].parameters(), before, strict=True):
        assert torch.equal(p.grad, b), "a small sub-net's gradient was changed"


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_stage_1_clips_its_backbone_and_head_together(algorithm):
    # what a divergence's message advises (trainer.gradient_clip_val, a resume): the
    # stage-1 backbone and its head are one group, by norm or by value
    from facecluster.models.backbone_module import BackboneSystem

    backbone = {"name": "tiny", "embedding_dim": 8, "image_size": 16}
    model = BackboneSystem(5, backbone, {"name": "arcface", "s": 16.0, "m": None}, OPTIM)
    params = [*model.backbone.parameters(), *model.head.parameters()]
    for i, p in enumerate(params):
        p.grad = torch.full_like(p, 1e3 * (-1) ** i)
    model.configure_gradient_clipping(
        None, gradient_clip_val=0.5, gradient_clip_algorithm=algorithm
    )
    grads = [p.grad for p in params]
    if algorithm == "norm":
        total = torch.linalg.vector_norm(torch.stack([g.norm() for g in grads]))
        assert total == pytest.approx(0.5, rel=1e-4)
        ratios = {round(float(g.flatten()[0] / (1e3 * (-1) ** i)), 9) for i, g in enumerate(grads)}
        assert len(ratios) == 1, "the backbone and the head were scaled apart"
    else:
        assert all(torch.equal(g.abs(), torch.full_like(g, 0.5)) for g in grads)


class _StepBatches(torch.utils.data.Dataset):
    """Stage-2 training batches, one per sub-net, ``len`` steps."""

    def __init__(self, steps: int) -> None:
        self.steps = steps

    def __len__(self) -> int:
        return self.steps

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        labels = torch.tensor([0, 1, 2, 0, 1, 2])
        return {k: (torch.randn(6, 3, 32, 32, generator=g), labels) for k in range(3)}


def _fp16_steps(
    plugin_cls, steps: int, overflow_at: int | None, clip: float | None = None, device="cpu"
) -> tuple[dict, float]:
    """Stage 2 under a 16-mixed plugin on ``device`` (fp16 autocast, a GradScaler), sub-net
    1 overflowing at step ``overflow_at``: the trained weights (on the CPU) and the final
    scale."""
    import lightning as L

    model, _ = _subnets()
    model.hparams.optim = {**model.hparams.optim, "weight_decay": 5e-4}  # momentum 0.9

    def overflow(module, args, out):
        return out * math.inf if model.global_step == overflow_at else out

    model.subnets["1"].register_forward_hook(overflow)
    # a low first scale: the default 65536 overflows every sub-net at the first step
    plugin = plugin_cls("16-mixed", device, torch.amp.GradScaler(device, init_scale=4.0))
    trainer = L.Trainer(
        accelerator="cpu" if device == "cpu" else "gpu", devices=1, plugins=[plugin],
        max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, limit_val_batches=0, gradient_clip_val=clip,
    )  # fmt: skip
    loader = torch.utils.data.DataLoader(_StepBatches(steps), batch_size=None)
    trainer.fit(model, train_dataloaders=loader)
    weights = {n: p.detach().cpu().clone() for n, p in model.named_parameters()}
    return weights, plugin.scaler.get_scale()


@pytest.mark.parametrize("device", DEVICES)
def test_an_fp16_overflow_skips_the_step_of_its_own_subnet_only(device):
    # under 16-mixed one loss scaler serves a stage-2 job: an overflow in one sub-net
    # skipped the step of every sub-net of the job (Lightning's MixedPrecision)
    from lightning.pytorch.plugins.precision import MixedPrecision

    from facecluster.models.precision import GroupSkipMixedPrecision

    start = {n: p.detach().clone() for n, p in _subnets()[0].named_parameters()}

    def moved(weights: dict) -> dict[str, bool]:  # per sub-net, with its head
        return {
            k: any(not torch.equal(w, start[n]) for n, w in weights.items()
                   if n.startswith((f"subnets.{k}.", f"heads.{k}.")))
            for k in "012"
        }  # fmt: skip

    weights, scale = _fp16_steps(MixedPrecision, 1, overflow_at=0, device=device)
    assert moved(weights) == {"0": False, "1": False, "2": False} and scale == 2.0
    weights, scale = _fp16_steps(GroupSkipMixedPrecision, 1, overflow_at=0, device=device)
    assert moved(weights) == {"0": True, "1": False, "2": True}  # no decay, no momentum
    assert scale == 2.0  # the scale still backs off
    clipped, _ = _fp16_steps(GroupSkipMixedPrecision, 1, overflow_at=0, clip=1.0, device=device)
    assert moved(clipped) == {"0": True, "1": False, "2": True}  # per-sub-net clipping too
    # without an overflow it is the scaler's own step, weight for weight
    ours, scale = _fp16_steps(GroupSkipMixedPrecision, 2, overflow_at=None, device=device)
    theirs, their_scale = _fp16_steps(MixedPrecision, 2, overflow_at=None, device=device)
    assert moved(ours) == {"0": True, "1": True, "2": True} and scale == their_scale == 4.0
    for name, value in ours.items():
        assert torch.equal(value, theirs[name]), name


def test_only_lightnings_fp16_plugin_is_replaced(tmp_path):
    # 16-mixed on a GPU: Lightning's MixedPrecision, with its scaler, becomes the
    # group-skipping one in every Trainer build_trainer makes (a ShardedGradScaler, from
    # the same settings, with several processes); bf16 (no scaler), fp32 and a plugin of
    # the user's own stay
    import lightning as L
    from lightning.pytorch.plugins.precision import MixedPrecision
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    from facecluster.builders import build_trainer
    from facecluster.models.precision import (
        GroupSkipMixedPrecision,
        group_skip_plugin,
        skip_groups_apart,
    )
    from facecluster.run import RunFolder, job_name

    class Own(MixedPrecision):
        pass

    quiet = {"logger": False, "enable_progress_bar": False, "enable_model_summary": False}
    fp16 = MixedPrecision("16-mixed", "cpu")
    cfg = load_config(SMOKE, ["trainer.accelerator=cpu"])
    # on the CPU Lightning turns "16-mixed" into bf16: its fp16 plugin given instead
    cfg.trainer.update(precision=None, plugins=[fp16])
    for stage, job in ((1, None), (2, job_name([0, 1, 2]))):
        trainer = build_trainer(cfg, stage, RunFolder(tmp_path / "run"), None, [], job=job)
        assert type(trainer.precision_plugin) is GroupSkipMixedPrecision, stage
        assert trainer.precision_plugin.scaler is fp16.scaler and trainer.precision == "16-mixed"
    fp16.scaler = torch.amp.GradScaler("cpu", init_scale=32.0, growth_interval=7)
    sharded = group_skip_plugin(fp16, 2).scaler
    assert type(sharded) is ShardedGradScaler and sharded.state_dict() == fp16.scaler.state_dict()
    # a checkpoint saved under Lightning's plugin resumes with the scale it had reached
    saved = torch.amp.GradScaler("cpu", init_scale=8.0).state_dict()
    trainer = L.Trainer(accelerator="cpu", plugins=[MixedPrecision("16-mixed", "cpu")], **quiet)
    skip_groups_apart(trainer)
    trainer.precision_plugin.on_load_checkpoint({"MixedPrecision": saved})
    assert trainer.precision_plugin.scaler.get_scale() == 8.0
    for kept in (Own("16-mixed", "cpu"), "bf16-mixed", "32-true"):
        plugins = {"plugins": [kept]} if not isinstance(kept, str) else {"precision": kept}
        trainer = L.Trainer(accelerator="cpu", **plugins, **quiet)
        plugin = trainer.precision_plugin
        skip_groups_apart(trainer)
        assert trainer.precision_plugin is plugin


def test_assignment_buffers_survive_a_state_dict_round_trip():
    model, assignment = _subnets()
    fresh, _ = _subnets()
    fresh.class_to_cluster.zero_()
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(fresh.class_to_cluster, assignment.class_to_cluster)
    assert torch.equal(fresh.local_index, assignment.local_index)


@pytest.mark.parametrize("scheduler", ["cosine", "poly", "constant"])
def test_lr_schedule_warms_up_then_decays(scheduler):
    optim = dict(OPTIM, scheduler=scheduler, min_lr_ratio=0.1)
    total, warmup = 100, 10
    factors = [lr_factor(step, total, warmup, optim) for step in range(total + 1)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == pytest.approx(1.0)
    tail = factors[warmup:]
    assert all(a >= b for a, b in zip(tail, tail[1:], strict=False)), "monotone after warm-up"
    if scheduler == "constant":
        assert tail[-1] == 1.0
    else:
        assert tail[-1] == pytest.approx(0.1)
    # half-way through the decay (step 55 of warm-up 10 + 90): each shape's own value
    if scheduler == "cosine":
        assert lr_factor(55, total, warmup, optim) == pytest.approx(0.1 + 0.9 * 0.5)
    if scheduler == "poly":  # floor + (1 - floor) * (1 - progress) ** poly_power
        assert lr_factor(55, total, warmup, optim) == pytest.approx(0.1 + 0.9 * 0.5**2.0)
        cubic = dict(optim, poly_power=3.0)
        assert lr_factor(55, total, warmup, cubic) == pytest.approx(0.1 + 0.9 * 0.5**3.0)


def test_adamw_is_built_with_the_configured_betas_and_each_groups_weight_decay():
    decayed, exempt = torch.nn.Parameter(torch.zeros(2, 2)), torch.nn.Parameter(torch.zeros(2))
    groups = [
        {"params": [decayed], "weight_decay": 5e-4},
        {"params": [exempt], "weight_decay": 0.0},
    ]
    optim = dict(OPTIM, name="adamw", lr=0.01, betas=(0.8, 0.95))
    optimizer = build_optimizer(groups, optim)
    assert type(optimizer) is torch.optim.AdamW
    assert [g["betas"] for g in optimizer.param_groups] == [(0.8, 0.95)] * 2
    assert [g["weight_decay"] for g in optimizer.param_groups] == [5e-4, 0.0]
    assert [g["lr"] for g in optimizer.param_groups] == [0.01] * 2
    sgd = build_optimizer(groups, OPTIM)
    assert type(sgd) is torch.optim.SGD
    assert [(g["momentum"], g["weight_decay"]) for g in sgd.param_groups] == [
        (0.9, 5e-4),
        (0.9, 0.0),
    ]


def test_scheduler_steps_per_optimizer_step():
    params = [torch.nn.Parameter(torch.zeros(2))]
    optimizer = build_optimizer([{"params": params, "weight_decay": 0.0}], OPTIM)
    config = build_scheduler(optimizer, total_steps=40, max_epochs=4, optim=OPTIM)
    assert config["interval"] == "step"
    lrs = []
    for _ in range(40):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        config["scheduler"].step()
    assert lrs[9] == pytest.approx(0.1)  # end of the one-epoch warm-up
    assert lrs[-1] < 0.01 and not math.isnan(lrs[-1])


def test_adaface_trains_both_stages_and_checkpoints_keep_its_norm_statistics(tmp_path, monkeypatch):
    from facecluster.config import ConfigError
    from facecluster.models.components import AdaFace

    # each sub-net's head starts from stage 1's statistics (it started from AdaFace's
    # own, a std of 100, where a margin barely moves: a review)
    started = []
    warm_start = SubnetSystem.warm_start

    def spy(model, backbone, init, head_state=None):
        warm_start(model, backbone, init, head_state)
        started.append([(h.batch_mean.clone(), h.batch_std.clone()) for h in model.heads.values()])

    monkeypatch.setattr(SubnetSystem, "warm_start", spy)
    overrides = ["head.name=adaface", "head.h=0.5", "logger=none"]
    result = train(load_config(SMOKE, smoke_overrides(tmp_path, *overrides)))
    heads = [result.backbone.head, *result.subnets.heads.values()]
    for head in heads:  # each head's running statistics moved from their start (20, 100)
        assert isinstance(head, AdaFace) and head.h == 0.5
        assert head.batch_mean != 20.0 and head.batch_std != 100.0
        assert torch.isfinite(head.batch_mean) and torch.isfinite(head.batch_std)
    saved = torch.load(
        tmp_path / "run" / "stage1" / "checkpoints" / "last.ckpt", weights_only=False
    )["state_dict"]
    assert torch.equal(saved["head.batch_mean"], result.backbone.head.batch_mean)
    (heads,) = started
    assert len(heads) == 3 and saved["head.batch_std"] != 100.0
    for mean, std in heads:
        assert torch.equal(mean, saved["head.batch_mean"]) and torch.equal(
            std, saved["head.batch_std"]
        )
    # AdaFace's own keys with another head: said, not ignored; its margin's bound
    for given in ("0.5", "0.333"):  # set, even to the authors' value: said, not ignored
        with pytest.raises(ConfigError, match=rf"head.h={given}: AdaFace's, but head.name='arc"):
            load_config(SMOKE, [f"head.h={given}"])
    with pytest.raises(ConfigError, match=r"head.m must be in \[0, 1\), got 1"):
        load_config(SMOKE, ["head.name=adaface", "head.m=1"])
    with pytest.raises(ConfigError, match=r"head.t_alpha must be in \(0, 1\], got 0"):
        load_config(SMOKE, ["head.name=adaface", "head.t_alpha=0"])


def test_a_margin_head_of_ones_own_trains_both_stages_and_its_export_needs_no_import(
    tmp_path, monkeypatch
):
    # head.name listed the built-in heads: a head of one's own could not be named (a
    # review). The module is docs/CONFIG.md's, as written there.
    import re
    import sys

    from facecluster import cli
    from facecluster.config import ConfigError
    from facecluster.models.components import HEADS, MarginHead, register_head

    page = (ROOT / "docs" / "CONFIG.md").read_text()
    (snippet,) = re.findall(r"```python\n(# myheads\.py.*?)```", page, re.S)
    code = tmp_path / "code"
    code.mkdir()
    (code / "myheads.py").write_text(snippet)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after
    run = tmp_path / "run"
    try:
        # not imported: refused at the start, before the run folder, naming imports
        with pytest.raises(ConfigError, match=r"head.name='combined': unknown head .*imports"):
            train(load_config(SMOKE, smoke_overrides(tmp_path, "head.name=combined")))
        assert not run.exists()
        mine = ["imports=[myheads]", "head.name=combined", "logger=none"]
        # its own bounds, and the arguments its class takes, before any work
        with pytest.raises(ConfigError, match=r"head.m=2.0: combined margin m must be in"):
            train(load_config(SMOKE, smoke_overrides(tmp_path, *mine, "head.m=2")))
        unknown = r"with head.kwargs.q=1: .*unexpected keyword argument 'q'"
        given = ("head.kwargs.q=1", "head.kwargs.c=null")  # null: the default, not named
        with pytest.raises(ConfigError, match=unknown):
            train(load_config(SMOKE, smoke_overrides(tmp_path, *mine, *given)))
        assert not run.exists()
        # what facecluster gives a head comes from one place, at load
        with pytest.raises(ConfigError, match=r"head.kwargs.m: set head.m, not head.kwargs"):
            load_config(SMOKE, smoke_overrides(tmp_path, *mine, "head.kwargs.m=0.1"))
        # the page's command: its further argument c from head.kwargs
        mine.append("head.kwargs.c=0.25")
        result = train(load_config(SMOKE, smoke_overrides(tmp_path, *mine)))
        combined = HEADS["combined"]
        heads = [result.backbone.head, *result.subnets.heads.values()]
        assert len(heads) == 4 and all(type(h) is combined and h.m == 0.3 for h in heads)
        assert all(h.c == 0.25 for h in heads)
        assert result.results is not None  # both stages trained, the test split evaluated
        # its margin is the one the module gives: cos(theta + m) - c
        cos = torch.tensor([[0.9], [0.1]], dtype=torch.float64)
        expected = torch.cos(torch.acos(cos) + 0.3) - 0.25
        assert torch.allclose(heads[0]._margin(cos, torch.ones_like(cos)), expected)
        # an export is data: its heads are rows, identify needs no --import
        assert cli.export_main([str(run), str(tmp_path / "exp")]) == 0
        del HEADS["combined"]
        sys.modules.pop("myheads")
        sys.path.remove(str(code))
        faces = tmp_path / "faces"
        person = sorted(DEMO.iterdir())[0]
        (faces / person.name).mkdir(parents=True)
        for image in sorted(person.iterdir())[:4]:
            (faces / person.name / image.name).write_bytes(image.read_bytes())
        out = tmp_path / "ids.csv"
        assert cli.main(["identify", str(tmp_path / "exp"), str(faces), "--out", str(out)]) == 0
        assert len(out.read_text().splitlines()) == 5
    finally:
        HEADS.pop("combined", None)
        sys.modules.pop("myheads", None)
    # what register_head refuses, naming the head
    with pytest.raises(TypeError, match=r"head 'x': <class 'int'> is not a subclass of Marg"):
        register_head("x")(int)

    class NoDefault(MarginHead):
        def __init__(self, num_classes, embedding_dim, s, m, sample_rate=1.0):
            super().__init__(num_classes, embedding_dim, s, m, sample_rate)

    with pytest.raises(TypeError, match=r"NoDefault.__init__ needs .* lacks a default for s, a"):
        register_head("x")(NoDefault)
    with pytest.raises(ValueError, match=r"head 'arcface' is already registered"):
        register_head("arcface")(type("Other", (HEADS["cosface"],), {}))
    assert "x" not in HEADS


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_bf16_precisions_train_both_stages_on_cpu(tmp_path, precision):
    # bf16-true: the weights are bf16, so the passes outside the training loop (the
    # class means, stage-1 verification) must hand them bf16 inputs too; they crashed
    # on float32 images after stage 1 had trained
    pairs = tmp_path / "pairs.txt"  # LFW's layout: 10 folds of one same, one different pair
    names = sorted(p.name for p in DEMO.iterdir())
    lines = [f"{names[f]}\t1\t2\n{names[f]}\t3\t{names[f + 1]}\t4\n" for f in range(10)]
    pairs.write_text("10\t1\n" + "".join(lines))
    (tmp_path / "images").symlink_to(DEMO)
    overrides = [f"trainer.precision={precision}", "logger=none", f"data.verification=[{pairs}]"]
    result = train(load_config(SMOKE, smoke_overrides(tmp_path, *overrides)))
    dtype = torch.bfloat16 if precision == "bf16-true" else torch.float32
    for p in result.subnets.parameters():
        assert p.dtype == dtype and torch.isfinite(p).all()
    # the trained models are kept (RunResult), their optimizer state is not: SGD's
    # momentum is as large as the weights (4.2 GB for a 2M-identity head), and stage 2
    # and the evaluation run while train() holds both stages' models
    for model in (result.backbone, result.subnets):
        assert model.trainer.optimizers == [] and model.trainer.lr_scheduler_configs == []
    assert 0.0 <= result.results["subnets_oracle_accuracy"] <= 1.0


@pytest.mark.slow
def test_the_demo_recipe_learns_well_above_chance(tmp_path):
    # configs/default.yaml (IResNet-18, width 16, 64 px) shrunk to 20 identities.
    cfg = load_config(
        ROOT / "configs" / "default.yaml",
        [
            f"output_dir={tmp_path}",
            "run_name=run",
            "logger=none",
            "data.max_classes=20",
            "data.num_workers=0",
            "stage1.max_epochs=4",
            "stage2.max_epochs=2",
            "clustering.num_clusters=2",
        ],
    )
    r = train(cfg).results
    assert r["stage1"]["accuracy"] > 3 * r["stage1"]["chance"]
    assert r["stage1"]["accuracy"] > r["stage1"]["majority"]
    assert all(s["accuracy"] > s["chance"] for s in r["subnets"])


def test_shared_trunks_stay_one_through_moves_and_casts():
    # model.shared_layers: the sub-nets' frozen trunks are one set of tensors; a move or
    # cast gave every module new buffers (BatchNorm statistics stored K times after)
    cfg = load_config(SMOKE, ["model.embedding_dim=16"])
    model = SubnetSystem(
        6, [2, 2, 2], backbone=cfg.model.backbone_args(32),
        head={"name": "arcface", "s": 64.0, "m": 0.5}, optim=OPTIM, shared_layers=1,
    )  # fmt: skip
    for moved in (model, model.double()):
        state = moved.state_dict()
        trunk = [
            n[len("subnets.0.") :]
            for n in state
            if n.startswith(("subnets.0.features.0.", "subnets.0.features.1."))
        ]
        assert any("running_mean" in n for n in trunk)
        for n in trunk:
            assert len({state[f"subnets.{k}.{n}"].data_ptr() for k in range(3)}) == 1, n


def test_a_stage2_checkpoint_with_the_old_centroids_buffer_still_loads():
    # Runs interrupted in stage 2 before the buffers were dropped must still resume.
    model, _ = _subnets()
    old = {"centroids": torch.zeros(3, 16), "class_means": torch.zeros(9, 16)}
    checkpoint = {"state_dict": {**model.state_dict(), **old}}
    fresh, _ = _subnets()
    fresh.on_load_checkpoint(checkpoint)
    fresh.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning loads it
    assert torch.equal(fresh.class_to_cluster, model.class_to_cluster)


def test_building_a_stage_model_keeps_nothing_of_its_caller_alive():
    # Lightning's save_hyperparameters, left to find the constructor's frame itself,
    # kept it (and every caller's frame and locals) in a reference cycle until the next
    # garbage collection: a caller's tensors (class means, embeddings) outlived it
    import weakref

    from facecluster.models.backbone_module import BackboneSystem

    def build(system) -> weakref.ref:
        held = torch.zeros(4)  # a caller's local
        if system is BackboneSystem:
            backbone = {"name": "tiny", "embedding_dim": 8, "image_size": 16}
            BackboneSystem(5, backbone, {"name": "arcface", "s": 16.0, "m": None}, OPTIM)
        else:
            _subnets()
        return weakref.ref(held)

    gc.collect()
    gc.disable()  # what the cyclic collector would free later does not count
    try:
        for system in (BackboneSystem, SubnetSystem):
            assert build(system)() is None, system.__name__
    finally:
        gc.enable()


def test_a_partial_optim_dict_is_refused_before_training_naming_what_it_lacks():
    # from Python, BackboneSystem(optim={"lr": 0.05}) was built, then fit stopped with
    # KeyError: 'name' in configure_optimizers (a review); a system built for inference
    # or a memory measurement needs no optimizer settings, and is still built
    from dataclasses import asdict, fields

    from facecluster.builders import module_args
    from facecluster.config import OptimConfig
    from facecluster.models import BackboneSystem
    from facecluster.models.optim import OPTIM_KEYS, check_optim

    assert set(OPTIM_KEYS) == {f.name for f in fields(OptimConfig)}
    args = module_args(load_config(SMOKE), 1)
    partial = BackboneSystem(4, **{**args, "optim": {"lr": 0.05}})
    with pytest.raises(ValueError, match=r"optim lacks 'name', 'momentum', .*'poly_power': give"):
        partial.configure_optimizers()  # what fit calls first
    subnets = SubnetSystem(4, [2, 2], **{**module_args(load_config(SMOKE), 2), "optim": {}})
    with pytest.raises(ValueError, match=r"optim lacks 'name', 'lr', 'momentum'"):
        subnets.configure_optimizers()
    check_optim(args["optim"])  # the config's section
    check_optim(asdict(OptimConfig(lr=0.05)))  # the way the message gives
