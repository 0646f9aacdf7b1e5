"""The methods over several seeds on one experiment (LFW-423 by default), and
docs/RESULTS.md from them.

For every seed and every method (``clustered``, ``random``, ``single``, and any
``--variant``), trains ``OUT/<experiment>-<name>-s<seed>`` with ``train.py`` (the
experiment is named by its ``-c`` config files, ``lfw423`` by default; an interrupted
run is resumed, a finished one kept; either is refused if it was trained with another
method, seed or override than asked), evaluates it with ``evaluate.py`` (once), then
writes the aggregate: each row's mean and standard deviation over the seeds, and
the paired per-seed difference of the clustered default against the single model's
best row and against routed random, with a 95% t interval.

    python bench/results.py --seeds 42 43 44 --out runs/results

Writes ``bench/results/<experiment>.json`` and ``docs/RESULTS.md`` (``--render-only``:
from the json alone). The page's header states the settings every method shares,
from the experiment's resolved config (kept in the JSON); its prose comes from
``bench/results/<experiment>_intro.md`` (the data set, before the settings) and
``<experiment>_notes.md`` (the findings, after the tables), where they exist.
``--variant NAME:METHOD:KEY=VALUE,...`` adds a configuration,
e.g. ``--variant shared3:clustered:model.shared_layers=3``, on ``--variant-seeds``
or, with a suffix ``@42,43``, on those seeds.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

from facecluster.cli import exit_process
from facecluster.config import load_config
from facecluster.models.components.heads import default_margin
from facecluster.results import machine_name, source_digest
from facecluster.run import RunFolder, acting_config

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("clustered", "random", "single")
STAGES = ("stage1", "stage2")
T95 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179)
T95 += (2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086)
"""Two-sided 95% quantiles of Student's t for 1 to 20 degrees of freedom; beyond, the
one for 20 (a little wide, never narrow: the quantile falls with the degrees)."""


def parse_variant(text: str) -> tuple[str, str, list[str], list[int] | None]:
    """``NAME:METHOD:KEY=VALUE,...[@SEED,...]`` -> (name, method, overrides, seeds);
    seeds None: ``--variant-seeds``."""
    spec, at, seeds = text.rpartition("@") if "@" in text else (text, "", "")
    try:
        name, method, overrides = spec.split(":", 2)
        chosen = [int(s) for s in seeds.split(",")] if at else None
    except ValueError:
        raise SystemExit(
            f"--variant {text!r}: expected NAME:METHOD:KEY=VALUE,...[@SEED,...]"
        ) from None
    if method not in METHODS:
        raise SystemExit(f"--variant {text!r}: method {method!r} is not one of {METHODS}")
    return name, method, [o for o in overrides.split(",") if o], chosen


def _python(args: list[str], log: Path) -> None:
    with open(log, "a") as f:
        done = subprocess.run([sys.executable, *args], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:2])} failed (exit {done.returncode}); see {log}")


def experiment_name(configs: list[str]) -> str:
    """An experiment's name, from its config files: ``lfw423`` for
    ``configs/experiment/lfw423.yaml``; runs and results files carry it."""
    return "+".join(Path(c).stem for c in configs)


def setup(configs: list[str], overrides: list[str]) -> dict[str, Any]:
    """What every method of the experiment shares (the page's header), from its
    resolved config with the clustered method."""
    cfg = load_config([*configs, "configs/method/clustered.yaml"], overrides)
    return {
        "experiment": experiment_name(configs),
        "backbone": cfg.model.backbone,
        "width": dict(cfg.model.kwargs).get("width"),
        "image_size": cfg.data.image_size,
        "embedding_dim": cfg.model.embedding_dim,
        "head": cfg.head.name,
        "s": cfg.head.s,
        "m": cfg.head.m if cfg.head.m is not None else default_margin(cfg.head.name),
        "stage1_epochs": cfg.stage_epochs(1),
        "stage2_epochs": cfg.stage_epochs(2),
        "num_clusters": cfg.clustering.num_clusters,
    }


def train_and_evaluate(
    out: Path, name: str, method: str, seed: int, configs: list[str], overrides: list[str]
) -> Path:
    """One run, trained (or resumed) and evaluated unless that is done already."""
    run = out / f"{experiment_name(configs)}-{name}-s{seed}"
    log = out / f"{run.name}.log"
    if (run / "config.yaml").is_file():
        _check_kept(run, method, seed, configs, overrides)
    if not (run / "results.json").is_file():
        if (run / "config.yaml").is_file():  # interrupted: continue it
            args = [f"resume={run}"]
        else:
            args = [*(a for c in configs for a in ("-c", c)), "-c", f"configs/method/{method}.yaml"]
            args += [f"seed={seed}", f"output_dir={out}", f"run_name={run.name}", *overrides]
        # train.py ends by evaluating the run in the same process (eval/results.json):
        # one interpreter start per run, not two
        print(f"training {run.name}", flush=True)
        _python(["train.py", *args], log)
    evaluation = run / "eval" / "results.json"
    kept = json.loads(evaluation.read_text()) if evaluation.is_file() else {}
    if kept.get("overrides") != [] or kept.get("code") != source_digest():
        # none yet, or one another code made, or evaluate.py with overrides (another
        # top_m, decision, device...): every seed's figures from this code, as trained
        print(f"evaluating {run.name}", flush=True)
        _python(["evaluate.py", f"run={run}"], log)
    return run


def _check_kept(
    run: Path, method: str, seed: int, configs: list[str], overrides: list[str]
) -> None:
    """A run kept from an earlier call must have been trained as this call asks: every
    training setting the same, whether from an override or a config file (a variant
    whose overrides changed under the same name, or a dropped ``--set``, would
    otherwise be reported with the old runs)."""
    asked = load_config([*configs, f"configs/method/{method}.yaml"], [f"seed={seed}", *overrides])
    # as they act: a run that wrote ArcFace's head.m: 0.5 and a config that leaves it unset
    want, have = _flat(acting_config(asked)), _flat(acting_config(RunFolder(run).config()))
    # every training setting, whether given now or by a config file; not where the run
    # is, how it was launched or logged, or how it is evaluated
    for key in sorted(want.keys() | have.keys()):
        if key.split(".")[0] in NOT_TRAINING or key == "data.root":
            continue
        if want.get(key) != have.get(key):
            raise SystemExit(
                f"{run} was trained with {key}={have.get(key)!r}, this command asks for "
                f"{want.get(key)!r}: remove the folder or give the configuration another name"
            )


NOT_TRAINING = {"output_dir", "run_name", "resume", "stage", "logger", "wandb", "launcher",
                "slurm", "eval"}  # fmt: skip
"""Config sections a kept run may differ in (places, launch, logging, evaluation)."""


def _flat(values: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, dict) and value:
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _training_images(run: Path) -> dict[str, int]:
    """Images through a backbone in training (forward and backward), by stage."""
    results = json.loads((run / "results.json").read_text())
    folder = RunFolder(run)
    cfg = folder.finished_config()  # the run's own config loader
    batch = cfg.data.batch_size
    # steps x batch counts one process's optimizer steps of one batch each: what this
    # harness runs (one process, no accumulation); another run would be undercounted
    # by its accumulation and its process count
    many = {k: cfg.trainer.get(k, 1) for k in ("accumulate_grad_batches", "devices", "num_nodes")}
    if any(v not in (1, "1") for v in many.values()):
        settings = " ".join(f"trainer.{k}={v}" for k, v in many.items())
        raise ValueError(
            f"{run}: training images are counted for one process without gradient "
            f"accumulation, and this run has {settings}"
        )
    # stage 1's own batch where its record has it (runs trained since 2026-12-05): a
    # resume between the stages may have given stage 2 another data.batch_size
    stage1 = folder.stage_summary(1) if folder.has_stage_summary(1) else {}
    if stage1.get("world_size", 1) != 1:  # config.yaml holds the last command's devices
        raise ValueError(
            f"{run}: training images are counted for one process, and its stage 1 ran on "
            f"{stage1['world_size']}"
        )
    counts = {"stage1": results["stage1"]["steps"] * stage1.get("batch_size", batch)}
    if "subnets" in results:  # each stage-2 step takes a batch for every sub-net
        # its own: a cluster with fewer training images than a batch takes them all
        # (runs trained before the records said so: data.batch_size, an upper bound)
        records = folder.subnet_records()
        counts["stage2"] = sum(
            results["stage2_steps"] * records.get(k, {}).get("batch_size", batch)
            for k in range(results["num_clusters"])
        )
    return counts


def run_summary(run: Path) -> dict[str, Any]:
    """What the aggregate needs from one evaluated run."""
    evaluation = json.loads((run / "eval" / "results.json").read_text())
    rows = {
        r["model"]: {k: r[k] for k in ("top1", "f1", "routing_accuracy", "throughput")}
        for r in evaluation["rows"]
    }
    if not any(name.startswith(REFERENCE_ROWS) for name in rows):  # a StopIteration later
        raise SystemExit(
            f"{run / 'eval' / 'results.json'} has no row of the run's one network "
            f"({' or '.join(REFERENCE_ROWS)}), which its speeds are relative to: evaluate "
            f"it again (python evaluate.py run={run})"
        )
    return {
        "rows": rows,
        "top_m": {str(p["top_m"]): p["top1"] for p in evaluation["top_m_sweep"]},
        "decision": evaluation.get("decision", {}),
        "training_images": _training_images(run),
        "batch_size": evaluation["batch_size"],  # of the img/s column
        # where it trained: the same seed trains other weights on other kernels
        "trained_on": [
            made["machine"]
            for made in json.loads((run / "results.json").read_text()).get("trained_by", [])
        ],
    }


def trained_on_name(trained_on: list[dict[str, Any]] | None) -> str:
    """Where a run trained, in words (its ``results.json`` ``trained_by``): each machine
    its stages ran on."""
    if not trained_on:
        return "not recorded (runs trained before 2026-12-02)"
    return " and ".join(machine_name(machine) for machine in trained_on)


def machines(runs: dict[str, dict[Any, dict[str, Any]]]) -> list[str]:
    """The page's lines on where the runs trained: runs per machine, and the seeds whose
    runs trained on different machines (their paired differences mix the two)."""
    count: dict[str, int] = {}
    by_seed: dict[int, set[str]] = {}
    for by in runs.values():
        for seed, summary in by.items():
            name = trained_on_name(summary.get("trained_on"))
            count[name] = count.get(name, 0) + 1
            if summary.get("trained_on"):
                by_seed.setdefault(int(seed), set()).add(name)
    runs_on = [f"{name}: {n} run{'s' * (n > 1)}" for name, n in count.items()]
    lines = [f"Trained on: {'; '.join(runs_on)}."]
    mixed = [str(s) for s, names in sorted(by_seed.items()) if len(names) > 1]
    if mixed:
        seeds = f"Seeds {', '.join(mixed)} have" if len(mixed) > 1 else f"Seed {mixed[0]} has"
        lines.append(
            f"{seeds} runs trained on different machines: the paired differences on "
            f"{'them' if len(mixed) > 1 else 'it'} include the machines'."
        )
    return lines


def interval(values: list[float]) -> dict[str, float | None]:
    """Mean, standard deviation and 95% t interval of the mean; one value has neither
    (None: no spread is known, and JSON has no infinity)."""
    n = len(values)
    mean = statistics.fmean(values)
    if n < 2:
        return {"mean": mean, "sd": None, "low": None, "high": None, "n": n}
    sd = statistics.stdev(values)
    half = T95[min(n - 2, len(T95) - 1)] * sd / math.sqrt(n)
    return {"mean": mean, "sd": sd, "low": mean - half, "high": mean + half, "n": n}


def training_images(by_seed: dict[int, dict[str, Any]]) -> dict[str, Any]:
    """A configuration's training images, mean over its seeds (stage 2 differs by seed:
    the clusters' sizes do), with each seed's total."""
    counts = [summary["training_images"] for summary in by_seed.values()]
    mean = {part: round(sum(c.get(part, 0) for c in counts) / len(counts)) for part in STAGES}
    totals = {seed: sum(s["training_images"].values()) for seed, s in by_seed.items()}
    return {**mean, "total": sum(mean.values()), "total_per_seed": totals}


def routed_row(rows: dict[str, Any]) -> str:
    """The routed row at the run's route.top_m (the method's headline)."""
    return next(name for name in rows if ", routed (" in name)


def reference_row(rows: dict[str, Any]) -> str:
    """The run's one network over all identities: the stage-1 model of a two-stage run,
    the single model of a single run; the same architecture, timed in the same
    evaluation as the run's other rows."""
    return next(name for name in rows if name.startswith(REFERENCE_ROWS))


