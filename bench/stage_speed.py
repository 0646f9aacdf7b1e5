"""Images/s of each training stage and peak device memory, through the real pipeline.

Trains a run with ``facecluster.pipeline.train`` (config file plus overrides, as
train.py takes them) and a callback that counts the images of every training step
after the first ``--skip`` of each stage and the seconds they took (loader
included, validation and checkpointing not), and reads the peak memory the
device allocated in each stage. Then evaluates the run (routed, ISM, single
rows: their images/s are the inference figures).

    python bench/stage_speed.py -c configs/smoke.yaml data.root=../shared/datasets/lfw-112/images

Writes --out (JSON).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import lightning as L
import torch

from facecluster.cli import at_least, exit_process, output_file
from facecluster.config import ConfigError, load_config
from facecluster.evaluation import evaluate_run
from facecluster.pipeline import train
from facecluster.results import measured

ROOT = Path(__file__).resolve().parents[1]


class StageSpeed(L.Callback):
    """Training images/s and peak device memory of each stage."""

    def __init__(self, skip: int) -> None:
        self.skip, self.stages, self.device = skip, {}, None

    def on_train_start(self, trainer, pl_module) -> None:
        batches = trainer.estimated_stepping_batches * trainer.accumulate_grad_batches
        if batches <= self.skip:  # refused now, not after both stages and the evaluation
            raise ConfigError(
                f"stage {pl_module.stage} has {batches} steps, all within --skip "
                f"{self.skip}: nothing would be timed; use a smaller --skip or more steps"
            )
        self.images, self.seconds, self.steps, self.last = 0, 0.0, 0, None
        self.device = pl_module.device  # the machine's record names its GPU
        if pl_module.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(pl_module.device)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.last is None:
            self.last = time.perf_counter()  # from here to the next step's start

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if pl_module.device.type == "cuda":
            torch.cuda.synchronize(pl_module.device)
        now = time.perf_counter()
        self.steps += 1
        if self.steps > self.skip:
            parts = batch.values() if isinstance(batch, dict) else [batch]
            self.images += sum(len(b[1]) for b in parts)
            self.seconds += now - self.last
        self.last = now

    def on_validation_start(self, trainer, pl_module) -> None:
        self.last = None  # validation is not training time

    def unmeasured(self) -> list[str]:
        """The stages whose every step fell within ``--skip``: no speed measured."""
        return [
            f"{stage} ran {figures['steps']} steps, all within --skip {self.skip}: its "
            "images_per_s is null; use a smaller --skip or more steps"
            for stage, figures in self.stages.items()
            if figures["images_per_s"] is None
        ]

    def on_train_end(self, trainer, pl_module) -> None:
        cuda = pl_module.device.type == "cuda"
        self.stages[f"stage{pl_module.stage}"] = {
            "images_per_s": self.images / self.seconds if self.seconds else None,
            "steps": self.steps,
            "timed_steps": max(0, self.steps - self.skip),
            "peak_memory_gb": torch.cuda.max_memory_allocated(pl_module.device) / 2**30
            if cuda
            else None,
        }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-c", "--config", action="append", default=[])
    parser.add_argument("--skip", type=at_least(0), default=2, help="untimed first steps per stage")
    parser.add_argument("--out", type=output_file, default="bench/results/stage_speed.json")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_intermixed_args(argv)  # overrides after options too, as train.py
    try:  # the config's and the data's refusals in one line, as train.py says them
        cfg = load_config(args.config or [ROOT / "configs" / "default.yaml"], args.overrides)
    except ConfigError as e:
        parser.error(str(e))
    speed = StageSpeed(args.skip)
    try:
        result = train(cfg, callbacks=[speed])
    except ConfigError as e:
        parser.error(str(e))
    report = evaluate_run(result.run_dir)
    out = {
        "config": args.config,
        "overrides": args.overrides,
        **speed.stages,
        "inference": {r.model: {"images_per_s": r.throughput, "ms_at_1": r.latency_ms,
                                "spread": r.throughput_spread} for r in report.rows},
        **measured(speed.device),
    }  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out, indent=2))
    if unmeasured := speed.unmeasured():  # written all the same: the inference figures
        parser.exit(1, "".join(f"{parser.prog}: error: {m}\n" for m in unmeasured))
    return out


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
