"""Config loading: every shipped YAML validates; mistakes fail early and name the key."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import yaml

from facecluster.config import ConfigError, load_config, resolve_data_root, text_override
from tests.conftest import DEMO, ROOT, SMOKE, run_documented, smoke_overrides

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
    assert (cfg.head.name, cfg.head.s, cfg.head.m) == ("arcface", 64.0, None)
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


@pytest.mark.parametrize("name", [" ", "a\nb", "a\tb", "a\u2028b", "\u200b"])
def test_a_run_name_that_a_listing_cannot_show_is_refused(name, tmp_path):
    # a blank folder name, or one a line break showed as two names in `ls runs`
    with pytest.raises(ConfigError, match=r"run_name=.*: it needs a visible character and no"):
        load_config(SMOKE, [f"run_name={name}"])
    for fine in (
        "José Müller 2",
        "k20\xa0copy",
        "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",
    ):
        assert load_config(SMOKE, [f"run_name={fine}"]).run_name == fine
    # a resume's run_name is its folder's, whatever it is (a copy named so resumed)
    resumed = load_config(SMOKE, [f"run_name={name}", f"resume={tmp_path}"])
    assert resumed.run_name == name


def test_the_cache_folders_name_is_refused_as_a_run_name():
    # output_dir/.cache keeps the splits: a run named so had its files among them
    with pytest.raises(ConfigError, match=r"run_name='.cache' is the folder of output_dir's"):
        load_config(SMOKE, ["run_name=.cache"])
    assert load_config(SMOKE, ["run_name=.cache2"]).run_name == ".cache2"


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


def test_the_ism_baselines_config_says_it_partitions_at_random():
    # method=random on the command line kept clustering.method's default, kmeans, in the
    # run's config.yaml, although the run partitions at random
    cfg = load_config(DEFAULT, ["method=random"])
    assert cfg.clustering.method == "random"
    assert yaml.safe_load(cfg.to_yaml())["clustering"]["method"] == "random"
    assert cfg.with_overrides([]).clustering.method == "random"  # a resume's, the same
    assert load_config(DEFAULT).clustering.method == "kmeans"


def test_both_stages_epochs_on_the_command_line_override_a_files_trainer_max_epochs():
    # smoke.yaml sets trainer.max_epochs: 1; "-c configs/smoke.yaml stage1.max_epochs=6
    # stage2.max_epochs=3" was refused, naming a key the user never typed
    smoke = DEFAULT.with_name("smoke.yaml")
    cfg = load_config(smoke, ["stage1.max_epochs=6", "stage2.max_epochs=3"])
    assert (cfg.stage_epochs(1), cfg.stage_epochs(2)) == (6, 3)
    assert cfg.trainer.get("max_epochs") is None
    cfg = load_config(smoke, ["stage1.max_epochs=6"])  # stage 2 still takes the file's 1
    assert (cfg.stage_epochs(1), cfg.stage_epochs(2)) == (6, 1)
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=3 would be ignored"):
        load_config(smoke, ["trainer.max_epochs=3", "stage1.max_epochs=6", "stage2.max_epochs=3"])
    # a resume's overrides on a run started from smoke.yaml: the same (they were refused)
    run = load_config(smoke)
    cfg = run.with_overrides(["stage1.max_epochs=6", "stage2.max_epochs=3"])
    assert (cfg.stage_epochs(1), cfg.stage_epochs(2)) == (6, 3)
    assert cfg.trainer.get("max_epochs") is None and run.trainer["max_epochs"] == 1
    assert run.with_overrides(["stage1.max_epochs=6"]).stage_epochs(2) == 1
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=3 would be ignored"):
        run.with_overrides(["trainer.max_epochs=3", "stage1.max_epochs=6", "stage2.max_epochs=3"])
    # an interpolation to the file's value, which the overrides alone cannot resolve:
    # the config's own error, not OmegaConf's traceback
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=1 would be ignored"):
        load_config(smoke, ["stage1.max_epochs=${trainer.max_epochs}", "stage2.max_epochs=3"])


def test_trainer_max_epochs_that_would_be_ignored_is_refused():
    with pytest.raises(
        ConfigError,
        match=r"trainer.max_epochs=3 would be ignored.*stage1.max_epochs=12.*"
        r"drop trainer.max_epochs \(trainer.max_epochs=null\)",
    ):
        load_config(DEFAULT, ["trainer.max_epochs=3"])
    # Lightning's "no limit" is no stage's end: it was "must be set", though it was
    with pytest.raises(ConfigError, match=r"trainer.max_epochs=-1 would train stage2 without "
                       "end: give trainer.max_epochs a count, or stage2.max_epochs$"):  # fmt: skip
        load_config(DEFAULT, ["trainer.max_epochs=-1", "stage2.max_epochs=null"])
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


def test_a_refused_cluster_count_is_one_error_not_three():
    # num_clusters=-1 also made route.top_m=1 and stage2.jobs=1 "more than" it
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, ["clustering.num_clusters=-1", "stage2.subnets=[5]"])
    assert str(err.value).endswith(
        "invalid configuration:\n  - clustering.num_clusters must be > 0, got -1"
    )
    with pytest.raises(ConfigError, match=r"stage2.subnets: \[-1\] are not sub-nets"):
        load_config(SMOKE, ["clustering.num_clusters=0", "stage2.subnets=[-1]"])


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
        ("stage1.optim.lr=nan", "stage1.optim.lr must be a finite number, got nan"),
        ("route.alpha=nan", "route.alpha must be a finite number, got nan"),
        ("data.test_fraction=.inf", "data.test_fraction must be a finite number, got inf"),
    ],
)
def test_values_refused_only_later_or_never_are_refused_at_load(override, expected):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert expected in str(err.value)
    # one problem, said once (a NaN was also "must be > 0, got nan")
    assert str(err.value).count(override.split("=")[0]) == 1, str(err.value)


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data.batch_size=1"], "data.batch_size must be >= 2 (BatchNorm1d cannot train on a"),
        (["data.num_workers=-1"], "data.num_workers must be >= 0, got -1"),
        (["data.test_fraction=0"], "data.test_fraction must be > 0: the held-out accuracy needs"),
        (
            ["model.weights=/tmp/w.pth", "model.pretrained=true"],
            "model.weights='/tmp/w.pth' and model.pretrained=true both give stage 1's starting",
        ),
        (["stage1.optim.warmup_epochs=-1"], "stage1.optim.warmup_epochs must be >= 0, got -1"),
        (["stage2.jobs=2", "stage2.group=2"], "stage2.group=2 must be in [0, stage2.jobs=2)"),
        (["stage2.subnets=[]"], "stage2.subnets is empty: name at least one sub-net, or null"),
        (["stage2.subnets=[[0]]"], "stage2.subnets: each item is a sub-net's number, got [[0]]"),
        (["stage2.subnets=[0,0]"], "stage2.subnets=[0, 0] names a sub-net twice"),
        (["slurm.gpus_per_node=-1"], "slurm.gpus_per_node must be >= 0, got -1"),
        (
            ["method=random", "clustering.method=balanced"],
            "method=random partitions at random: clustering.method=balanced contradicts it",
        ),
    ],
)
def test_settings_that_cannot_run_are_refused_at_load_naming_the_key(overrides, expected):
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert expected in str(err.value)


def _choices(key: str) -> list[str]:
    """The values the config takes for ``key``, as its refusal of another one lists them."""
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [f"{key}=no-such-value"])
    found = re.search(rf"{re.escape(key)}='no-such-value' is not one of ([^\n]+)", str(err.value))
    assert found, str(err.value)
    return found.group(1).split(", ")


def test_the_configs_choices_are_the_ones_the_code_behind_them_takes():
    # config.py may not import the layers it configures, so it spells their choices
    # out: a choice added to one side only is refused at load, or fails mid-run
    from facecluster.clustering.kmeans import METHODS
    from facecluster.config import HEAD_MARGIN_BOUNDS
    from facecluster.data.datamodule import DECODE_PLACES, SUBNET_EPOCH_SIZES
    from facecluster.data.images import BAD_IMAGE_POLICIES
    from facecluster.models.components.heads import HEADS

    assert _choices("data.on_bad_image") == list(BAD_IMAGE_POLICIES)
    assert _choices("data.decode") == list(DECODE_PLACES)
    assert _choices("clustering.method") == list(METHODS)
    assert _choices("stage2.epoch_size") == list(SUBNET_EPOCH_SIZES)
    # head.name: any name, a head of the user's own too (checked at the start of a run,
    # builders.check_head); the built-in heads' margins are bounded at load
    assert set(HEAD_MARGIN_BOUNDS) == set(HEADS)


@pytest.mark.parametrize("preset", [DEFAULT, INSIGHTFACE])
def test_another_head_on_a_preset_trains_with_its_own_margin(preset):
    # the presets pinned ArcFace's m: 0.5, so head.name=cosface on them trained CosFace
    # with a 0.5 cosine margin, and adaface with 0.5, in place of their own 0.35 and 0.4
    from facecluster.models.components.heads import create_head

    for name, margin in [("arcface", 0.5), ("cosface", 0.35), ("adaface", 0.4)]:
        head = load_config(preset, [f"head.name={name}"]).head
        assert create_head(name, 10, 8, s=head.s, m=head.m).m == margin


def test_the_margin_is_bounded_in_its_heads_own_units():
    # ArcFace's m is an angle, below pi/2; CosFace's a cosine, below 2, and the config
    # refused CosFace margins from pi/2 on with ArcFace's bound
    with pytest.raises(ConfigError, match=r"head.m must be in \[0, 1.5708\), got 1.6"):
        load_config(SMOKE, ["head.m=1.6"])
    assert load_config(SMOKE, ["head.name=cosface", "head.m=1.6"]).head.m == 1.6
    with pytest.raises(ConfigError, match=r"head.m must be in \[0, 2\), got 2"):
        load_config(SMOKE, ["head.name=cosface", "head.m=2"])


@pytest.mark.parametrize("epochs", ["0", "-5", "abc", "2.5"])
def test_trainer_max_epochs_must_be_a_positive_whole_number(epochs):
    nulled = ["stage1.max_epochs=null", "stage2.max_epochs=null"]
    with pytest.raises(ConfigError, match="trainer.max_epochs must be a whole number > 0"):
        load_config(DEFAULT, [f"trainer.max_epochs={epochs}", *nulled])


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["data=3"], "command line, data=3: 'data' is a section, given the value 3: give its"),
        (["run_name=x", "route=flat"], "command line, route=flat: 'route' is a section"),
        (["stage1={optim: sgd}"], "'stage1.optim' is a section, given the value 'sgd'"),
        (["stage1.optim.betas=[0.9]"], "command line, stage1.optim.betas=[0.9]: wrong type"),
        (["run_name=${oops}"], "Interpolation key 'oops' not found (in 'run_name'); a '${'"),
    ],
)
def test_an_error_without_a_key_names_the_override(overrides, expected):
    # they said "wrong type for 'None'", or ended in a traceback (the interpolation)
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, overrides)
    assert expected in str(err.value)


def test_one_value_for_a_list_key_says_it_takes_a_list(tmp_path):
    # "AnyNode is not a ListConfig, TupleConfig, list, or tuple" (a walkthrough: the
    # docs show one verification file, so one path is a natural thing to type)
    pairs = tmp_path / "pairs.txt"  # an LFW pairs list, its images/ beside it
    pairs.write_text("")
    (tmp_path / "images").mkdir()
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [f"data.verification={pairs}"])
    assert str(err.value) == (
        f"command line, data.verification={pairs}: wrong type for 'data.verification': "
        "it takes a list, as data.verification=[a,b]"
    )
    assert load_config(SMOKE, [f"data.verification=[{pairs}]"]).data.verification
    # an item set by its index ended in OmegaConf's TypeError "Cannot merge
    # incompatible container types", a traceback naming no key (a walkthrough)
    for key in ("wandb.tags", "stage1.optim.betas", "slurm.setup"):
        with pytest.raises(ConfigError) as err:
            load_config(SMOKE, [f"{key}.0=1"])
        assert str(err.value) == (
            f"command line, {key}.0=1: '{key}' takes a whole list, as {key}=[a,b]: an item "
            f"cannot be set by its index ({key}.0=...)"
        )


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
    # in any case: Lightning takes DDP_SPAWN as ddp_spawn
    for strategy in ("ddp_spawn", "ddp_fork", "fsdp", "deepspeed_stage_2", "DDP_SPAWN", "Ddp_Fork"):
        with pytest.raises(ConfigError, match=rf"trainer.strategy='{strategy}'.* only ddp"):
            load_config(SMOKE, [f"trainer.strategy={strategy}"])
    assert load_config(SMOKE, ["trainer.strategy=ddp"]).trainer["strategy"] == "ddp"


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("trainer.limit_train_batches=0", "trainer.limit_train_batches=0 trains no batch"),
        ("trainer.limit_train_batches=0.0", "trainer.limit_train_batches=0.0 trains no batch"),
        ("trainer.max_steps=0", "trainer.max_steps=0 trains no step"),
        ("trainer.fast_dev_run=true", "trainer.fast_dev_run=true saves no checkpoint"),
        ("trainer.fast_dev_run=2", "trainer.fast_dev_run=2 saves no checkpoint"),
        # found after each stage had trained (its test), or stage 1 (stage 2's sampler)
        ("trainer.limit_test_batches=0", "trainer.limit_test_batches=0 tests nothing"),
        ("trainer.overfit_batches=2", "trainer.overfit_batches=2: stage 2's sampler"),
        ("trainer.overfit_batches=0.1", "trainer.overfit_batches=0.1: stage 2's sampler"),
    ],
)
def test_trainer_settings_that_train_nothing_are_refused_at_load(override, expected):
    # stage 1 "finished" with 0 epochs and no checkpoint, then stage 2 died with a
    # FileNotFoundError traceback and the run could never be resumed
    with pytest.raises(ConfigError) as err:
        load_config(SMOKE, [override])
    assert expected in str(err.value)
    fine = ["trainer.limit_train_batches=0.5", "trainer.max_steps=-1", "trainer.fast_dev_run=false"]
    fine += ["trainer.limit_test_batches=0.5", "trainer.overfit_batches=0"]
    assert load_config(SMOKE, fine).trainer["limit_train_batches"] == 0.5


def test_trainer_counts_and_switches_lightning_takes_unchecked_are_refused_at_load():
    # check_val_every_n_epoch=0 passed the Trainer and raised ZeroDivisionError at the fit,
    # log_every_n_steps=abc a TypeError, both after the run folder was made; a switch
    # given a string (sync_batchnorm=abc) was taken as true
    refused = {
        "trainer.check_val_every_n_epoch=0": "check_val_every_n_epoch must be a whole number >= 1",
        "trainer.log_every_n_steps=abc": "log_every_n_steps must be a whole number >= 0, got 'abc'",
        "trainer.num_sanity_val_steps=-2": "num_sanity_val_steps must be a whole number >= -1",
        "trainer.sync_batchnorm=abc": "trainer.sync_batchnorm must be true or false, got 'abc'",
        "trainer.benchmark=abc": "trainer.benchmark must be true or false, got 'abc'",
        # named only inside Lightning's TypeError, after every trainer setting
        "trainer.max_steps=abc": "trainer.max_steps must be a whole number >= -1 (-1: no limit)",
        "trainer.max_steps=-2": "trainer.max_steps must be a whole number >= -1",
        "trainer.limit_train_batches=abc": "limit_train_batches must be a count (a whole number",
        "trainer.limit_val_batches=-1": "trainer.limit_val_batches must be a count",
        "trainer.val_check_interval=1.5": "a fraction of an epoch in (0, 1], or a time",
        "trainer.val_check_interval=0": "val_check_interval must be a count of batches (a whole",
    }
    for override, expected in refused.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(SMOKE, [override])
    fine = ["trainer.check_val_every_n_epoch=null", "trainer.num_sanity_val_steps=-1",
            "trainer.benchmark=true", "trainer.log_every_n_steps=0",
            "trainer.limit_val_batches=3", "trainer.val_check_interval=0.5"]  # fmt: skip
    # Lightning's time interval (a review of the diff: refused, runs saved with it too)
    assert (
        load_config(SMOKE, ["trainer.val_check_interval=00:00:30:00"]).trainer["val_check_interval"]
        == "00:00:30:00"
    )
    assert load_config(SMOKE, fine).trainer["benchmark"] is True


@pytest.mark.parametrize(
    ("overrides", "expected", "shorter"),
    [
        (
            ["stage1.optim.warmup_epochs=1.5"],
            "stage1.optim.warmup_epochs=1.5 is longer than stage 1's 1 epoch (trainer.max_epochs)",
            "stage1.optim.warmup_epochs=1",  # equal: a one-epoch try-out of the default
        ),
        (
            ["stage2.max_epochs=2", "stage2.optim.warmup_epochs=2.5"],
            "stage2.optim.warmup_epochs=2.5 is longer than stage 2's 2 epochs (stage2.max_",
            "stage2.optim.warmup_epochs=1.5",
        ),
        (  # stage 1 trains both stages' epochs
            ["method=single", "stage1.optim.warmup_epochs=3"],
            "stage1.optim.warmup_epochs=3 is longer than stage 1's 2 epochs (stage 1 + stage 2",
            "stage1.optim.warmup_epochs=2",
        ),
    ],
)
def test_a_warm_up_longer_than_its_stage_is_refused_for_a_new_run(
    overrides, expected, shorter, tmp_path
):
    # the learning rate only ramped up and never decayed (lr_factor); refused before
    # the run folder is made, but a run saved with one still loads (evaluation, export)
    from facecluster.pipeline import train

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *overrides))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert expected in str(err.value)
    assert "would only ramp up, never reach its peak nor decay" in str(err.value)
    assert not (tmp_path / "run").exists()
    assert not load_config(SMOKE, [*overrides, shorter]).training_problems()
    # method=single's stage 2 does not train: its warm-up is not checked
    assert not load_config(
        SMOKE, ["method=single", "stage2.optim.warmup_epochs=5"]
    ).training_problems()


@pytest.mark.parametrize(("value", "shown"), [("-1", "-1"), ("-0.5", "-0.5"), (".nan", "nan")])
def test_a_negative_gradient_clip_is_refused(value, shown):
    # clip_grad_norm_ with a negative max flipped the gradient's sign, silently
    with pytest.raises(ConfigError, match=rf"trainer.gradient_clip_val must be >= 0.*got {shown}"):
        load_config(SMOKE, [f"trainer.gradient_clip_val={value}"])
    for fine in ("0", "1.5", "null"):
        load_config(SMOKE, [f"trainer.gradient_clip_val={fine}"])


@pytest.mark.parametrize("value", ["0", "-2", "1.5"])
def test_accumulate_grad_batches_must_be_a_whole_number_of_at_least_one(value):
    # 0 ended in a ZeroDivisionError traceback after the run folder was written
    with pytest.raises(
        ConfigError,
        match=rf"trainer.accumulate_grad_batches must be a whole number >= 1, got {value}",
    ):
        load_config(SMOKE, [f"trainer.accumulate_grad_batches={value}"])
    assert (
        load_config(SMOKE, ["trainer.accumulate_grad_batches=2"]).trainer["accumulate_grad_batches"]
        == 2
    )


def test_quoted_text_and_yamls_nulls_read_as_on_other_command_lines():
    # a review: run_name='my run' named a folder with the quotes in its name; ~ and NULL
    # unset a number key but were the text '~' and 'NULL' for a text key
    cfg = load_config(SMOKE, ["run_name='my run'", 'wandb.project="a b"', "wandb.entity=~"])
    assert (cfg.run_name, cfg.wandb.project, cfg.wandb.entity) == ("my run", "a b", None)
    for null in ("null", "Null", "NULL", "~"):
        assert load_config(SMOKE, ["wandb.entity=x", f"wandb.entity={null}"]).wandb.entity is None
    assert load_config(SMOKE, ["run_name='None'", "data.root='x'"]).run_name == "None"
    # ~ is a path's home where the key cannot be null (output_dir=~ was the home folder)
    assert load_config(SMOKE, ["output_dir=~"]).output_dir == "~"
    # the overrides facecluster composes itself read as the text they hold (a resume of a
    # run folder named None was refused, one named ~ lost its name)
    for name in ("None", "~", "NULL", "'my run'", "a${b}", "010", "2:00:00", "x'"):
        assert load_config(SMOKE, [text_override("run_name", name)]).run_name == name


@pytest.mark.parametrize(
    ("override", "expected"),
    [  # None was the text 'None' for a text key, and "could not be converted" for a number
        ("wandb.entity=None", "wandb.entity=None: YAML's null is written null"),
        ("data.max_classes=None", "data.max_classes=None: YAML's null is written null"),
        # YAML 1.1 read these as numbers in base 8 and 60, silently: 2 hours of
        # slurm.time_min (minutes) submitted jobs of 5 days
        ("seed=010", r"seed=010: YAML reads a number with a leading 0 as octal \(8\): write"),
        ("data.batch_size=032", r"YAML reads a number with a leading 0 as octal \(26\)"),
        ("slurm.time_min=2:00:00", r"YAML reads 2:00:00 as a number in base 60: write the"),
        ("trainer.val_check_interval=1:30", r"or quote a time as text"),
    ],
)
def test_values_yaml_reads_otherwise_than_they_look_are_refused(override, expected, tmp_path):
    with pytest.raises(ConfigError, match=expected):
        load_config(SMOKE, [override])
    # in a config file too, naming the file, its line and the key
    key, _, value = override.partition("=")
    *sections, leaf = key.split(".")
    lines = [f"{'  ' * i}{name}:" for i, name in enumerate(sections)]
    given = tmp_path / "given.yaml"
    given.write_text("\n".join(["stage: all", *lines, f"{'  ' * len(sections)}{leaf}: {value}"]))
    line = len(sections) + 2
    if key == "wandb.entity":  # a text key's plain None in a file is text, as the run's
        assert load_config([SMOKE, given]).wandb.entity == "None"  # config.yaml writes it
        return
    with pytest.raises(ConfigError, match=rf"given.yaml, line {line}, {key}: {value}: YAML"):
        load_config([SMOKE, given])
    given.write_text(given.read_text().replace(f": {value}", f": '{value}'"))  # quoted: text
    if key == "trainer.val_check_interval":
        load_config([SMOKE, given])


@pytest.mark.parametrize(
    ("override", "expected"),
    [  # a property test: in a section's value or a list's items these passed silently
        ("data={min_images_per_class: 010}", r"leading 0 as octal \(8\)"),
        ("model.kwargs={width: 010}", r"leading 0 as octal \(8\)"),
        ("slurm={time_min: 2:00:00}", "YAML reads 2:00:00 as a number in base 60"),
        ("wandb={entity: None}", "YAML's null is written null"),
        ("wandb.tags=[None]", "YAML's null is written null"),
        # a text list's items and a section's text keys were YAML-typed, then made text
        ("wandb.tags=[010]", "YAML reads 010 as the int 8, which a text key takes as '8'"),
        ("wandb.tags=[yes]", "YAML reads yes as the bool True"),
        ("slurm.setup=[2:00]", "YAML reads 2:00 as the int 120"),
        ("wandb={project: 1e3}", "YAML reads 1e3 as the float 1000.0"),
        # OmegaConf's own errors were tracebacks
        ("run_name=a${b", r"no viable alternative.*a '\$\{' meant as text is written"),
        ("seed=${b", r"no viable alternative.*a '\$\{' meant as text is written"),
        ("model.kwargs={~: a}", "Incompatible key type 'NoneType'"),
        # its message was a template: "Value '$VALUE' of type '$VALUE_TYPE' could not be"
        ("stage1.optim.betas=[a, b]", "wrong type: an item could not be converted to Float"),
        # a list where a number goes: TypeError tracebacks in the checks
        ("stage2.subnets=[[0]]", r"stage2.subnets: each item is a sub-net's number, got \[\[0\]\]"),
        ("stage1.optim.betas=[[0.9], 0.99]", r"betas must be two values in \[0, 1\), got \[\["),
        # OSError "File name too long" once the run folder was made
        (f"run_name={'a' * 300}", "run_name is 300 bytes long: a folder's name takes 255"),
    ],
)
def test_values_inside_sections_and_lists_follow_the_same_rules(override, expected):
    with pytest.raises(ConfigError, match=expected) as err:
        load_config(SMOKE, [override])
    said = str(err.value)
    assert override in said or re.search("run_name is|subnets:|betas must", said)
    # the same items quoted are the text written
    assert load_config(SMOKE, ["wandb.tags=['010', 'yes', 2024, '1e3']"]).wandb.tags == [
        "010",
        "yes",
        "2024",
        "1e3",
    ]


def test_a_setup_line_yaml_reads_as_a_mapping_is_refused(tmp_path):
    # `- echo node: $(hostname)` is a mapping to YAML, which OmegaConf takes as an item of
    # a list of text: submitit failed on it at submission, after the run folder was made
    given = tmp_path / "given.yaml"
    given.write_text("slurm:\n  setup:\n    - module load cuda\n    - echo node: $(hostname)\n")
    said = r"slurm.setup: each item is a shell line, got \{'echo node': '\$\(hostname\)'\}"
    with pytest.raises(ConfigError, match=said):
        load_config([SMOKE, given])
    with pytest.raises(ConfigError, match="slurm.setup: each item is a shell line"):
        load_config(SMOKE, ["slurm.setup=[echo a: b]"])
    given.write_text("slurm:\n  setup:\n    - 'echo node: $(hostname)'\n")  # quoted: text
    assert load_config([SMOKE, given]).slurm.setup == ["echo node: $(hostname)"]


def test_a_text_key_in_a_file_keeps_the_text_written_or_is_refused(tmp_path):
    # run_name: 010 in a -c file named the run 8 (on the command line: 010)
    given = tmp_path / "given.yaml"
    for value, read in [("010", "8"), ("yes", "True"), ("1e3", "1000.0"), ("1_000", "1000")]:
        given.write_text(f"stage: all\nwandb:\n  project: {value}\n")
        with pytest.raises(ConfigError, match=rf"given.yaml, line 3, wandb.project: {value}: "):
            load_config([SMOKE, given])
        given.write_text(f"stage: all\nwandb:\n  project: '{value}'\n  tags: [a, {value}]\n")
        with pytest.raises(ConfigError, match=f"which a text key takes as '{read}'"):
            load_config([SMOKE, given])
    given.write_text("stage: all\nwandb:\n  project: 2024\n")  # the same text: taken
    assert load_config([SMOKE, given]).wandb.project == "2024"
    # a tab before a comment: OmegaConf reads it, the file check's parser stopped on it
    given.write_text("seed: 5\t# five\n")
    assert load_config([SMOKE, given]).seed == 5


@pytest.mark.parametrize(
    "override", ["model.kwargs.x='None'", "wandb.tags=['None', '010']", "output_dir=runs\\${x"]
)
def test_what_a_command_line_gives_its_config_yaml_keeps(override, tmp_path):
    # a property test: the text None in a mapping was written plain, which the file check
    # then refused at resume; an unclosed \${ stopped the run at config.yaml (a traceback)
    cfg = load_config(SMOKE, [override])
    saved = tmp_path / "config.yaml"
    saved.write_text(cfg.run_settings().to_yaml())
    assert load_config(saved).to_dict() == cfg.run_settings().to_dict()


def test_resume_reads_its_value_as_the_other_text_keys(tmp_path, capsys):
    # resume='runs/my run' looked for a folder with the quotes in its name; resume=~
    # (YAML's null) for a run in the home folder
    from facecluster.cli import train_main

    (tmp_path / "my run").mkdir()
    assert train_main([f"resume='{tmp_path}/my run'"]) == 2
    assert f"resume={tmp_path}/my run: not a facecluster run folder" in capsys.readouterr().err
    assert train_main(["resume=~", "--print-config"]) == 0
    assert "\nresume: null\n" in capsys.readouterr().out


def test_the_forms_of_other_tools_are_answered_with_facecluster_s(capsys):
    # a review: Hydra's defaults list and experiment= were met with unrelated spellings
    # (eval.plots, eval, data), ~seed was told to write seed=null (refused), and the
    # method files the other way round were told "use method=random"
    said = {
        "experiment=lfw423": "an experiment is a config file, given with -c "
        "(-c configs/experiment/lfw423.yaml)",
        "defaults=[smoke]": "Hydra's defaults lists are not read here; config files are "
        "composed with -c",
        "ckpt_path=x": "resume=<run folder or .ckpt> continues a run",
        "~seed": "overrides take no '~'; seed is not optional: give it a value",
        "logger=null": "logger=null: no logger is logger=none",
        "trainer=gpu": "wrong type for 'trainer': it takes named values, as "
        "trainer.<name>=value or trainer={name: value}",
    }
    for override, expected in said.items():
        with pytest.raises(ConfigError, match=re.escape(expected)):
            load_config(SMOKE, [override])
    method = [ROOT / "configs" / "experiment" / "lfw423.yaml", ROOT / "configs/method/random.yaml"]
    with pytest.raises(ConfigError, match="k-means clusters are clustering.method=kmeans"):
        load_config(method, ["method=clustered"])
    with pytest.raises(ConfigError, match=re.escape("(did you mean -c configs/smoke.yaml?)")):
        load_config("smoke")  # Hydra's --config-name
    # `facecluster export run=runs/x out`: export takes the folder itself
    from facecluster.cli import export_main

    assert export_main([f"run={DEMO}", "out"]) == 2
    assert f"run={DEMO}: give the path itself, {DEMO}, without run=" in capsys.readouterr().err
    # a method file alone replaces default.yaml and its epochs: said so
    with pytest.raises(ConfigError, match="a -c file replaces configs/default.yaml"):
        load_config(ROOT / "configs" / "method" / "random.yaml")


def test_a_dollar_brace_given_as_text_stays_text_through_a_run(tmp_path):
    # the documented '\\${' for a path holding '${': loaded, then resolved again when
    # the run had started (InterpolationKeyError, a half-made run folder), and written
    # to config.yaml unescaped, for the next load to resolve
    from facecluster.pipeline import train
    from facecluster.run import RunFolder

    root = tmp_path / "faces${b}"
    root.symlink_to(DEMO)
    given = [f"data.root={str(root).replace('${', chr(92) + '${')}", "stage=1", "logger=none"]
    run = RunFolder(train(load_config(SMOKE, smoke_overrides(tmp_path, *given))).run_dir)
    assert run.config().data.root == str(root)
    cfg = RunFolder.config_for_resume(str(run.path), ["stage=cluster"])
    assert cfg.data.root == str(root) and cfg.with_overrides(["seed=3"]).data.root == str(root)
    train(cfg)
    assert run.clusters_path.is_file()


def test_print_config_shows_the_resolved_config(tmp_path):
    # a review: no command printed the config a command line composes without training
    command = (
        "python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml "
        "--print-config"
    )
    done = run_documented(command, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    printed = tmp_path / "printed.yaml"
    printed.write_text(done.stdout)
    shown = load_config(printed)  # it loads as the config the files compose
    files = [ROOT / "configs" / "experiment" / "lfw423.yaml", ROOT / "configs/method/random.yaml"]
    assert shown == load_config(files)
    assert (shown.method, shown.clustering.method) == ("random", "random")
    assert not (tmp_path / "runs").exists()  # nothing trained, no run folder


def test_hydra_prefixes_and_empty_values_are_refused_naming_the_fix():
    # "+trainer.foo=1" suggested '+trainer' -> trainer, model.pretrained; "~key" was
    # "must look like key=value"; "data.max_classes=" unset the key, silently
    with pytest.raises(ConfigError, match=r"\+trainer.profiler=simple: overrides take no '\+'.*"
                       "write trainer.profiler=simple$"):  # fmt: skip
        load_config(SMOKE, ["+trainer.profiler=simple"])
    with pytest.raises(ConfigError, match="~data.max_classes: overrides take no '~'; to unset "
                       "an optional key, write data.max_classes=null$"):  # fmt: skip
        load_config(SMOKE, ["~data.max_classes"])
    with pytest.raises(ConfigError, match=r"data.max_classes=: no value \(give one; an optional "
                       r"key is unset with data.max_classes=null\)"):  # fmt: skip
        load_config(SMOKE, ["data.max_classes="])
    assert load_config(SMOKE, ["data.max_classes=null"]).data.max_classes is None
    # a text key's empty value was taken as the empty string: slurm.partition= then
    # submitted to the default partition, silently
    for key in ("slurm.partition", "wandb.entity", "model.backbone"):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}=: no value \(give one"):
            load_config(SMOKE, [f"{key}="])
    # Lightning 1.x names: the closest spelling suggested plugins for gpus
    removed = "trainer.gpus is a Lightning 1.x argument that Lightning 2 removed: use "
    with pytest.raises(ConfigError, match=removed + "trainer.accelerator=gpu trainer.devices=N"):
        load_config(SMOKE, ["trainer.gpus=2"])


def test_method_single_is_not_bound_by_the_cluster_count():
    # a single model has no clusters: max_classes=2 was refused against 4 clusters
    single = load_config(SMOKE, ["method=single", "data.max_classes=2", "route.top_m=9"])
    assert single.data.max_classes == 2
    with pytest.raises(ConfigError, match="data.max_classes=2 is smaller than clustering"):
        load_config(SMOKE, ["data.max_classes=2", "clustering.num_clusters=4"])


def test_an_empty_resume_output_dir_or_data_root_is_refused(monkeypatch, capsys, tmp_path):
    # resume=$RUN with RUN unset started a new demo run instead of resuming
    from facecluster import cli, pipeline

    started = []
    monkeypatch.setattr(pipeline, "train", lambda cfg, **kw: started.append(cfg))
    assert cli.train_main(["-c", str(SMOKE), "resume=", f"output_dir={tmp_path}"]) == 2
    assert not started
    error = capsys.readouterr().err
    assert "error: invalid configuration" in error and "resume='' is empty" in error
    for key in ("output_dir", "data.root", "resume"):
        with pytest.raises(ConfigError, match=rf"{re.escape(key)}='' is empty"):
            load_config(SMOKE, [f"{key}="])


def test_a_new_runs_missing_data_root_is_named_with_where_it_was_looked_for(
    monkeypatch, capsys, tmp_path
):
    # a new run's missing data.root was found after the imports and the checks (5-7 s),
    # with advice for a run whose data moved; a relative one did not say where it looked
    from facecluster import cli, pipeline

    started = []
    monkeypatch.setattr(pipeline, "train", lambda cfg, **kw: started.append(cfg))
    monkeypatch.chdir(tmp_path)
    args = ["-c", str(SMOKE), f"output_dir={tmp_path / 'runs'}", "eval.after_training=false"]
    assert cli.train_main([*args, "data.root=faces"]) == 2
    assert not started and not (tmp_path / "runs").exists()
    error = capsys.readouterr().err
    assert f"data.root='faces' does not exist (looked for in {tmp_path} and " in error
    assert "an InsightFace .rec" in error and "moved" not in error
    (tmp_path / "faces").mkdir()  # found in the working directory: on to the training
    assert cli.train_main([*args, "data.root=faces"]) == 0 and len(started) == 1


def test_slurm_is_refused_before_the_run_folder_where_it_cannot_submit(tmp_path, monkeypatch):
    # launcher=slurm without SLURM created the run folder, then failed on "srun";
    # the corrected re-run then said the folder already exists
    import sys

    from facecluster.pipeline import train
    from tests.conftest import smoke_overrides

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "launcher=slurm", "slurm.gpus_per_node=0"))
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    with pytest.raises(ConfigError, match=r"launcher=slurm: .*sbatch.* not found"):
        train(cfg)
    monkeypatch.setitem(sys.modules, "submitit", None)  # not installed
    with pytest.raises(ConfigError, match=r"launcher=slurm needs submitit"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_a_new_run_that_names_some_subnets_is_refused_at_start(tmp_path):
    # stage1, the clustering and sub-net 0 trained, then the assembly refused the run
    # for sub-nets 1 and 2 (exit 2 after all that work)
    from facecluster.pipeline import _check_prerequisites, train
    from facecluster.run import RunFolder
    from tests.conftest import smoke_overrides

    cfg = load_config(SMOKE, smoke_overrides(tmp_path, "stage2.subnets=[0]"))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert re.search(
        r"stage2.subnets=\[0\] with stage=all: sub-nets \[1, 2\] of a new run are not trained yet.*"
        r"resume=<run> stage=2 'stage2.subnets=\[0\]'",
        str(err.value),
    ), err.value
    assert not (tmp_path / "run").exists()
    every = load_config(SMOKE, smoke_overrides(tmp_path, "stage2.subnets=[2,0,1]"))
    _check_prerequisites(every, RunFolder.for_training(every))  # all of them: a whole run


def test_too_few_identities_to_cluster_names_what_held_them_out(tmp_path):
    # "has only 2 identities with at least 10 images" though 4 qualified: the open set
    # (data.unseen_fraction) had held 2 of data.max_classes=4 out of training
    from facecluster.builders import build_datamodule, check_identity_count
    from tests.conftest import smoke_overrides

    cfg = load_config(
        SMOKE, smoke_overrides(tmp_path, "data.max_classes=4", "data.unseen_fraction=0.5")
    )
    with pytest.raises(ConfigError) as err:
        check_identity_count(cfg, build_datamodule(cfg))
    message = str(err.value)
    assert "clustering.num_clusters=3" in message and "only 2 identities train" in message
    assert "4 identities with at least 10 images" in message
    assert "data.max_classes=4" in message and "data.unseen_fraction=0.5 holds 2" in message


@pytest.mark.parametrize("method", ["clustered", "single"])
def test_one_training_identity_is_refused_before_the_run_folder(tmp_path, method):
    # a torchmetrics ValueError traceback from the stage-1 module, after the run folder
    # (config, names, split, an empty stage1/) was written (a walkthrough)
    from facecluster.pipeline import train
    from tests.conftest import smoke_overrides

    one = ["data.max_classes=1", "clustering.num_clusters=1", f"method={method}"]
    overrides = smoke_overrides(tmp_path, *one)
    cfg = load_config(SMOKE, overrides)
    with pytest.raises(ConfigError, match=r"only 1 identity would train, and identification"):
        train(cfg)
    assert not list(tmp_path.glob("**/config.yaml"))


def test_identity_names_that_pack_and_enrol_refuse_are_refused_before_the_run_folder(tmp_path):
    # a folder named with a tab (or blank) trained for hours, then split the rows of the
    # results and of identify's answers; pack and enrol refused it. Held-out identities
    # (data.unseen_fraction) are named in the results too.
    from facecluster.builders import build_datamodule
    from facecluster.pipeline import train
    from tests.conftest import DEMO, smoke_overrides

    root = tmp_path / "faces"
    sources = sorted(p for p in DEMO.iterdir() if p.is_dir())[:6]
    names = ["Ann", "Bob\tSmith", "Carl", "Dee", "Eve", "\u200b"]
    for name, source in zip(names, sources, strict=True):
        shutil.copytree(source, root / name)
    shared = [f"data.root={root}", "data.max_classes=null", "clustering.num_clusters=2"]
    cfg = load_config(SMOKE, smoke_overrides(tmp_path, *shared))
    with pytest.raises(ConfigError) as err:
        train(cfg)
    assert str(err.value) == (
        f"data.root={root}: 2 identity name(s) cannot name an identity ('Bob\\tSmith' holds "
        "a line break or another control character, '\\u200b' is blank); it needs a visible "
        "character and no line break or other control character: rename their folders"
    )
    assert not list(tmp_path.glob("**/config.yaml"))
    (root / "Bob\tSmith").rename(root / "Bob Smith")
    held = smoke_overrides(tmp_path, *shared, "data.unseen_fraction=0.2", "seed=8")
    assert build_datamodule(load_config(SMOKE, held)).unseen_identities("test") == ["\u200b"]
    with pytest.raises(ConfigError, match=r"1 identity name\(s\) .*\('\\u200b' is blank\)"):
        train(load_config(SMOKE, held))
    assert not list(tmp_path.glob("**/config.yaml"))
    # two folders that every table shows as one name: a decomposed "Zoë" copied from
    # macOS beside the composed one, "Carl" and "Carl " (enrol refuses the second)
    (root / "\u200b").rename(root / "Zoe\u0308")
    shutil.copytree(sorted(p for p in DEMO.iterdir() if p.is_dir())[6], root / "Z\u00f6e")
    shutil.copytree(sorted(p for p in DEMO.iterdir() if p.is_dir())[7], root / "Zo\u00eb")
    shutil.copytree(sorted(p for p in DEMO.iterdir() if p.is_dir())[8], root / "Carl ")
    with pytest.raises(ConfigError) as err:
        train(load_config(SMOKE, smoke_overrides(tmp_path, *shared)))
    assert str(err.value) == (
        f"data.root={root}: 2 pair(s) of identity folders name one person twice ('Carl' and "
        "'Carl ', 'Zoe\\u0308' and 'Zo\\xeb': names are one after Unicode normalisation "
        "(NFC) and without surrounding spaces); merge or rename them"
    )
    assert not list(tmp_path.glob("**/config.yaml"))


def test_a_config_file_that_is_not_a_yaml_mapping_is_named(tmp_path):
    # a shell script said "unknown config key 'echo hi'"
    script = tmp_path / "x.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    arcface = tmp_path / "ms1mv3_r50.py"  # an arcface_torch config
    arcface.write_text("from easydict import EasyDict as edict\nconfig = edict()\n")
    for path in (script, arcface):
        with pytest.raises(ConfigError, match=rf"{re.escape(str(path))}: not a YAML mapping"):
            load_config(path)
    empty = tmp_path / "empty.yaml"
    empty.write_text("# nothing to change\n")
    assert load_config([SMOKE, empty]).model.backbone == "tiny"


def test_an_image_size_too_large_to_train_is_refused_at_load():
    # data.image_size=100000 ended in a RuntimeError traceback from a huge allocation
    with pytest.raises(ConfigError, match=r"data.image_size=100000 is more than 1024"):
        load_config(SMOKE, ["data.image_size=100000"])
    assert load_config(SMOKE, ["data.image_size=1024"]).data.image_size == 1024


def test_a_backbone_that_cannot_take_the_image_size_or_a_keyword_is_refused_before_any_work():
    # a ViT built for 224 failed with an AssertionError traceback in training, after
    # the run folder and its config.yaml were written
    from facecluster.builders import backbone_parameters

    vit = ["model.backbone=vit_tiny_patch16_224", "data.image_size=64"]
    with pytest.raises(
        ConfigError,
        match=r"model.backbone='vit_tiny_patch16_224' cannot take data.image_size=64 .*"
        r"model.kwargs.img_size=64",
    ):
        backbone_parameters(load_config(SMOKE, vit))
    assert backbone_parameters(load_config(SMOKE, [*vit, "model.kwargs.img_size=64"])) > 0
    # a keyword the backbone does not take: named with the backbone (only it was)
    with pytest.raises(
        ConfigError,
        match=r"model.backbone='tiny' at data.image_size=\d+ with model.kwargs.foo=1: .*"
        r"unexpected keyword .*'foo'",
    ):
        backbone_parameters(load_config(SMOKE, ["model.kwargs.foo=1"]))
    # a size the backbone refuses: named by the key that sets it (it said image_size)
    with pytest.raises(
        ConfigError,
        match=r"^model.backbone='mbf' at data.image_size=100: MobileFaceNet needs image_size "
        "to be a positive multiple of 16",
    ):
        backbone_parameters(load_config(SMOKE, ["model.backbone=mbf", "data.image_size=100"]))


def test_a_relative_config_file_is_found_from_another_folder(tmp_path, monkeypatch):
    # `facecluster train -c configs/smoke.yaml`, as `facecluster --help` shows it, said
    # "config file not found" anywhere but the project root; data.root did not
    monkeypatch.chdir(tmp_path)
    assert load_config(["configs/smoke.yaml"]).data.batch_size == load_config(SMOKE).data.batch_size
    (tmp_path / "configs").mkdir()  # one in the working dir comes first
    (tmp_path / "configs" / "smoke.yaml").write_text(
        SMOKE.read_text().replace("batch_size:", "batch_size: 3 #", 1)
    )
    assert load_config(["configs/smoke.yaml"]).data.batch_size == 3
    with pytest.raises(ConfigError, match=r"not found: output_dir=x \(-c takes a YAML file, not"):
        load_config(["output_dir=x"])  # `-c output_dir=x`: the file after -c left out
    with pytest.raises(ConfigError, match=r"config file not found: lr=0.1.yaml$"):
        load_config(["lr=0.1.yaml"])  # a file's name that holds "=": no such hint
    with pytest.raises(ConfigError, match="config file not found: configs/nope.yaml$"):
        load_config(["configs/nope.yaml"])
    with pytest.raises(ConfigError, match="config file configs is a folder: name a YAML file"):
        load_config(["configs"])  # was "config file not found"


def test_a_config_mistake_or_a_mistyped_run_is_named_before_torch_is_imported():
    # train.py imported torch, Lightning and timm (9 s here) before it read the command
    # line: a mistyped key took that long to be named; then a wrong value, a Trainer
    # argument among them, imported Lightning to read the Trainer's arguments (4-5 s of
    # the 5.4 s such a mistake took here). Python lists each import it makes
    # (PYTHONPROFILEIMPORTTIME) among train.py's own errors on stderr. A resume= of a
    # run folder that does not exist, or of a folder no run made, was named after the
    # imports too (8 s and 5.8 s here).
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}
    for command, said in (
        ("python train.py data.bogus=1", "unknown config key 'data.bogus'"),
        ("python train.py stage1.max_epochs=-1", "stage1.max_epochs must be > 0, got -1"),
        (
            "python train.py -c configs/smoke.yaml trainer.max_epochs=0",
            "trainer.max_epochs must be a whole",
        ),
        ("python train.py resume=runs/no-such-run", "resume=runs/no-such-run: no such run"),
        ("python train.py resume=configs", "resume=configs: not a facecluster run folder"),
        ("python train.py resume=/dev/null", "resume=/dev/null: not a facecluster run folder"),
    ):
        args = [sys.executable, *command.split()[1:]]
        done = subprocess.run(args, cwd=ROOT, env=env, capture_output=True, text=True)
        lines = done.stderr.splitlines()
        imported = {line.rsplit("|", 1)[1].strip() for line in lines if "import time:" in line}
        assert done.returncode == 2 and said in done.stderr, done.stderr[-2000:]
        assert "facecluster.config" in imported  # the listing is there
        assert not imported & {"torch", "lightning", "timm"}, command


def test_the_trainer_arguments_checked_without_lightning_are_the_installed_trainers():
    # a key of TRAINER_ARGS is taken without a look at Lightning's Trainer: one it did
    # not take would pass the config and fail at the Trainer, after the run folder was made
    import inspect

    from lightning import Trainer

    from facecluster.config import TRAINER_ARGS

    taken = set(inspect.signature(Trainer.__init__).parameters) - {"self"}
    assert TRAINER_ARGS <= taken, sorted(TRAINER_ARGS - taken)
    # a key outside it is still looked up (a newer Lightning's) and a typo still named
    with pytest.raises(ConfigError, match=r"'trainer.max_epoch'; did you mean: trainer.max_e"):
        load_config(SMOKE, ["trainer.max_epoch=3"])


def test_a_key_under_a_value_names_the_key_it_may_mean():
    # logger.project=x said OmegaConf's "Cannot convert 'DictConfig' to string"
    with pytest.raises(ConfigError, match=r"logger is a value, not a section \(no logger.projec"):
        load_config(SMOKE, ["logger.project=x"])
    with pytest.raises(ConfigError, match=r"did you mean: wandb.project\?$"):
        load_config(SMOKE, ["logger.project=x"])
    with pytest.raises(ConfigError, match=r"'seed': seed is a value, not a section \(no seed.a\)$"):
        load_config(SMOKE, ["seed.a=1"])  # no key of that name: no suggestion
    with pytest.raises(ConfigError, match=r"'seed': seed is a value, given an empty section"):
        load_config(SMOKE, ["seed={}"])


def test_a_value_of_the_wrong_container_kind_is_named():
    # data.verification=[{a: 1}] and model.kwargs=[1] ended in TypeError tracebacks,
    # wandb.tags=[{a: 1}] was taken (a second review)
    for override, said in (
        ("data.verification=[{a: 1}]", r"data.verification: each item is a file's path, got"),
        ("model.kwargs=[1]", r"'model.kwargs' takes a mapping, as model.kwargs=\{name: value\}"),
        ("wandb.tags=[{a: 1}]", r"wandb.tags: each tag is text, got \{'a': 1\}"),
    ):
        with pytest.raises(ConfigError, match=said):
            load_config(SMOKE, [override])


def test_config_page_defaults_are_the_schemas():
    # the default column of docs/CONFIG.md is the schema's default (before any YAML
    # file: "(demo: ...)" notes what configs/default.yaml sets); a row naming several
    # keys lists their defaults in order
    from dataclasses import MISSING, fields, is_dataclass

    from facecluster.config import Config

    def defaults(cls, prefix=""):
        for f in fields(cls):
            value = f.default if f.default_factory is MISSING else f.default_factory()
            if is_dataclass(value):
                yield from defaults(type(value), f"{prefix}{f.name}.")
            else:
                yield f"{prefix}{f.name}", value

    schema = dict(defaults(Config))
    page = (DEFAULT.parents[1] / "docs" / "CONFIG.md").read_text()
    checked, wrong = 0, []
    for cell, default in re.findall(r"^\| (`.*?) \| (.*?) \|", page, re.M):
        keys = re.findall(r"`([a-z_][a-zA-Z0-9_.*]*)`", cell)
        shown = default.split(" (")[0].split(", ") if len(keys) > 1 else [default.split(" (")[0]]
        for key, text in zip(keys, shown, strict=False):
            for name in {key.replace("stageN.", "stage1."), key.replace("stageN.", "stage2.")}:
                if name not in schema or text.strip() == "":
                    continue
                value, doc = schema[name], yaml.safe_load(text.strip().strip("`"))
                if isinstance(value, float) and isinstance(doc, str):
                    doc = float(doc)  # YAML 1.1 reads 5e-4 as a string
                if isinstance(value, tuple):
                    value = list(value)
                checked += 1
                if doc != value and not (value is None and doc is None):
                    wrong.append(f"{name}: the page says {text!r}, the schema {value!r}")
    assert checked > 90 and not wrong, wrong


def test_a_true_or_false_setting_given_a_number_is_refused(tmp_path):
    # OmegaConf took eval.after_training=2 and model.compile=2 for true, eval.plots=0 for
    # false, in a YAML file too; the trainer's switches were already refused a string
    for override, given in (("eval.after_training=2", "2"), ("eval.plots=0", "0")):
        with pytest.raises(
            ConfigError, match=rf"{override.split('=')[0]} must be true or false, got {given}$"
        ):
            load_config(SMOKE, [override])
    (tmp_path / "c.yaml").write_text("model:\n  compile: 1\n")
    with pytest.raises(ConfigError, match=r"c.yaml: model.compile must be true or false, got 1"):
        load_config([SMOKE, tmp_path / "c.yaml"])
    fine = load_config(SMOKE, ["eval.plots=false", "model.compile=true"])
    assert fine.eval.plots is False and fine.model.compile is True


def test_head_kwargs_set_a_heads_own_arguments_from_one_place():
    # head.kwargs: a head of one's own's further arguments (docs/CONFIG.md); what
    # facecluster gives a head has its own key, named in the refusal
    assert load_config(SMOKE, ["head.kwargs.c=0.25"]).head.head_options() == {"c": 0.25}
    with pytest.raises(ConfigError, match=r"head.kwargs.m: set head.m, not head.kwargs"):
        load_config(SMOKE, ["head.kwargs.m=0.1"])
    with pytest.raises(ConfigError, match=r"head.kwargs.name: set head.name, not head.kwargs"):
        load_config(SMOKE, ["head.kwargs.name=x"])  # was "got multiple values for 'name'"
    # h and t_alpha are AdaFace's keys only under adaface: a head of one's own may take
    # arguments of those names (each refusal sent the user to the other)
    assert load_config(SMOKE, ["head.kwargs.h=0.5"]).head.head_options() == {"h": 0.5}
    with pytest.raises(ConfigError, match=r"head.kwargs.h: set head.h, not head.kwargs"):
        load_config(SMOKE, ["head.name=adaface", "head.kwargs.h=0.5"])
    # null: the class's default, as unset
    assert load_config(SMOKE, ["head.kwargs.c=null"]).head.head_options() == {}
    # a whole mapping replaces: a resume that gives the sub-nets another head clears
    # the arguments config.yaml keeps for the run's (merged, they could not be removed)
    saved = load_config(SMOKE, ["head.kwargs.c=0.25", "head.kwargs.d=1"])
    resumed = saved.with_overrides(["head.name=cosface", "head.kwargs={}"])
    assert resumed.head.kwargs == {} and resumed.head.name == "cosface"
    given = ["head.kwargs={}", "head.kwargs.e=2", "head.kwargs={d: 3}", "head.kwargs.f=4"]
    assert saved.with_overrides(given).head.kwargs == {"d": 3, "f": 4}
    assert saved.with_overrides(["head.kwargs.e=2"]).head.kwargs == {"c": 0.25, "d": 1, "e": 2}
    default = ROOT / "configs" / "default.yaml"  # model.kwargs: {width: 16}
    assert load_config(default, ["model.kwargs={depth: 3}"]).model.kwargs == {"depth": 3}

    # AdaFace's own keys, kept by a run's config.yaml: a resume that gives the sub-nets
    # another head is told how to unset them
    ada = load_config(SMOKE, ["head.name=adaface", "head.h=0.5"])
    with pytest.raises(ConfigError, match=r"head.name='arcface' \(to unset: head.h=null\)"):
        ada.with_overrides(["head.name=arcface"])
    assert ada.with_overrides(["head.name=arcface", "head.h=null"]).head.h is None


def test_a_path_or_name_that_is_not_utf8_is_refused_when_the_config_loads(tmp_path):
    # a folder name's bytes that are not UTF-8 (kept by Python as surrogates): data.root
    # failed at the config's save after the run folder was made, run_name once stage 1
    # had trained (torch.load cannot open such a path) (a review)
    odd = os.fsdecode(bytes(tmp_path) + b"/pk\xff")
    for override in (
        f"data.root={odd}",
        "run_name=" + os.fsdecode(b"rb\xff"),
        f"data.verification=[{odd}/lfw.bin]",
    ):
        message = f"command line, {ascii(override)}: holds bytes that are not UTF-8"
        with pytest.raises(ConfigError, match=re.escape(message)):
            load_config(SMOKE, [override])
        with pytest.raises(ConfigError, match=re.escape(message)):  # without a file
            load_config(None, [override])
    assert load_config(SMOKE, ["run_name=Zoë"]).run_name == "Zoë"  # UTF-8 is fine
