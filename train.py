"""Train the two-stage clustered face-identification method.

    python train.py                                   # the bundled demo (configs/default.yaml)
    python train.py -c configs/smoke.yaml             # both stages in about a minute
    python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml
    python train.py data.root=/data/faces clustering.num_clusters=8 trainer.max_epochs=20
    python train.py resume=runs/<run>                 # continue an interrupted run

Any config key can be overridden as key=value (see docs/CONFIG.md).
"""

from __future__ import annotations

import argparse
import sys

from facecluster.config import PROJECT_ROOT, ConfigError, load_config
from facecluster.evaluation import evaluate_runs
from facecluster.pipeline import train
from facecluster.run import RunFolder, is_global_zero

DEFAULT_CONFIG = PROJECT_ROOT / "configs" / "default.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 1)[1],
    )
    parser.add_argument(
        "-c",
        "--config",
        action="append",
        help="YAML file, only what differs from the schema; repeat to merge several "
        f"(default: {DEFAULT_CONFIG.relative_to(DEFAULT_CONFIG.parents[1])})",
    )
    parser.add_argument("overrides", nargs="*", help="key=value overrides")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config or [DEFAULT_CONFIG], args.overrides)
        if cfg.resume:
            cfg = RunFolder.config_for_resume(cfg.resume, args.overrides)
        result = train(cfg)
        # Every DDP rank trains; the evaluation runs once, in global rank 0 alone.
        if is_global_zero() and cfg.eval.after_training:
            print("\nEvaluation on the held-out test split (docs/EVALUATION.md):")
            print(evaluate_runs([result.run_dir]))
            print(f"\nfacecluster run folder: {result.run_dir}")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
