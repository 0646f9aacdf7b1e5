"""What a two-stage evaluation costs: wall time and faces through the networks.

Evaluates a copy of a finished run (``evaluate_run``, as ``evaluate.py run=<run>``
does; the run's own ``eval/`` is left as it was) with and without ``eval.sweeps``, the
two in turn for ``--rounds`` rounds, counting the images that go through a network of
the run's backbone class (the router backbone, which the stage-1 model's rows share,
and every sub-net; whole networks: a run with ``model.shared_layers`` is refused), in
all and in the throughput measurement, and the test faces. A run is trained first when none is
given: the bundled demo's config at ``clustering.num_clusters=8``, one epoch a stage.

    python bench/eval_cost.py --out bench/results/eval_cost.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from facecluster.builders import build_datamodule
from facecluster.cli import at_least, output_file
from facecluster.config import ConfigError, load_config
from facecluster.evaluation import Bench, evaluate_run
from facecluster.models.components import create_backbone
from facecluster.pipeline import train
from facecluster.results import measured
from facecluster.run import RunFolder

QUICK = ["eval.plots=false", "logger=csv"]


def trained(out: Path, clusters: int) -> Path:
    """A two-stage run of the demo config, one epoch a stage, not evaluated."""
    overrides = [
        f"output_dir={out}",
        "logger=csv",
        f"clustering.num_clusters={clusters}",
        "stage1.max_epochs=1",
        "stage2.max_epochs=1",
        "eval.after_training=false",
    ]
    return train(load_config("configs/default.yaml", overrides)).run_dir


def evaluation(run: Path, kind: type, overrides: list[str]) -> dict[str, float]:
    """One evaluation's wall seconds and images through the run's networks (modules of
    the class ``kind``), in all and in its throughput measurement (``Bench.timings``);
    the rest is scoring the test and unseen faces (and calibration, done by the warm-up
    evaluation)."""
    seen = {"all": 0, "timing": 0}
    timing_seconds, timings, inside = [0.0], Bench.timings, []

    def count(module: torch.nn.Module, args: tuple) -> None:
        if type(module) is kind:
            seen["all"] += len(args[0])
            seen["timing"] += len(args[0]) if inside else 0

    def timed(bench: Bench, predictors: list) -> dict:
        inside.append(True)
        start = time.perf_counter()
        try:
            return timings(bench, predictors)
        finally:
            timing_seconds[0] += time.perf_counter() - start
            inside.pop()

    hook = torch.nn.modules.module.register_module_forward_pre_hook(count)
    Bench.timings = timed
    try:
        start = time.perf_counter()
        evaluate_run(run, QUICK + overrides)
        seconds = time.perf_counter() - start
    finally:
        hook.remove()
        Bench.timings = timings
    return {
        "seconds": seconds,
        "scoring_seconds": seconds - timing_seconds[0],
        "network_images": seen["all"],
        "scoring_network_images": seen["all"] - seen["timing"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished two-stage run (default: train one)")
    parser.add_argument("--clusters", type=at_least(2), default=8)
    parser.add_argument("--rounds", type=at_least(1), default=2)
    parser.add_argument("--out", type=output_file, default="bench/results/eval_cost.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            try:  # one line, not a traceback
                cfg = RunFolder(args.run).finished_config()
            except (ConfigError, OSError, ValueError) as e:
                parser.error(str(e))
            if not cfg.two_stage:
                parser.error(f"--run {args.run}: a single-model run has no sweeps")
            if cfg.model.shared_layers:
                parser.error(
                    f"--run {args.run}: model.shared_layers={cfg.model.shared_layers}: its "
                    "sub-nets run tails of a shared trunk, which this count does not see"
                )
        # a copy: an evaluation rewrites its run's eval/ (the table-only one last)
        run = shutil.copytree(args.run, Path(tmp) / "run") if args.run else None
        run = run or trained(Path(tmp), args.clusters)
        cfg = RunFolder(run).finished_config()
        kind = type(create_backbone(**cfg.model.backbone_args(cfg.data.image_size)))
        variants = {"sweeps": ["eval.sweeps=true"], "table only": ["eval.sweeps=false"]}
        evaluation(run, kind, ["eval.sweeps=false"])  # warm-up: calibration.json, caches
        found: dict[str, list[dict[str, float]]] = {name: [] for name in variants}
        for _ in range(args.rounds):
            for name, overrides in variants.items():
                found[name].append(evaluation(run, kind, overrides))
        dm = build_datamodule(cfg)
        unseen = dm.unseen_dataloader("test")
        report = {
            "run": str(args.run)
            if args.run
            else f"trained: configs/default.yaml at K = {args.clusters}, one epoch a stage",
            "clusters": cfg.clustering.num_clusters,
            "test_faces": len(dm.test_dataloader().dataset),
            "unseen_test_faces": 0 if unseen is None else len(unseen.dataset),
            **{
                name: {
                    "seconds": statistics.median(r["seconds"] for r in rounds),
                    "scoring_seconds": statistics.median(r["scoring_seconds"] for r in rounds),
                    # counts: the same in every round
                    "network_images": rounds[0]["network_images"],
                    "scoring_network_images": rounds[0]["scoring_network_images"],
                    "seconds_each": [round(r["seconds"], 2) for r in rounds],
                }
                for name, rounds in found.items()
            },
            **measured(),
        }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