REFERENCE_ROWS = ("stage-1 model", "single model")


def relative_speed(rows: dict[str, Any], row: str) -> float:
    """``row``'s throughput over its run's :func:`reference_row`'s, both timed in one
    evaluation: the machine's speed, which drifts between runs by 3x here, cancels."""
    return rows[row]["throughput"] / rows[reference_row(rows)]["throughput"]


def aggregate(runs: dict[str, dict[int, dict[str, Any]]]) -> dict[str, Any]:
    """Per configuration: every row over its seeds; paired differences of each two-stage
    configuration's routed row against the single model's best row and routed random,
    over the seeds both have."""
    table: dict[str, dict[str, Any]] = {}
    for name, by_seed in runs.items():
        seeds = sorted(by_seed)
        rows = by_seed[seeds[0]]["rows"]
        table[name] = {
            row: {
                **{
                    metric: interval([by_seed[s]["rows"][row][metric] for s in seeds])
                    for metric in ("top1", "f1", "throughput")
                },
                "speed": interval([relative_speed(by_seed[s]["rows"], row) for s in seeds]),
            }
            for row in rows
        }
    single = runs["single"]
    best_single = max(table["single"], key=lambda row: table["single"][row]["top1"]["mean"])
    paired: dict[str, Any] = {}
    for name, by_seed in runs.items():
        if name == "single":
            continue
        own = sorted(by_seed)
        mine = routed_row(by_seed[own[0]]["rows"])
        against = {"single": (single, best_single, sorted(set(own) & set(single)))}
        if name != "random" and "random" in runs:
            other = runs["random"]
            row = routed_row(next(iter(other.values()))["rows"])
            against["random"] = (other, row, sorted(set(own) & set(other)))
        paired[name] = {
            "row": mine,
            "seeds": against["single"][2],
            # the values every seed's sweep scored (runs evaluated before the sweep
            # doubled have every top_m from 1 to K)
            "top_m": {
                m: interval([by_seed[s]["top_m"][m] for s in own])
                for m in sorted(set.intersection(*(set(by_seed[s]["top_m"]) for s in own)), key=int)
            },
            **{
                f"vs_{other}": {
                    "row": row,
                    "seeds": seeds,
                    **{
                        metric: interval(
                            [
                                by_seed[s]["rows"][mine][metric] - base[s]["rows"][row][metric]
                                for s in seeds
                            ]
                        )
                        for metric in ("top1", "f1")
                    },
                }
                for other, (base, row, seeds) in against.items()
                if seeds
            },
        }
    seeds = {name: sorted(by_seed) for name, by_seed in runs.items()}
    return {"seeds": seeds, "table": table, "paired": paired, "best_single": best_single}


