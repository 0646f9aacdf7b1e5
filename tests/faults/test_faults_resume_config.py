"""Fault injection: resuming with overrides that contradict the run's checkpoints."""

from __future__ import annotations

import pytest

from facecluster.config import ConfigError, load_config
from facecluster.run import RunFolder
from tests.conftest import DEMO, SMOKE, smoke_overrides

pytestmark = pytest.mark.faults


@pytest.fixture
def run_dir(tmp_path):
    """A run folder with its config.yaml (what resume reads), no training needed."""
    cfg = load_config(SMOKE, smoke_overrides(tmp_path))
    run = RunFolder.for_training(cfg)
    run.create()
    run.save_config(cfg)
    return tmp_path / "run"


def test_contradicting_overrides_are_refused_with_every_difference(run_dir):
    with pytest.raises(ConfigError) as info:
        RunFolder.config_for_resume(
            str(run_dir),
            [
                "data.max_classes=20",
                "model.backbone=iresnet18",
                "clustering.num_clusters=4",
                "data.min_images_per_class=12",
                "method=random",
                "clustering.method=random",
            ],
        )
    message = str(info.value)
    assert "contradict the run's checkpoints" in message
    for expected in (
        "data.max_classes: the run has 12, the command line 20",
        "data.min_images_per_class: the run has 10, the command line 12",
        "clustering.num_clusters: the run has 3, the command line 4",
        "clustering.method: the run has 'kmeans', the command line 'random'",
        "method: the run has 'clustered', the command line 'random'",
        "'backbone': 'tiny'",
    ):
        assert expected in message
    # what k-means grouped decides the sub-nets' identities too
    with pytest.raises(ConfigError, match="clustering.features: the run has 'means', the com"):
        RunFolder.config_for_resume(str(run_dir), ["clustering.features=head"])
    with pytest.raises(ConfigError, match="clustering.overlap: the run has 0.0, the command"):
        RunFolder.config_for_resume(str(run_dir), ["clustering.overlap=0.1"])
    with pytest.raises(ConfigError, match="stage2.negatives: the run has 0.0, the command"):
        RunFolder.config_for_resume(str(run_dir), ["stage2.negatives=0.5"])


def test_harmless_overrides_and_same_root_written_differently_are_accepted(run_dir):
    cfg = RunFolder.config_for_resume(
        str(run_dir),
        ["trainer.max_epochs=5", "logger=none", "stage2.max_epochs=2", f"data.root={DEMO}"],
    )
    assert cfg.trainer["max_epochs"] == 5 and cfg.logger == "none"


def test_a_rec_named_by_itself_or_by_its_folder_is_the_same_data_root(tmp_path):
    # docs/DATA.md: "point data.root at the .rec file or its folder"; a resume naming
    # the other was refused as another data root
    from facecluster.config import load_config
    from facecluster.data.pack import main as pack_main
    from facecluster.run import _refuse_contradictions

    assert pack_main([str(DEMO), str(tmp_path / "rec")]) == 0
    forms = [tmp_path / "rec", tmp_path / "rec" / "train.rec", f"{tmp_path}/./rec/"]
    configs = [load_config(SMOKE, [f"data.root={root}"]) for root in forms]
    for saved in configs:
        for cfg in configs:
            _refuse_contradictions(saved, cfg, "run")
    with pytest.raises(ConfigError, match=r"data.root: the run has .*train.rec"):
        _refuse_contradictions(configs[1], load_config(SMOKE, [f"data.root={DEMO}"]), "run")


def test_other_data_root_is_refused(run_dir, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    with pytest.raises(ConfigError, match=r"data.root: the run has .*lfw-demo"):
        RunFolder.config_for_resume(str(run_dir), [f"data.root={other}"])
