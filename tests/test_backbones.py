"""Tests for facecluster.models.components.backbones and iresnet (CPU, no downloads)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

from facecluster.models.components import (
    BACKBONES,
    IResNet,
    MobileFaceNet,
    available_backbones,
    create_backbone,
    load_backbone,
    register_backbone,
    shareable_stages,
)


def _num_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registry_names() -> None:
    assert available_backbones() == sorted(
        ["iresnet18", "iresnet34", "iresnet50", "iresnet100", "iresnet200", "mbf", "mbf_large"]
        + ["tiny"]
    )
    assert available_backbones() == sorted(BACKBONES)


@pytest.mark.parametrize(
    "name", ["tiny", "iresnet18", "iresnet34", "resnet18", "mobilenetv3_small_100"]
)
def test_output_shape_112(name: str) -> None:
    torch.manual_seed(0)
    model = create_backbone(name, embedding_dim=128)
    assert model.embedding_dim == 128
    model.train()  # Training-mode BN needs B > 1 and exercises the real training path.
    out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 128)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # Raw embeddings: the backbone must not L2-normalise (the head does).
    assert not torch.allclose(out.norm(dim=1), torch.ones(2))


# Parameter counts of arcface_torch's r18/r34/r50/r100 at 112x112 with 512-d output.
@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("iresnet18", 24_025_600),
        ("iresnet34", 34_139_328),
        ("iresnet50", 43_590_848),
        ("iresnet100", 65_156_160),
    ],
)
def test_iresnet_param_counts_match_arcface_torch(name: str, expected: int) -> None:
    # The meta device builds the full-width model without allocating or initialising
    # tens of millions of weights.
    with torch.device("meta"):
        model = create_backbone(name)
    assert isinstance(model, IResNet)
    assert _num_params(model) == pytest.approx(expected, rel=0.01)


@pytest.mark.parametrize("name", ["iresnet50", "iresnet100", "iresnet200"])
def test_deep_iresnets_run_at_112(name: str) -> None:
    # Full depth at a narrow width: the whole architecture runs at 112x112, cheaply.
    torch.manual_seed(0)
    model = create_backbone(name, width=8).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 112, 112))
    assert out.shape == (2, 512)
    assert torch.isfinite(out).all()


# arcface_torch's MobileFaceNets at 512-d (backbones/mobilefacenet.py: get_mbf and
# get_mbf_large): their state dicts' entries, parameters, and the SHA-256 of the lines
# "<key> <shape>" in state-dict order, computed from arcface_torch's own module on
# 2026-12-07. The same keys and shapes in the same order: its released backbone.pth loads
# (model.weights), and its weights gave the same embeddings, to the last bit, when loaded.
_ARCFACE_TORCH_MBF = {
    "mbf": (333, 2_059_520, "9559fd021a31b1bc4f8906903cc7f219fb894ab5a6514ac22597689891dd31ab"),
    "mbf_large": (
        606,
        6_314_880,
        "c5baa81a0265edd39676fe3c2b0716778b10ee01b7694c8141f7f2eb042834fd",
    ),
}


@pytest.mark.parametrize("name", sorted(_ARCFACE_TORCH_MBF))
def test_mobilefacenets_have_arcface_torchs_layout(name: str) -> None:
    import hashlib

    with torch.device("meta"):
        model = create_backbone(name)
    assert isinstance(model, MobileFaceNet)
    state = model.state_dict()
    lines = "\n".join(f"{key} {tuple(value.shape)}" for key, value in state.items())
    digest = hashlib.sha256(lines.encode()).hexdigest()
    assert (len(state), _num_params(model), digest) == _ARCFACE_TORCH_MBF[name]


def test_a_mobilefacenet_splits_into_trunk_and_tail_at_any_multiple_of_16() -> None:
    torch.manual_seed(0)
    model = create_backbone("mbf", embedding_dim=64, image_size=32).eval()
    assert model.features.layers[0].layers[0].kernel_size == (2, 2)  # 32 // 16
    assert shareable_stages(model) == 3
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        whole = model(images)
        assert whole.shape == (2, 64) and torch.isfinite(whole).all()
        for stages in range(4):
            trunk = model.trunk(images, stages)
            torch.testing.assert_close(model.tail(trunk, stages), whole, rtol=0, atol=0)
            x = images
            for module in model.trunk_modules(stages):
                x = module(x)
            assert torch.equal(x, trunk)
    model.train()
    model(images).sum().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert create_backbone("mbf_large", image_size=16, dropout=0.25).dropout.p == 0.25


@pytest.mark.parametrize("image_size", [100, 8])
def test_a_mobilefacenet_refuses_a_size_its_gdc_cannot_cover(image_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        create_backbone("mbf", image_size=image_size)


def test_a_mobilefacenet_exports_to_onnx_with_the_same_embeddings(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from facecluster.inference.onnx import OnnxBackbone, export_network

    torch.manual_seed(0)
    model = create_backbone("mbf", embedding_dim=32, image_size=32).eval()
    path = export_network(model, 32, tmp_path / "mbf.onnx")
    images = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(OnnxBackbone(path)(images), model(images), rtol=1e-4, atol=1e-4)


def test_iresnet_layout() -> None:
    model = create_backbone("iresnet34", width=8)
    assert [len(stage) for stage in (model.layer1, model.layer2, model.layer3, model.layer4)] == [
        3,
        4,
        6,
        3,
    ]
    assert model.conv1.stride == (1, 1)  # Face stem keeps full resolution.
    assert model.layer4[0].conv2.out_channels == 64  # 8 * width.
    assert model.fc.in_features == 64 * 7 * 7  # 112 // 16 = 7.


def test_iresnet_small_image_and_width() -> None:
    torch.manual_seed(0)
    model = create_backbone("iresnet18", embedding_dim=64, image_size=64, width=16)
    assert model.fc.in_features == 8 * 16 * 4 * 4  # 64 // 16 = 4.
    out = model(torch.randn(3, 3, 64, 64))
    assert out.shape == (3, 64)


@pytest.mark.parametrize("image_size", [100, 8, 0])
def test_iresnet_rejects_bad_image_size(image_size: int) -> None:
    with pytest.raises(ValueError, match="multiple of 16"):
        create_backbone("iresnet18", image_size=image_size, width=8)


def test_tiny_is_small_cheap_and_size_agnostic() -> None:
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model = create_backbone("tiny")
    assert _num_params(model) < 100_000
    model.eval()
    x = torch.randn(32, 3, 112, 112)
    # A FLOP bound, not a wall-clock one: speed is shown by benchmarks, not tests.
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model(x)
    assert out.shape == (32, 512)
    assert counter.get_total_flops() < 1e9
    with torch.no_grad():
        assert model(torch.randn(2, 3, 50, 70)).shape == (2, 512)
    assert create_backbone("tiny", image_size=37).embedding_dim == 512


def test_tiny_backward_reaches_every_parameter() -> None:
    torch.manual_seed(0)
    model = create_backbone("tiny", embedding_dim=32)
    out = model(torch.randn(4, 3, 112, 112))
    # BN1d zero-centres each dimension over the batch, so a plain sum would have zero
    # gradient; a nonlinear loss reaches every parameter.
    (out**2).sum().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_unknown_name_suggests_close_names() -> None:
    with pytest.raises(ValueError, match="iresnet19") as info:
        create_backbone("iresnet19")
    assert "iresnet18" in str(info.value)
    with pytest.raises(ValueError, match="resnet181") as info:
        create_backbone("resnet181")
    suggestions = str(info.value).split("did you mean:")[1].split("(")[0]
    assert "resnet18" in [s.strip() for s in suggestions.split(",")]
    assert len(suggestions.split(",")) <= 5


def test_pretrained_on_own_backbone_errors() -> None:
    with pytest.raises(ValueError, match="pretrained"):
        create_backbone("iresnet18", pretrained=True)


def test_none_kwargs_are_dropped() -> None:
    with torch.device("meta"):  # Full width: no need to allocate the weights.
        model = create_backbone("iresnet18", width=None, dropout=None, embedding_dim=None)
    assert model.width == 64
    assert model.embedding_dim == 512
    tiny = create_backbone("tiny", width=None, image_size=None)
    assert tiny.embedding_dim == 512


def test_unknown_kwarg_is_not_silently_ignored() -> None:
    with pytest.raises(TypeError):
        create_backbone("iresnet18", widht=8)


def test_dropout_is_applied() -> None:
    model = create_backbone("iresnet18", width=8, dropout=0.3)
    assert model.dropout.p == 0.3
    neck = create_backbone("resnet18", dropout=0.2, embedding_dim=16).neck
    assert neck.dropout.p == 0.2 and neck.fc.out_features == 16


def test_register_backbone_rejects_duplicates() -> None:
    with pytest.raises(ValueError, match="already registered"):
        register_backbone("tiny")(lambda **kwargs: nn.Identity())


def test_register_and_create_custom_backbone() -> None:
    name = "_test_custom_backbone"

    class Custom(nn.Module):
        def __init__(self, embedding_dim: int) -> None:
            super().__init__()
            self.embedding_dim = embedding_dim
            self.fc = nn.Linear(3, embedding_dim)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(x.mean(dim=(2, 3)))

    @register_backbone(name)
    def build(embedding_dim: int = 512, image_size: int = 112, dropout: float = 0.0) -> Custom:
        return Custom(embedding_dim)

    try:
        assert name in available_backbones()
        assert create_backbone(name, embedding_dim=7)(torch.randn(2, 3, 9, 9)).shape == (2, 7)
    finally:
        del BACKBONES[name]


def test_components_import_only_torch_and_timm() -> None:
    # Static check: facecluster.models.__init__ (others' code) may import lightning, but
    # components/ itself must stay plain torch + timm with only relative imports.
    import ast
    from pathlib import Path

    import facecluster.models.components as components

    allowed = {"__future__", "collections", "difflib", "inspect", "math", "typing", "timm", "torch"}
    for path in Path(components.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                roots = [alias.name.split(".")[0] for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                roots = [(node.module or "").split(".")[0]]
            else:
                continue
            assert set(roots) <= allowed, f"{path.name} imports {roots}"


def test_a_timm_vits_position_embedding_and_class_token_are_not_decayed() -> None:
    # timm lists them in no_weight_decay(); its own optimizer factory exempts them
    from facecluster.models.optim import param_groups

    vit = create_backbone(
        "vit_tiny_patch16_224", embedding_dim=8, img_size=32, patch_size=16, depth=1
    )
    decay, no_decay = param_groups([vit], 5e-4)
    exempt = {id(p) for p in no_decay["params"]}
    named = dict(vit.named_parameters())
    listed = [n for n in named if n.endswith(("pos_embed", "cls_token"))]
    assert len(listed) == 2 and all(id(named[n]) in exempt for n in listed)
    assert decay["weight_decay"] == 5e-4 and no_decay["weight_decay"] == 0.0
    assert any(p.ndim > 1 for p in decay["params"])

    class Wildcard(nn.Module):  # XCiT's form: "pos_embed.*", matched as timm does
        def __init__(self) -> None:
            super().__init__()
            self.pos_embed = nn.Linear(4, 4)
            self.proj = nn.Linear(4, 4)

        def no_weight_decay(self) -> set[str]:
            return {"pos_embed.*"}

    net = Wildcard()
    decay, no_decay = param_groups([net], 5e-4)
    assert any(p is net.pos_embed.weight for p in no_decay["params"])
    assert any(p is net.proj.weight for p in decay["params"])


def test_weights_that_do_not_fit_the_settings_are_named_in_one_line() -> None:
    # a run's model settings or an export's backbone edited since training gave torch's
    # size-mismatch RuntimeError or a TypeError, as a traceback from evaluate or identify
    from facecluster.models.components import load_backbone

    args = {"name": "iresnet18", "embedding_dim": 16, "image_size": 64, "width": 4}
    weights = create_backbone(**args).state_dict()
    assert not load_backbone(args, weights).training
    for change, named in (
        ({"image_size": 32}, r"do not fit the backbone .*'image_size': 32.*: size mismatch for fc"),
        ({"embedding_dim": 8}, r"do not fit the backbone .*: size mismatch for fc.weight"),
        ({"widht": 4}, r"build no backbone: .*unexpected keyword argument 'widht'"),
    ):
        with pytest.raises(ValueError, match=named):
            load_backbone({**args, **change}, weights)
    # weights without BatchNorm's step counts (converted ones) load, as torch loads them
    counted = [k for k in weights if k.endswith("num_batches_tracked")]
    assert counted and load_backbone(args, {k: v for k, v in weights.items() if k not in counted})
    # another architecture's weights: how many are missing and which the file holds
    # (torch's message, cut to its first line, named one missing key: an mbf review);
    # arcface_torch's mbf weights (112 x 112) in a 64 x 64 one: its GDC kernel
    mbf = {"name": "mbf", "embedding_dim": 16, "image_size": 64}
    with pytest.raises(ValueError) as err:
        load_backbone(mbf, weights)
    assert str(err.value).endswith(
        "283 of its 283 weights missing (layers.0.layers.0.weight, layers.0.layers.1.weight, "
        "layers.0.layers.1.bias, ...); 187 weights that are not its (conv1.weight, "
        "bn1.weight, bn1.bias, ...)"
    )
    with pytest.raises(ValueError) as err:
        load_backbone(mbf, create_backbone(**{**mbf, "image_size": 112}).state_dict())
    assert str(err.value).endswith(
        "size mismatch for features.layers.0.layers.0.weight: [512, 1, 7, 7] in the weights, "
        "[512, 1, 4, 4] in the backbone (a kernel over the whole feature map: weights of "
        "another image size)"
    )


def test_timm_pretrained_weights_see_the_normalisation_they_were_trained_on(monkeypatch) -> None:
    # every image reaches a backbone scaled to [-1, 1]; timm's pretrained CNNs were
    # trained on ImageNet's mean and std, and were fed [-1, 1] unconverted
    import timm

    create = timm.create_model  # no download here: the architecture, its pretrained_cfg
    monkeypatch.setattr(timm, "create_model", lambda *a, pretrained, **k: create(*a, **k))
    seen = []
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    for pretrained in (True, False):
        model = create_backbone("resnet18", embedding_dim=8, pretrained=pretrained).eval()
        model.body.register_forward_pre_hook(lambda _, args: seen.append(args[0]))
        model(x)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    assert torch.allclose(seen[0], ((x + 1) / 2 - mean) / std, atol=1e-6)
    assert torch.equal(seen[1], x)  # trained from scratch: on [-1, 1] as it is

    # the weights carry it: evaluation and the sub-nets rebuild without pretrained
    # weights; weights saved before the conversion load with none
    trained = create_backbone("resnet18", embedding_dim=8, pretrained=True).state_dict()
    rebuilt = load_backbone({"name": "resnet18", "embedding_dim": 8}, trained)
    assert torch.equal(rebuilt.input_scale, trained["input_scale"])
    assert not torch.equal(rebuilt.input_scale, torch.ones(1, 3, 1, 1))
    older = {k: v for k, v in trained.items() if not k.startswith("input_")}
    rebuilt = load_backbone({"name": "resnet18", "embedding_dim": 8}, older)
    assert torch.equal(rebuilt.input_scale, torch.ones(1, 3, 1, 1))
    assert torch.equal(rebuilt.input_shift, torch.zeros(1, 3, 1, 1))


def test_a_backbone_of_ones_own_trains_in_jobs_evaluates_and_identifies(
    tmp_path, monkeypatch, capsys
):
    # register_backbone worked only in the process that imported the user's module: the
    # stage-2 jobs (python -m facecluster.cli), evaluate.py, export and identify said
    # "unknown backbone". `imports` names it in the config; the run keeps it. The
    # module is docs/CONFIG.md's, as written there.
    import re
    import sys

    from facecluster import cli
    from facecluster.builders import backbone_parameters
    from facecluster.config import ConfigError, load_config

    root = Path(__file__).resolve().parents[1]
    page = (root / "docs" / "CONFIG.md").read_text()
    (snippet,) = re.findall(r"```python\n(# mynets\.py.*?)```", page, re.S)
    code = tmp_path / "code"  # found by this process only, as a script's own folder is
    code.mkdir()
    (code / "mynets.py").write_text(snippet)
    monkeypatch.syspath_prepend(str(code))
    monkeypatch.setenv("PYTHONPATH", os.environ.get("PYTHONPATH", ""))  # restored after
    monkeypatch.chdir(tmp_path)
    smoke = str(root / "configs" / "smoke.yaml")
    try:
        common = ["-c", smoke, "imports=[mynets]", "model.backbone=mynet", "logger=none"]
        assert cli.train_main([*common, "run_name=r", "stage=1"]) == 0
        # the jobs are processes of their own: they import the module from the run's
        # config.yaml, found through the PYTHONPATH the import gave them; a resume that
        # names no imports keeps the run's (it wrote them out, and the jobs failed)
        assert str(code) in os.environ["PYTHONPATH"].split(os.pathsep)
        run = tmp_path / "runs" / "r"
        resume = [f"resume={run}", "imports=[]", "launcher=local", "stage2.jobs=2"]
        assert cli.train_main(resume) == 0
        assert load_config(run / "config.yaml").imports == ["mynets"]
        jobs = sorted((run / "stage2" / "jobs").iterdir())
        assert len(jobs) == 2  # each job a process of its own, which imported the module
        assert (run / "results.json").is_file()  # its test split evaluated, the run over
        assert cli.export_main([str(run), "exp"]) == 0
        faces = tmp_path / "faces"  # a few of the demo's people: identify is not timed here
        for person in sorted((root / "datasets" / "lfw-demo" / "images").iterdir())[:3]:
            shutil.copytree(person, faces / person.name)
        images = sum(1 for f in faces.rglob("*") if f.is_file())
        faces = str(faces)
        del BACKBONES["mynet"]  # another process: the export alone does not import code
        sys.modules.pop("mynets")
        capsys.readouterr()
        assert cli.main(["identify", "exp", faces, "--out", "ids.csv"]) == 2
        assert "unknown backbone 'mynet'" in (err := capsys.readouterr().err)
        assert "importing mynets: pass --import mynets to facecluster identify" in err
        assert cli.main(["identify", "exp", faces, "--out", "ids.csv", "--import", "mynets"]) == 0
        assert len((tmp_path / "ids.csv").read_text().splitlines()) == 1 + images > 20
        # a builder whose output is not one embedding per image: refused before any work
        # (it failed in the first training step, after the run folder was made)
        register_backbone("facecluster_test_4d")(
            lambda embedding_dim, image_size, dropout: nn.Conv2d(3, embedding_dim, 1)
        )
        with pytest.raises(ConfigError, match=r"4d' gives \(2, 64, 112, 112\) .*\(2, 64\)"):
            backbone_parameters(load_config(smoke, ["model.backbone=facecluster_test_4d"]))
    finally:
        for name in ("mynet", "facecluster_test_4d"):
            BACKBONES.pop(name, None)
        sys.modules.pop("mynets", None)


def test_imports_that_cannot_be_imported_are_named(tmp_path, monkeypatch):
    from facecluster.config import ConfigError, load_config

    (tmp_path / "facecluster_test_broken.py").write_text("x = 1\nraise RuntimeError('oops')\n")
    # a name taken by another builder: the user's line, not facecluster's that raised
    clash = "from facecluster.models.components import register_backbone\n\n\n"
    clash += "register_backbone('tiny')(lambda **kw: None)\n"
    (tmp_path / "facecluster_test_clash.py").write_text(clash)
    monkeypatch.syspath_prepend(str(tmp_path))
    for given, said in (
        ("facecluster_test_missing", r"imports\[0\]='facecluster_test_missing' cannot be "
         r"imported \(No module named .*PYTHONPATH"),
        ("a-b", r"imports\[0\]='a-b' is not a module name"),
        ("facecluster_test_broken", r"importing it failed at .*facecluster_test_broken.py:2: "
         r"RuntimeError: oops"),
        ("facecluster_test_clash", r"failed at .*facecluster_test_clash.py:4: ValueError: "
         r"backbone 'tiny' is already registered"),
    ):  # fmt: skip
        with pytest.raises(ConfigError, match=said):
            load_config(None, [f"imports=[{given}]"])
    # a script run as __main__ that imports names too: its definitions run twice, the
    # same builder registered again (it was "already registered")
    import importlib.util
    import sys

    same = tmp_path / "facecluster_test_twice.py"
    same.write_text(
        "from torch import nn\nfrom facecluster.models.components import register_backbone\n\n\n"
        "@register_backbone('facecluster_test_twice')\nclass Net(nn.Linear):\n    pass\n"
    )
    try:
        for module in ("facecluster_test_main", "facecluster_test_twice"):  # as __main__
            spec = importlib.util.spec_from_file_location(module, same)
            sys.modules[module] = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(sys.modules[module])
        assert BACKBONES["facecluster_test_twice"].__module__ == "facecluster_test_twice"
    finally:
        BACKBONES.pop("facecluster_test_twice", None)
        for module in ("facecluster_test_main", "facecluster_test_twice"):
            sys.modules.pop(module, None)