def _pct(x: dict[str, float]) -> str:
    if x["n"] < 2:
        return f"{x['mean']:.2%} (one seed)"
    return f"{x['mean']:.2%} ± {x['sd']:.2%}"


def _diff(x: dict[str, float]) -> str:
    if x["n"] < 2:
        return f"{100 * x['mean']:+.2f} (one seed)"
    return f"{100 * x['mean']:+.2f} [{100 * x['low']:+.2f}, {100 * x['high']:+.2f}]"


def _times(x: dict[str, float]) -> str:
    if x["n"] < 2:
        return f"{x['mean']:.2f}x (one seed)"
    return f"{x['mean']:.2f}x ± {x['sd']:.2f}"


def render(result: dict[str, Any], command: str) -> str:
    """docs/RESULTS.md."""
    agg = result["aggregate"]
    seeds = ", ".join(str(s) for s in agg["seeds"]["single"])
    # summaries kept before the batch size was (bench/results/lfw423.json): the default
    batch = "/".join(
        sorted(
            {str(r.get("batch_size", 256)) for by in result["runs"].values() for r in by.values()}
        )
    )
    shared = result["setup"]
    lines = result.get("intro", "").rstrip().splitlines()
    lines = lines or [f"# Results: the methods over seeds ({shared['experiment']})"]
    width = f", base width {shared['width']}" if shared["width"] else ""
    size, epochs = shared["image_size"], (shared["stage1_epochs"], shared["stage2_epochs"])
    given = f" and `{' '.join(result['overrides'])}`" if result["overrides"] else ""
    configs = ", ".join(f"`{c}`" for c in result["configs"])
    sentence = (
        f"Same backbone (`{shared['backbone']}`{width}, {size}x{size} input, "
        f"{shared['embedding_dim']}-d embedding, `{shared['head']}` s={shared['s']:g} "
        f"m={shared['m']:g}) and settings for every method ({configs} with "
        f"`configs/method/{{clustered,random,single}}.yaml`{given}): stage 1 for "
        f"{epochs[0]} epochs, stage 2 for {epochs[1]}; `method=single` trains its one "
        f"network for all {sum(epochs)}. K={shared['num_clusters']} clusters. Seeds: {seeds}."
    )
    lines += ["", *textwrap.wrap(sentence, 86), ""]
    for line in machines(result["runs"]):
        lines += [*textwrap.wrap(line, 86), ""]
    variants = result.get("variants", {})
    if variants:
        lines += ["Variants (their name, then the method and the overrides):", ""]
        lines += [
            f"- `{name}`: {v['method']}, `{' '.join(v['overrides'])}`"
            for name, v in variants.items()
        ]
        lines.append("")
    lines += [
        "Command:",
        "",
        "```bash",
        command,
        "```",
        "",
        "It trains and evaluates every run it lacks (an interrupted run is resumed), then",
        f"writes `bench/results/{shared['experiment']}.json` and this page.",
        "",
        "## Every row, mean ± standard deviation over the seeds",
        "",
        f"| configuration | seeds | model | top-1 | macro F1 | img/s @{batch} "
        "| speed vs one network |",
        "|---|---:|---|---:|---:|---:|---:|",
    ]
    for name, rows in agg["table"].items():
        for row, m in rows.items():
            lines.append(
                f"| {name} | {m['top1']['n']} | {row} | {_pct(m['top1'])} | {_pct(m['f1'])} | "
                f"{m['throughput']['mean']:.0f} | {_times(m['speed'])} |"
            )
    alike = [
        by[reference_row(by)]["throughput"]
        for by in (r["rows"] for seeds in result["runs"].values() for r in seeds.values())
    ]
    caption = (
        "Throughput from the evaluation passes on this shared 2-core machine (one warm-up "
        "batch, three timed), each run in its own evaluation: the same network (the "
        "stage-1 model of a two-stage run and the single model are one backbone with one "
        f"head over every identity) was timed at {min(alike):.0f} to {max(alike):.0f} img/s "
        "across these runs, so the img/s of two configurations do not compare. Compare "
        "methods by the last column: each row's throughput over that of its own run's one "
        "network (the stage-1 model, or the single model), timed in the same evaluation, "
        "mean ± standard deviation over the seeds."
    )
    lines += [
        "",
        *textwrap.wrap(caption, 86),
        "",
        "## The clustered method against the baselines, paired by seed",
        "",
        "Differences in points, mean [95% t interval over the seeds], each seed's run against",
        f"the same seed's; the single model's best row is `{agg['best_single']}`.",
        "",
        "| configuration | seeds | routed row | top-1 vs single | F1 vs single "
        "| top-1 vs routed random | F1 vs routed random | top_m=1 | top_m=2 |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for name, p in agg["paired"].items():
        # a variant whose seeds the single model (or random) lacks has no paired cells
        vs_single, vs_random = p.get("vs_single"), p.get("vs_random")
        lines.append(
            f"| {name} | {len(p['seeds'])} | {p['row']} | "
            + (
                f"{_diff(vs_single['top1'])} | {_diff(vs_single['f1'])} | "
                if vs_single
                else "no common seed | no common seed | "
            )
            + (f"{_diff(vs_random['top1'])} | {_diff(vs_random['f1'])}" if vs_random else " | ")
            + f" | {p['top_m']['1']['mean']:.2%} | {p['top_m']['2']['mean']:.2%} |"
        )
    lines += ["", "## Training compute", ""]
    lines += [
        "Counted as training images through a backbone (forward and backward), from each",
        "run's steps: stage 1 steps x batch, stage 2 steps x each sub-net's batch, summed over",
        "the K sub-nets (every step takes a batch for each sub-net: `data.batch_size`, or all",
        "the training images of a smaller cluster, as each sub-net's record says in runs",
        "trained since 2026-12-05, where older runs count a whole batch; with",
        "`stage2.epoch_size=largest`, the default, smaller clusters cycle, so stage 2 differs",
        "by seed with the largest cluster). Means over the seeds, and each seed's total. The",
        "class-mean pass (one forward over the training split) and, at test time, the router's",
        "backbone are not in it.",
        "",
        "| configuration | stage 1 | stage 2 | total | total per seed |",
        "|---|---:|---:|---:|---|",
    ]
    # from the runs, not result["training_images"]: a JSON of an older harness renders too
    for name, by_seed in result["runs"].items():
        counts = training_images(by_seed)
        per_seed = ", ".join(f"{t:,}" for t in counts["total_per_seed"].values())
        lines.append(
            f"| {name} | {counts['stage1']:,} | {counts['stage2']:,} | {counts['total']:,} "
            f"| {per_seed} |"
        )
    lines += ["", result.get("notes", "").rstrip(), ""]
    return "\n".join(lines)


def page_path(json_path: str | None, page: str | None) -> Path:
    """Where the page goes (relative paths are the project root's): ``page``, else
    beside a ``--json`` of one's own (a trial rewrote docs/RESULTS.md), else the
    project's docs/RESULTS.md."""
    if page is not None:
        return Path(page)
    return Path("docs/RESULTS.md") if json_path is None else Path(json_path).with_suffix(".md")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[42, 43, 44])
    parser.add_argument("--out", default="runs/results")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--variant", action="append", default=[], type=parse_variant)
    parser.add_argument(
        "--variant-seeds", type=int, nargs="+", default=None, help="default: --seeds"
    )
    parser.add_argument("-c", "--config", action="append", default=None, help="experiment configs")
    parser.add_argument("--set", nargs="*", default=[], help="overrides for every run")
    parser.add_argument("--json", default=None, help="bench/results/<experiment>.json")
    parser.add_argument(
        "--page",
        default=None,
        help="default: docs/RESULTS.md, or beside --json (as .md) when --json is given",
    )
    parser.add_argument(
        "--intro", default=None, help="the page's opening (bench/results/<experiment>_intro.md)"
    )
    parser.add_argument(
        "--notes", default=None, help="appended to the page (bench/results/<experiment>_notes.md)"
    )
    parser.add_argument("--render-only", action="store_true")
    args = parser.parse_args()
    configs = args.config or ["configs/experiment/lfw423.yaml"]
    experiment = experiment_name(configs)
    json_path = ROOT / (args.json or f"bench/results/{experiment}.json")
    page = ROOT / page_path(args.json, args.page)
    command = "python " + " ".join(["bench/results.py", *sys.argv[1:]])
    if args.render_only:  # the page (and the JSON's aggregate) again from the runs kept
        result = json.loads(json_path.read_text())
        runs = {name: {int(s): v for s, v in by.items()} for name, by in result["runs"].items()}
        result["aggregate"] = aggregate(runs)  # seeds as numbers, as a training call gives
        result.setdefault("setup", setup(result["configs"], result["overrides"]))
        json_path.write_text(json.dumps(result, indent=2, allow_nan=False))
    else:
        if "single" not in args.methods:
            raise SystemExit("--methods must include single: every difference is against it")
        out = (ROOT / args.out).resolve()
        out.mkdir(parents=True, exist_ok=True)
        variant_seeds = args.variant_seeds or args.seeds
        plan = [(m, m, [], args.seeds) for m in args.methods]
        plan += [(n, m, o, seeds or variant_seeds) for n, m, o, seeds in args.variant]
        for name, method, overrides, _ in plan:  # the page reports the top_m sweep
            if not load_config(
                [*configs, f"configs/method/{method}.yaml"], [*args.set, *overrides]
            ).eval.sweeps:
                raise SystemExit(f"{name}: eval.sweeps=false; the page reports the top_m sweep")
        runs: dict[str, dict[int, dict[str, Any]]] = {name: {} for name, *_ in plan}
        for seed in sorted({s for *_, seeds in plan for s in seeds}):
            for name, method, overrides, seeds in plan:
                if seed not in seeds:
                    continue
                run = train_and_evaluate(out, name, method, seed, configs, [*args.set, *overrides])
                runs[name][seed] = run_summary(run)
        result = {
            "command": command,
            "configs": configs,
            "overrides": args.set,
            "setup": setup(configs, args.set),
            "variants": {name: {"method": m, "overrides": o} for name, m, o, _ in args.variant},
            "runs": runs,
            "training_images": {name: training_images(by_seed) for name, by_seed in runs.items()},
            "aggregate": aggregate(runs),
        }
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(result, indent=2, allow_nan=False))
    for part, given in (("intro", args.intro), ("notes", args.notes)):
        text = ROOT / (given or f"bench/results/{experiment}_{part}.md")
        result[part] = text.read_text() if text.is_file() else ""
    page.write_text(render(result, result["command"]))
    print(f"wrote {json_path} and {page}")


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
