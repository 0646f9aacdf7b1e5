"""Config loading: every shipped YAML validates; mistakes fail early and name the key."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from facecluster.config import ConfigError, load_config, resolve_data_root
from tests.conftest import SMOKE

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").rglob("*.yaml"))
DEFAULT = Path(__file__).resolve().parents[1] / "configs" / "default.yaml"
INSIGHTFACE = DEFAULT.parent / "insightface_r50.yaml"


def test_configs_folder_is_not_empty():
    assert len(CONFIGS) >= 2


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(DEFAULT.parent)))
def test_every_shipped_yaml_loads_and_validates(path):
    # Presets at the top stand alone; method/ and experiment/ files go on top of the demo.
    cfg = load_config(path if path.parent == DEFAULT.parent else [DEFAULT, path])
    assert cfg.clustering.num_clusters >= 1
    root = resolve_data_root(cfg.data.root)
    if path.name == INSIGHTFACE.name:  # the full-size preset: the user's copy of MS1MV3
        assert cfg.data.root.startswith("/data/"), cfg.data.root
        return
    if path.parent.name == "experiment" and not root.is_dir():
        pytest.skip(f"{root}: the shared LFW copy is not beside this checkout")
    assert root.is_dir(), "presets and methods train on the bundled demo set"


def test_insightface_preset_is_arcface_torchs_r50_recipe_and_stands_alone():
    # Loaded alone (no demo below it): the network, head and optimiser of
    # arcface_torch's r50 recipes, 20 epochs in all for every method, on GPUs.
    cfg = load_config(INSIGHTFACE)
    assert (cfg.model.backbone, cfg.model.embedding_dim, cfg.model.kwargs) == ("iresnet50", 512, {})
    assert (cfg.data.image_size, cfg.data.batch_size, cfg.data.unseen_fraction) == (112, 128, 0.0)
    assert (cfg.head.name, cfg.head.s, cfg.head.m) == ("arcface", 64.0, 0.5)
    optim = cfg.stage1.optim
    assert (optim.name, optim.lr, optim.momentum, optim.weight_decay) == ("sgd", 0.1, 0.9, 5e-4)
    assert optim.scheduler == "poly" and optim.warmup_epochs == 0
    assert cfg.stage_epochs(1) + cfg.stage_epochs(2) == 20
    assert load_config(INSIGHTFACE, ["method=single"]).stage_epochs(1) == 20
    assert cfg.trainer["accelerator"] == "gpu" and cfg.trainer["strategy"] == "ddp"


@pytest.mark.parametrize("seed", [-1, 2**32])
def test_a_seed_lightning_cannot_take_is_refused_naming_the_key(seed):
    # Lightning seeds numpy (32-bit): a seed outside it stopped the run at start with
    # numpy's words, not the key's
    with pytest.raises(ConfigError, match=rf"seed must be in \[0, 2\*\*32 - 1\].*got {seed}"):
        load_config(SMOKE, [f"seed={seed}"])
    assert load_config(SMOKE, [f"seed={2**32 - 1}"]).seed == 2**32 - 1


@pytest.mark.parametrize("name", ["..", ".", "", "a/b", "a\\b"])
def test_a_run_name_that_is_not_one_folder_is_refused(name):
    # run_name=.. wrote the run's files into output_dir's parent, among the user's own
    with pytest.raises(ConfigError, match=r"run_name must be one folder's name"):
        load_config(SMOKE, [f"run_name={name}"])


def test_overrides_after_c_are_read_as_before_it(monkeypatch):
    # train.py -c x.yaml key=value: argparse refused the override after -c, valid or not
    from facecluster import cli, pipeline

    seen = []
    monkeypatch.setattr(pipeline, "train", lambda cfg, **kw: seen.append(cfg) or 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli.train_main(["logger=none", "-c", str(SMOKE), "data.batch_size=8", "run_name=x"])
    assert seen[0].data.batch_size == 8 and seen[0].logger == "none" and seen[0].run_name == "x"


def test_overrides_are_typed_and_win_over_the_file():
    cfg = load_config(
        SMOKE,
        [
            "data.image_size=64",
            "clustering.num_clusters=8",
            "trainer.max_epochs=3",
            "stage2.max_epochs=1",
        ],
    )
    assert cfg.data.image_size == 64 and isinstance(cfg.data.image_size, int)
    assert cfg.clustering.num_clusters == 8
    assert cfg.stage_epochs(1) == 3 and cfg.stage_epochs(2) == 1


def test_trainer_max_epochs_that_would_be_ignored_is_refused():
    with pytest.raises(
        ConfigError, match=r"trainer.max_epochs=3 would be ignored.*stage1.max_epochs=12"
    ):
        load_config(DEFAULT, ["trainer.max_epochs=3"])
    cfg = load_config(
        DEFAULT, ["trainer.max_epochs=3", "stage1.max_epochs=null", "stage2.max_epochs=null"]
    )
    assert cfg.stage_epochs(1) == cfg.stage_epochs(2) == 3


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("data.imgae_size=64", ["data.imgae_size", "data.image_size"]),
        ("clustering.num_cluster=4", ["clustering.num_cluster", "clustering.num_clusters"]),
        ("trainer.max_epoch=3", ["trainer.max_epoch", "trainer.max_epochs"]),
        ("data.image_size=big", ["data.image_size"]),
        ("trainer.callbacks=1", ["trainer.callbacks"]),
    ],
)
def test_a_mistake_names_the_key_and_the_closest_valid_one(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(overrides=[override])
    for text in expected:
        assert text in str(err.value)


def test_misspelled_key_in_a_yaml_file_names_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  backbon: tiny\n")
    with pytest.raises(
        ConfigError, match=r"bad.yaml: unknown config key 'model.backbon'.*model.backbone"
    ):
        load_config(bad)
    # a list at the top crashed in OmegaConf's merge with a TypeError
    bad.write_text("- stage1.max_epochs: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: a config file holds `key: value` lines"):
        load_config(bad)


def test_contradictions_are_listed_together():
    with pytest.raises(ConfigError) as err:
        load_config(
            overrides=[
                "logger=tensorboard",
                "head.name=sphereface",
                "data.val_fraction=0.6",
                "data.test_fraction=0.5",
                "data.max_classes=2",
                "clustering.num_clusters=4",
                "head.sample_rate=0",
                "stage2.epoch_size=smallest",
            ]
        )
    message = str(err.value)
    for text in (
        "logger='tensorboard'",
        "head.name='sphereface'",
        "data.val_fraction + data.test_fraction",
        "data.max_classes=2 is smaller than clustering.num_clusters=4",
        "head.sample_rate must be in (0, 1], got 0",
        "stage2.epoch_size='smallest' is not one of largest, mean",
    ):
        assert text in message
    with pytest.raises(ConfigError) as err:
        load_config(
            overrides=[
                "method=random",
                "clustering.features=head",
                "data.decode=gpu",
                "clustering.overlap=0.1",
            ]
        )
    message = str(err.value)
    assert "method=random partitions at random: clustering.features=head" in message
    assert "method=random partitions at random: clustering.overlap=0.1" in message
    with pytest.raises(ConfigError, match=r"clustering.overlap must be in \[0, 1\], got 2"):
        load_config(overrides=["clustering.overlap=2"])
    with pytest.raises(ConfigError, match=r"stage2.negatives must be in \[0, 10\], got -1"):
        load_config(overrides=["stage2.negatives=-1"])
    assert "data.decode='gpu' is not one of cpu, device" in message


def test_string_keys_take_the_text_as_written():
    # YAML typing turned run_name=1e3 into "1000.0" and cut resume paths at " #"
    cfg = load_config(SMOKE, ["run_name=1e3", "output_dir=runs #2", "data.root=0x10"])
    assert (cfg.run_name, cfg.output_dir, cfg.data.root) == ("1e3", "runs #2", "0x10")
    cfg = load_config(SMOKE, ["run_name=a", "run_name=null", "stage=1"])
    assert cfg.run_name is None and cfg.stage == "1"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("stage2.optim.momentum=1.5", "stage2.optim.momentum must be in [0, 1), got 1.5"),
        ("stage1.optim.weight_decay=-1", "stage1.optim.weight_decay must be >= 0, got -1"),
        ("stage2.optim.betas=[2,-1]", "stage2.optim.betas must be two values in [0, 1)"),
        ("stage1.optim.poly_power=-3", "stage1.optim.poly_power must be > 0, got -3"),
        ("data.val_fraction=0", "data.val_fraction=0 leaves route.decision=moe no validation"),
        # NaN passed "lr <= 0": stage 1 trained, then stage 2 diverged at its first step
        ("stage2.optim.lr=nan", "stage2.optim.lr must be a finite number, got nan"),
        ("stage1.optim.poly_power=.inf", "stage1.optim.poly_power must be a finite number"),
        ("head.s=nan", "head.s must be a finite number, got nan"),
        ("stage1.optim.warmup_epochs=nan", "stage1.optim.warmup_epochs must be a finite"),
    ],
)
def test_values_refused_only_later_or_never_are_refused_at_load(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("epochs", ["0", "-5", "abc", "2.5"])
def test_trainer_max_epochs_must_be_a_positive_whole_number(epochs):
    nulled = ["stage1.max_epochs=null", "stage2.max_epochs=null"]
    with pytest.raises(ConfigError, match="trainer.max_epochs must be a whole number > 0"):
        load_config(DEFAULT, [f"trainer.max_epochs={epochs}", *nulled])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=3"], "command line, data=3: wrong type: Merge error: int is not a subclass"),
        (["run_name=x", "route=flat"], "command line, route=flat: wrong type"),
        (["stage1.optim.betas=[0.9]"], "command line, stage1.optim.betas=[0.9]: wrong type"),
        (["run_name=${oops}"], "Interpolation key 'oops' not found (in 'run_name')"),
    ],
)
def test_an_error_without_a_key_names_the_override(overrides, expected):
    # they said "wrong type for 'None'", or ended in a traceback (the interpolation)
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert expected in str(err.value)


def test_bad_override_syntax_is_rejected():
    with pytest.raises(ConfigError, match="key=value"):
        load_config(overrides=["data.root"])
    # a value YAML cannot parse (an unclosed bracket, a shell-split flow mapping) is
    # named with its override, not a parser traceback
    for bad in ("data.verification=[a.bin", "slurm.additional={constraint:"):
        with pytest.raises(ConfigError, match=rf"command line, {re.escape(bad)}: the value is not"):
            load_config(SMOKE, [bad])


def test_relative_data_root_falls_back_to_the_project(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    root = resolve_data_root("datasets/lfw-demo/images")
    assert root.is_absolute() and root.is_dir()


def _documented_train_commands() -> list[list[str]]:
    """The ``train.py`` lines of the README's and docs' bash blocks and of
    ``train.py --help``, as argument lists (continuation lines joined, comments cut)."""
    import re
    import shlex

    from facecluster.cli import TRAIN_HELP

    root = DEFAULT.parents[1]
    pages = [root / "README.md", *sorted((root / "docs").glob("*.md"))]
    blocks = [b for p in pages for b in re.findall(r"```bash\n(.*?)```", p.read_text(), re.S)]
    lines = []
    for text in (*blocks, TRAIN_HELP):
        for line in text.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if "train.py" in words:
                lines.append(words[words.index("train.py") + 1 :])
    return lines


def test_documented_train_commands_make_valid_configs():
    # Each example loads as train.py loads it (the -c files on the schema, else the
    # demo), so a documented command is never refused at start. Data sets that are
    # not here (/data/...) are replaced by the bundled demo set; resume= lines are
    # tested on real runs elsewhere.
    commands = _documented_train_commands()
    assert len(commands) >= 20, commands
    demo = str(DEFAULT.parents[1] / "datasets" / "lfw-demo" / "images")
    shared = DEFAULT.parents[2] / "shared"
    absent = []  # commands that read ../shared where no shared copy is beside the checkout
    for args in commands:
        if any(a.startswith("resume=") for a in args):
            continue
        if not shared.is_dir() and any("../shared/" in a or "lfw423" in a for a in args):
            absent.append(" ".join(args))
            continue
        files = [args[i + 1] for i, a in enumerate(args) if a == "-c"]
        overrides = [f"data.root={demo}" if a.startswith("data.root=/data/") else a for a in args]
        overrides = [a for a in overrides if "=" in a]
        root = DEFAULT.parents[1]
        cfg = load_config([root / f for f in files] or [DEFAULT], overrides)
        assert cfg.stage_epochs(1) >= 1 and cfg.stage_epochs(2) >= 1, args
    if absent:
        pytest.skip(f"{shared} is not beside this checkout; not checked: {absent}")


def test_config_page_documents_every_key():
    # docs/CONFIG.md is the reference: every key of the schema has a row (stage1 and
    # stage2's optimiser keys share `stageN.optim.*` rows; dict-valued keys are one row)
    import re

    page = (DEFAULT.parents[1] / "docs" / "CONFIG.md").read_text()
    first_cells = re.findall(r"^\| (.*?) \|", page.replace("stageN.", "stage1."), re.M)
    documented = {k for cell in first_cells for k in re.findall(r"`([a-z_][a-zA-Z0-9_.*]*)`", cell)}
    documented |= {k.replace("stage1.", "stage2.") for k in documented}

    def leaves(tree: dict, prefix: str = ""):
        for key, value in tree.items():
            path = f"{prefix}{key}"
            if (
                isinstance(value, dict)
                and value
                and path not in ("trainer", "slurm.additional", "model.kwargs")
            ):
                yield from leaves(value, path + ".")
            else:
                yield path

    keys = list(leaves(load_config(DEFAULT).to_dict()))
    assert "route.hnsw_m" in keys and "stage2.optim.lr" in keys
    missing = [
        k for k in keys
        if k not in documented and f"{k.split('.')[0]}.*" not in documented
    ]  # fmt: skip
    assert not missing, f"docs/CONFIG.md has no row for {missing}"


def test_strategies_that_cannot_shard_the_heads_are_refused():
    for strategy in ("ddp_spawn", "ddp_fork", "fsdp", "deepspeed_stage_2"):
        with pytest.raises(ConfigError, match=rf"trainer.strategy='{strategy}'.* only ddp"):
            load_config(SMOKE, [f"trainer.strategy={strategy}"])
    assert load_config(SMOKE, ["trainer.strategy=ddp"]).trainer["strategy"] == "ddp"
