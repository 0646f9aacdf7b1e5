"""Every command in the README's and docs' ``bash`` blocks, and in their prose (an inline
code span that starts as a command does), and what runs it.

``COMMANDS`` maps each one (``.venv/bin/`` dropped, comments cut, continuation lines
joined) to the test that runs it as written, to the test that runs it with its
placeholders filled in or its data set replaced, to the reason the suite leaves it
out (it trains for many minutes, needs GPUs, a cluster or a data set that is not
here), or, for a command only named in prose, to its full form: a documented command
cannot be added without a line here, and a line here cannot outlive its command or its
test.
"""

from __future__ import annotations

import ast
import csv
import os
import re

import pytest

from facecluster.run import RunFolder
from tests.conftest import ROOT, run_documented

RUN = "run as written"
FILLED = "run with its placeholders or data set filled in"
LEFT_OUT = "not run by the suite"
NAME = "a command named in prose (no arguments, or a flag alone): its runs are its full form's"

SMOKE_COMMAND = "python train.py -c configs/smoke.yaml"
LONG = "trains the demo for 7-14 minutes on 2 cores: run by hand (the time in README.md)"
LFW423 = "trains LFW-423 for about 10 minutes a method: run by bench/results.py by hand"
FULL_SIZE = "IResNet-50 on MS1MV3/Glint360K on GPUs: a data set and GPUs that are not here"
CLUSTER = "needs a SLURM cluster or several nodes; tests/test_jobs.py runs its parts on one"
BENCH = "a benchmark of minutes that rewrites its committed results; run by hand"
EXPORT = "facecluster export runs/<run> exports/demo --onnx"
PACK = "facecluster pack ../shared/datasets/lfw-112/images /data/lfw-rec"

COMMANDS: dict[str, tuple[str, str]] = {
    "make train": (LEFT_OUT, LONG),
    "python train.py head.name=adaface": (
        LEFT_OUT,
        LONG + "; tests/test_modules.py::test_adaface_trains_both_stages_and_checkpoints_"
        "keep_its_norm_statistics trains AdaFace on the smoke config",
    ),
    "python train.py imports=[mynets] model.backbone=mynet": (
        FILLED,  # the smoke config, a module of the test's, two stage-2 jobs
        "tests/test_backbones.py::test_a_backbone_of_ones_own_trains_in_jobs_evaluates_and_"
        "identifies",
    ),
    "python train.py imports=[myheads] head.name=combined head.kwargs.c=0.25": (
        FILLED,  # the smoke config, the page's module, both stages, export, identify
        "tests/test_modules.py::test_a_margin_head_of_ones_own_trains_both_stages_and_its_"
        "export_needs_no_import",
    ),
    "make test": (RUN, ".ci/run"),
    "python train.py stage1.max_epochs=-1": (
        RUN,
        "tests/test_config.py::test_a_config_mistake_or_a_mistyped_run_is_named_before_"
        "torch_is_imported",
    ),
    "python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml "
    "--print-config": (RUN, "tests/test_config.py::test_print_config_shows_the_resolved_config"),
    "python bench/subnet_memory.py --out bench/results/subnet_memory.json": (
        LEFT_OUT,
        BENCH + " (tests/test_performance.py runs it at toy size)",
    ),
    "python train.py": (LEFT_OUT, LONG + " (= make train)"),
    SMOKE_COMMAND: (RUN, "tests/test_docs.py::test_the_readme_smoke_command_as_written"),
    "python train.py data.root=/data/faces clustering.num_clusters=8 stage1.max_epochs=20": (
        LEFT_OUT,
        "/data/faces is the reader's own data; its config is loaded by "
        "tests/test_config.py::test_documented_train_commands_make_valid_configs",
    ),
    "python train.py -c configs/smoke.yaml trainer.accelerator=cpu trainer.devices=2 "
    "trainer.strategy=ddp": (
        RUN,
        "tests/test_ddp.py::test_documented_multi_device_command_runs_train_py_to_its_last_line",
    ),
    "python train.py -c configs/insightface_r50.yaml data.root=/data/ms1m-retinaface-t1 "
    "trainer.devices=4": (LEFT_OUT, FULL_SIZE),
    "python train.py resume=runs/20261128-101500-clustered": (
        FILLED,  # train.py resume=<the killed run's folder>, as a subprocess
        "tests/faults/test_faults_kill.py::"
        "test_kill_9_after_an_epoch_checkpoint_then_resume_equals_uninterrupted",
    ),
    "python train.py -c configs/smoke.yaml launcher=local stage2.jobs=2": (
        FILLED,  # with logger=csv, for the table it compares
        "tests/test_jobs.py::test_documented_two_local_jobs_give_the_one_job_weights_and_table",
    ),
    "python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml": (
        LEFT_OUT,
        LFW423,
    ),
    "python train.py -c configs/experiment/lfw423.yaml -c configs/method/random.yaml seed=42 "
    "output_dir=runs/results run_name=lfw423-random-s42": (
        LEFT_OUT,
        LFW423,
    ),
    "python evaluate.py run=runs/<a> run=runs/<b>": (
        FILLED,
        "tests/test_pipeline.py::test_the_ism_baseline_trains_a_random_partition_and_every_"
        "subnet_answers",
    ),
    EXPORT: (
        FILLED,
        "tests/test_deploy.py::exported",
    ),
    "facecluster identify exports/demo datasets/lfw-demo/images/<identity> --out who.csv": (
        FILLED,
        "tests/test_deploy.py::test_documented_identify_answers_unknown_for_unseen_identities",
    ),
    "facecluster ijb exports/demo IJB_release/IJBC": (
        RUN,
        "tests/test_deploy.py::test_documented_ijb_command_reports_tar_at_each_far_of_the_"
        "exports_backbone",
    ),
    "facecluster ijb ms1mv3_arcface_mbf/backbone.pth IJB_release/IJBC --backbone mbf": (
        RUN,
        "tests/test_deploy.py::test_documented_ijb_command_reports_tar_at_each_far_of_the_"
        "exports_backbone",
    ),
    "facecluster ijb exports/demo IJB_release/IJBC --protocol 1:1 1:N --out both.json": (
        RUN,
        "tests/test_deploy.py::test_documented_ijb_command_reports_tar_at_each_far_of_the_"
        "exports_backbone",
    ),
    "facecluster enroll exports/demo new_people/": (
        FILLED,
        "tests/test_deploy.py::test_enrolling_new_identities_without_retraining",
    ),
    "python train.py -c configs/smoke.yaml data.root=/data/faces clustering.num_clusters=8 "
    "trainer.max_epochs=3": (
        LEFT_OUT,
        "/data/faces is the reader's own data; its config is loaded by "
        "tests/test_config.py::test_documented_train_commands_make_valid_configs",
    ),
    "python train.py -c configs/insightface_r50.yaml "
    "data.root=/data/ms1m-retinaface-t1/train.rec": (LEFT_OUT, FULL_SIZE),
    "python train.py -c configs/insightface_r50.yaml data.root=/data/glint360k "
    "clustering.num_clusters=64 head.sample_rate=0.1": (LEFT_OUT, FULL_SIZE),
    "python train.py -c configs/insightface_r50.yaml data.root=/data/faces "
    "model.weights=/models/ms1mv3_arcface_r50/backbone.pth": (
        LEFT_OUT,
        "the reader's data and arcface_torch's released weights (no download here); "
        "tests/test_pipeline.py::test_stage1_starts_from_the_backbone_weights_model_weights_"
        "names trains stage 1 from a weights file",
    ),
    "python train.py -c configs/insightface_r50.yaml data.root=/data/faces model.backbone=mbf "
    "stage1.optim.weight_decay=1e-4 stage2.optim.weight_decay=1e-4": (
        LEFT_OUT,
        FULL_SIZE + "; its config is loaded by "
        "tests/test_config.py::test_documented_train_commands_make_valid_configs",
    ),
    "python bench/sample_index.py": (
        LEFT_OUT,
        BENCH + "; tests/test_performance.py runs it small",
    ),
    PACK: (
        FILLED,
        "tests/test_recordio.py::test_documented_pack_then_train_commands",
    ),
    "python train.py -c configs/smoke.yaml data.root=/data/lfw-rec/train.rec": (
        FILLED,
        "tests/test_recordio.py::test_documented_pack_then_train_commands",
    ),
    "python bench/data_throughput.py --root ../shared/datasets/lfw-112/images": (
        LEFT_OUT,
        BENCH + "; bench/gpu.sh --dry-run runs it small",
    ),
    "python bench/routing_throughput.py --width 16 --image-size 64 --embedding-dim 256 "
    "--identities 423 --shared-layers 0 2 3 4 --repeats 7 --out "
    "bench/results/routing_shared.json": (
        LEFT_OUT,
        BENCH + "; tests/test_performance.py runs it small",
    ),
    "python train.py -c configs/default.yaml -c configs/method/random.yaml": (LEFT_OUT, LONG),
    "python train.py -c configs/experiment/lfw423.yaml -c configs/method/single.yaml": (
        LEFT_OUT,
        LFW423,
    ),
    "python evaluate.py run=runs/<run> [run=runs/<other> ...] [data.root=...] [route.top_m=2] "
    "[eval.batch_size=128]": (LEFT_OUT, "a synopsis, its parts in the other evaluate.py lines"),
    'python train.py -c configs/smoke.yaml "data.verification=[../shared/datasets/lfw-112/'
    'pairs.txt]"': (
        FILLED,  # with eval.after_training=false: evaluate.py, next, evaluates the run
        "tests/test_verification.py::test_documented_verification_commands",
    ),
    'python evaluate.py run=runs/<run> "data.verification=[../shared/datasets/lfw-112/'
    'pairs.txt]"': (FILLED, "tests/test_verification.py::test_documented_verification_commands"),
    "python bench/enrollment.py --enrolled runs/<open run> --full runs/demo-all": (
        FILLED,
        "tests/test_deploy.py::test_open_set_and_enrolment_benchmarks_run",
    ),
    "python bench/routing_throughput.py --width 8 --image-size 32 --identities 1000000 "
    "--batch 64 --shared-layers 0 --out bench/results/routing_1m.json": (
        LEFT_OUT,
        BENCH + " (13 GB of memory); tests/test_performance.py runs the script small",
    ),
    "python bench/routing_throughput.py": (
        LEFT_OUT,
        BENCH + "; tests/test_performance.py runs it small",
    ),
    "python bench/train_overhead.py": (LEFT_OUT, BENCH),
    "python bench/eval_cost.py --out bench/results/eval_cost.json": (
        LEFT_OUT,
        BENCH + "; tests/test_inference.py::test_the_evaluation_cost_benchmark_runs_on_a_"
        "finished_run runs it on the smoke run",
    ),
    "python train.py stage1.max_epochs=2 stage2.max_epochs=1 logger=none eval.plots=false "
    "model.compile=false": (LEFT_OUT, LONG),
    "python train.py stage1.max_epochs=2 stage2.max_epochs=1 logger=none eval.plots=false "
    "model.compile=true": (LEFT_OUT, LONG),
    "bash bench/gpu.sh": (LEFT_OUT, "needs a GPU"),
    "bash bench/gpu.sh --dry-run": (
        FILLED,
        "tests/test_performance.py::test_gpu_script_dry_run_writes_every_figure",
    ),
    "python bench/results.py --seeds 42 43 44 --out runs/results": (
        LEFT_OUT,
        LFW423 + "; tests/test_performance.py runs the harness on the smoke config",
    ),
    "python bench/scale.py": (LEFT_OUT, BENCH + "; tests/test_performance.py runs parts small"),
    "python train.py -c configs/experiment/lfw423.yaml launcher=slurm stage2.jobs=4": (
        LEFT_OUT,
        CLUSTER,
    ),
    "torchrun --nnodes=2 --nproc_per_node=8": (
        LEFT_OUT,
        CLUSTER + "; tests/test_jobs.py::test_documented_two_node_torchrun_form_trains_one_run_"
        "on_one_machine runs it as two torchrun agents on one machine",
    ),
    "srun --ntasks-per-node=8 python train.py": (LEFT_OUT, CLUSTER),
    "python train.py resume=/shared/runs/ms1mv3 launcher=slurm stage2.jobs=8": (
        LEFT_OUT,
        CLUSTER,
    ),
    "torchrun --standalone --nproc_per_node=2 train.py -c configs/smoke.yaml run_name=torchrun "
    "stage=1 trainer.accelerator=cpu trainer.devices=2 trainer.strategy=ddp": (
        RUN,
        "tests/test_jobs.py::test_documented_torchrun_stage1_writes_one_run_folder",
    ),
    # inline in the prose
    "facecluster --help": (RUN, "tests/test_deploy.py::test_the_console_script_lists_its_commands"),
    "facecluster <command> --help": (
        FILLED,
        "tests/test_deploy.py::test_every_command_has_help_with_an_example",
    ),
    "facecluster train": (NAME, "python train.py"),
    "facecluster evaluate": (NAME, "python evaluate.py run=runs/<a> run=runs/<b>"),
    "facecluster export": (NAME, EXPORT),
    "facecluster export --fpir": (NAME, "facecluster export --fpir 0.01"),
    "facecluster identify": (
        NAME,
        "facecluster identify exports/demo datasets/lfw-demo/images/<identity> --out who.csv",
    ),
    "facecluster ijb": (NAME, "facecluster ijb exports/demo IJB_release/IJBC"),
    "facecluster ijb EXPORT RELEASE": (
        FILLED,
        "tests/test_deploy.py::test_documented_ijb_command_reports_tar_at_each_far_of_the_"
        "exports_backbone",
    ),
    "facecluster ijb OUT <release>": (
        FILLED,
        "tests/test_deploy.py::test_documented_ijb_command_reports_tar_at_each_far_of_the_"
        "exports_backbone",
    ),
    "facecluster pack": (NAME, PACK),
    "facecluster pack --shuffle": (
        FILLED,  # of the demo set, by pack's own entry point
        "tests/test_recordio.py::packed",
    ),
    "facecluster pack SRC OUT --overwrite": (
        FILLED,
        "tests/test_recordio.py::test_a_pack_stopped_by_sigterm_leaves_out_as_it_was",
    ),
    "python -m facecluster.data.pack SRC OUT": (
        FILLED,
        "tests/test_recordio.py::test_documented_pack_then_train_commands",
    ),
    "facecluster export RUN OUT": (FILLED, "tests/test_deploy.py::exported"),
    "facecluster train -c configs/smoke.yaml data.root=<your faces>": (
        FILLED,  # from the wheel, unpacked, with 6 of the demo's identities
        "tests/test_packaging.py::test_an_installed_package_reads_its_configs_and_says_where_"
        "the_demo_is",
    ),
    "facecluster export --fpir 0.01": (
        FILLED,  # --fpir 0.2, against the default 0.01's export
        "tests/test_deploy.py::test_export_fpir_sets_the_share_of_unseen_faces_the_threshold_"
        "lets_pass",
    ),
    "facecluster identify MODEL IMAGES... --out who.csv": (
        FILLED,
        "tests/test_deploy.py::test_documented_identify_answers_unknown_for_unseen_identities",
    ),
    "make install": (RUN, ".ci/run"),
    "make help": (RUN, "tests/test_docs.py::test_make_help_lists_every_target"),
    "python train.py resume=<run folder>": (
        FILLED,
        "tests/faults/test_faults_kill.py::"
        "test_kill_9_after_an_epoch_checkpoint_then_resume_equals_uninterrupted",
    ),
    "python train.py resume=RUN": (
        FILLED,
        "tests/faults/test_faults_kill.py::"
        "test_kill_9_after_an_epoch_checkpoint_then_resume_equals_uninterrupted",
    ),
    "python train.py [-c CONFIG] [key=value ...]": (LEFT_OUT, "a synopsis"),
    "python evaluate.py run=runs/<run>": (
        FILLED,
        "tests/test_pipeline.py::test_the_ism_baseline_trains_a_random_partition_and_every_"
        "subnet_answers",
    ),
    "torchrun --nproc_per_node=2 evaluate.py run=runs/<run>": (
        FILLED,  # two runs, a clustered open-set one and a single model
        "tests/test_ddp.py::test_torchrun_evaluates_runs_over_two_processes_with_the_"
        "figures_of_one",
    ),
    "python evaluate.py": (NAME, "python evaluate.py run=runs/<run>"),
    "python evaluate.py run=<run>": (
        FILLED,
        "tests/test_pipeline.py::test_the_ism_baseline_trains_a_random_partition_and_every_"
        "subnet_answers",
    ),
    "python train.py run_name=demo-all data.unseen_fraction=0": (LEFT_OUT, LONG),
    "python bench/open_set.py --run runs/<run> --export exports/demo": (
        FILLED,
        "tests/test_deploy.py::test_open_set_and_enrolment_benchmarks_run",
    ),
    "python bench/sample_index.py --layout im2rec --out bench/results/sample_index_im2rec.json": (
        FILLED,  # small, its --out a temporary file
        "tests/test_performance.py::test_sample_index_benchmark_measures_setup_and_a_forked_"
        "workers_copy",
    ),
    "python bench/sample_index.py --first-key 33554433 --out bench/results/index_past_2p24.json": (
        FILLED,
        "tests/test_performance.py::test_sample_index_benchmark_measures_setup_and_a_forked_"
        "workers_copy",
    ),
    "python bench/sample_index.py --images 2062000 --identities 100000 --out "
    "/tmp/sample_index_webface.json": (
        LEFT_OUT,
        BENCH + "; tests/test_performance.py runs it small",
    ),
    "python bench/sample_index.py --images 8400000 --identities 400000 --out "
    "/tmp/sample_index_8m.json": (
        LEFT_OUT,
        BENCH + "; tests/test_performance.py runs it small",
    ),
    "python bench/scale.py --part lfw": (
        LEFT_OUT,
        LFW423 + " per sample rate; tests/test_performance.py runs the other parts small",
    ),
    "python train.py -c configs/insightface_r50.yaml data.root=datasets/lfw-demo/images "
    "data.max_classes=12 data.batch_size=16 data.num_workers=1 trainer.accelerator=cpu "
    "stage1.max_epochs=1 stage2.max_epochs=1 clustering.num_clusters=3 logger=csv "
    "trainer.limit_train_batches=3 eval.timing_batches=1": (
        LEFT_OUT,
        "IResNet-50 through both stages on 2 CPU cores: 19.5 minutes (DATA.md); "
        "tests/test_config.py loads the preset",
    ),
    "python -m pytest -m faults tests": (
        LEFT_OUT,
        "the fault suite: make test runs these tests among the others",
    ),
    "python -m pytest -m faults tests -q --durations=14": (
        LEFT_OUT,
        "the fault suite: make test runs these tests among the others",
    ),
}
"""Documented command (or, for one of ``PREFIXES``, its start) -> (status, test or reason)."""

PREFIXES = {
    "python bench/results.py --seeds 42 43 44 --out runs/results",
    "python train.py -c configs/experiment/lfw423.yaml launcher=slurm stage2.jobs=4",
    "torchrun --nnodes=2 --nproc_per_node=8",
    "srun --ntasks-per-node=8 python train.py",
}
"""Keys that stand for the long documented commands they start (all left out)."""


COMMAND = r"(?:\.venv/bin/)?(?:python|facecluster|bash|torchrun|srun|make) "
"""How a command starts: what every command of the bash blocks starts with."""


def documented_commands() -> list[tuple[str, str]]:
    """``(page, command)`` for every line of the README's and docs' ``bash`` blocks, every
    line of their other fenced blocks and every inline code span that starts as a
    command does (:data:`COMMAND`)."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    found = []
    for page in pages:
        text = page.read_text()
        lines = []
        for language, block in re.findall(r"```([a-z]*)\n(.*?)```", text, re.S):
            block = block.replace("\\\n", " ").splitlines()
            lines += block if language == "bash" else [b for b in block if re.match(COMMAND, b)]
        prose = " ".join(re.sub(r"```.*?```", "", text, flags=re.S).split())  # spans may wrap
        lines += re.findall(rf"(?<!`)`({COMMAND}[^`]*)`", prose)
        for line in lines:
            line = re.sub(r"(^|\s+)#.*$", "", line.strip())
            if line:
                found.append((page.name, " ".join(line.split()).replace(".venv/bin/", "")))
    return found


def _entry(command: str) -> str | None:
    """The ``COMMANDS`` key of a documented command: itself, or the one of ``PREFIXES``
    that it starts with. Any other command is unlisted, however it starts."""
    if command in COMMANDS:
        return command
    starts = [key for key in PREFIXES if command.startswith(key + " ")]
    return starts[0] if len(starts) == 1 else None


def _strings(path) -> set[str]:
    """The string constants of a Python file, whitespace collapsed."""
    tree = ast.parse(path.read_text())
    return {
        " ".join(node.value.split())
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str)
    }


def test_every_documented_command_is_run_or_says_why_not():
    commands = documented_commands()
    assert len(commands) >= 40, commands
    assert all(COMMANDS[key][0] == LEFT_OUT for key in PREFIXES)  # never "as written"
    # a new line is unlisted, even one that starts as a listed command does
    assert _entry(SMOKE_COMMAND + " data.root=/data/mine") is None
    assert _entry("python train.py --new-flag") is None
    unlisted = [f"{page}: {command}" for page, command in commands if _entry(command) is None]
    assert not unlisted, "add them to tests/test_docs.py COMMANDS:\n" + "\n".join(unlisted)
    stale = set(COMMANDS) - {_entry(command) for _, command in commands}
    assert not stale, f"no longer documented: {sorted(stale)}"
    defined = {}  # test file -> its test functions
    for command, (status, where) in COMMANDS.items():
        assert status in (RUN, FILLED, LEFT_OUT, NAME), status
        if status == NAME:  # its full form is documented and listed
            assert where in COMMANDS and COMMANDS[where][0] != NAME, (command, where)
            continue
        if status == LEFT_OUT or "::" not in where:
            continue
        path, name = where.split("::")
        if path not in defined:
            tree = ast.parse((ROOT / path).read_text())
            defined[path] = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert name in defined[path], f"{where} does not exist"
        if status == RUN:  # the test holds the command itself, as documented
            assert command in _strings(ROOT / path), f"{where} does not hold {command!r}"
    assert os.access(ROOT / ".ci" / "run", os.R_OK)  # `make test`'s runner


@pytest.mark.slow
def test_the_readme_smoke_command_as_written(tmp_path):
    # README's first command after `make train`, as written, in a folder of its own:
    # both stages, the results table, the evaluation, the run folder as the last line.
    assert SMOKE_COMMAND in [command for page, command in documented_commands()]
    proc = run_documented(SMOKE_COMMAND, tmp_path, ("train.py", "configs", "datasets"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]
    assert proc.stdout.rstrip().splitlines()[-1] == f"facecluster run folder: {run_dir}"
    assert "Evaluation on the held-out test split" in proc.stdout
    # stdout holds the tables alone: the progress bars go to stderr, with the logs
    assert "Epoch 0" in proc.stderr and "Epoch 0" not in proc.stdout
    assert "Sanity Checking" not in proc.stdout and "Testing" not in proc.stdout
    assert RunFolder(run_dir).finished


def test_make_help_lists_every_target():
    # README names `make help` for the targets besides train and test
    import subprocess

    listed = subprocess.run(
        "make help".split(), cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout
    targets = re.findall(r"^([a-z]+):.*##", (ROOT / "Makefile").read_text(), re.M)
    assert {"install", "train", "smoke", "test", "lint", "clean", "help"} <= set(targets)
    for target in targets:
        assert re.search(rf"^  make {target} +\S", listed, re.M), (target, listed)


def test_make_test_schedules_the_longest_files_of_the_suite_first():
    # tests/conftest.py's order holds in `make test` only if xdist does not sort the
    # files again, and a file renamed would lose its place (the longest, last, ran alone)
    from tests.conftest import WORKER_SECONDS

    test_line = re.search(r"^test:.*\n\t(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1)
    assert "--dist loadfile --no-loadscope-reorder" in test_line
    files = {path.name for path in (ROOT / "tests").rglob("test_*.py")}
    assert set(WORKER_SECONDS) <= files, set(WORKER_SECONDS) - files


def _layer(path: str) -> str | None:
    """The import table's name for a source file or a facecluster module path."""
    parts = path.removesuffix(".py").replace("/", ".").split(".")
    if parts[0] == "callbacks":
        return "callbacks"
    if parts[0] != "facecluster":
        return path if path in ("train.py", "evaluate.py") else None
    if len(parts) == 1 or parts[1] == "__init__":
        return None
    return "models/components" if parts[1:3] == ["models", "components"] else parts[1]


def _imported_layers() -> dict[str, set[str]]:
    """Each layer's imports of other layers, from every import statement of its files
    (inside functions and ``TYPE_CHECKING`` too)."""
    files = [*ROOT.glob("facecluster/**/*.py"), *ROOT.glob("callbacks/*.py")]
    files += [ROOT / "train.py", ROOT / "evaluate.py"]
    graph: dict[str, set[str]] = {}
    for file in files:
        layer = _layer(str(file.relative_to(ROOT)))
        if layer is None:
            continue
        found = graph.setdefault(layer, set())
        for node in ast.walk(ast.parse(file.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            found.update(_layer(n) for n in names if n.startswith("facecluster."))
        found -= {None, layer}
    return graph


def test_the_architecture_pages_import_table_is_the_sources():
    # docs/ARCHITECTURE.md's table of what each module imports of facecluster, and its
    # claim that imports flow one way: both measured from the source here
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("Imports flow one way", 1)[1].split("```", 2)[1]
    table: dict[str, str] = {}
    rows: list[str] = []
    for line in block.strip().splitlines():
        if line.startswith(" "):  # a row continued
            table[rows[-1]] += " " + line.strip()
            continue
        modules, deps = re.split(r"\s{2,}", line.strip(), maxsplit=1)
        rows.append(modules)
        table[modules] = deps
    actual = _imported_layers()
    documented: dict[str, set[str]] = {}
    for modules, deps in table.items():
        names = set(re.findall(r"(?<![\w/])[a-z_]+(?:/[a-z_]+)?(?![\w/])", deps)) & set(actual)
        for module in modules.split(", "):
            documented[module] = names
    assert documented == actual
    order = {layer: i for i, modules in enumerate(rows) for layer in modules.split(", ")}
    upward = [(a, b) for a, deps in actual.items() for b in deps if order[b] >= order[a]]
    assert not upward, f"a module imports one listed with or after it: {upward}"


def test_the_data_pages_throughput_table_is_its_json():
    # docs/DATA.md's input-throughput table shows bench/results/data_throughput.json's
    # run (a review found the table and the JSON from different runs), on the machine
    # the JSON names
    import json

    result = json.loads((ROOT / "bench" / "results" / "data_throughput.json").read_text())
    page = (ROOT / "docs" / "DATA.md").read_text()
    columns = ("ceiling", "folder", "rec", "rec_checked", "rec_per_item")
    ratios = ("rec_vs_ceiling", "rec_checked_vs_ceiling", "rec_vs_checked", "rec_vs_folder")
    for row in result["rows"]:
        cells = [str(row["num_workers"])]
        cells += [f"{round(row[k]):,}" for k in columns]
        cells += [f"{row[k]:.2f}" for k in (*ratios, "rec_vs_per_item")]
        cells.append(f"{round(row['rec_bytes']):,}")
        assert "| " + " | ".join(cells) + " |" in page, cells
    machine, when = result["machine"], result["measured"][:10]
    text = " ".join(page.split())
    said = f"`{machine['cpu']}` (torch's `{machine['cpu_capability']}` kernels; {when}"
    assert said in text

    # the prose under the table: each worker count's spread over the rounds, and the
    # rounds where the .rec loader fell below the folder loader
    def spread(key: str) -> str:
        ranges = [
            f"{min(r[key] for r in row['rounds']):.2f}-{max(r[key] for r in row['rounds']):.2f}"
            for row in result["rows"]
        ]
        return ", ".join(ranges[:-1]) + " and " + ranges[-1]

    assert (
        f"`.rec / ceiling` ratios spread over {spread('rec_vs_ceiling')}, "
        f"and their `.rec / checked` ratios over {spread('rec_vs_checked')}"
    ) in text
    below = [r["rec_vs_folder"] for row in result["rows"] for r in row["rounds"]]
    below = [f"{b:.2f}" for b in below if b < 1]
    words = {0: "no", 1: "one", 2: "two", 3: "three"}
    said = f"below the folder loader in {words[len(below)]} round"
    assert said in text and all(b in text[text.index(said) :][:80] for b in below)


@pytest.mark.slow
def test_the_python_block_of_the_training_page_as_written(tmp_path):
    # docs/TRAINING.md's "From Python": train, evaluate, export and identify from one
    # script, in a folder of its own (its relative paths land there)
    page = (ROOT / "docs" / "TRAINING.md").read_text()
    section = page[page.index("## From Python") :]
    (block,) = re.findall(r"```python\n(.*?)```", section[: section.index("\n## ", 3)], re.S)
    (tmp_path / "from_python.py").write_text(block)
    proc = run_documented("python from_python.py", tmp_path, ("configs", "datasets"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "Held-out test accuracy (kmeans clustering, K=3)" in proc.stdout  # train's table
    (printed,) = re.findall(r"^(\S+) (\S+)$", proc.stdout, re.M)  # the first print()
    assert all(0 <= float(figure) <= 1 for figure in printed)
    assert "clustered, routed (top_m=1, moe)" in proc.stdout, proc.stdout[-2000:]
    (run_dir,) = [p for p in (tmp_path / "runs").iterdir() if p.name != ".cache"]
    assert RunFolder(run_dir).finished and (run_dir / "eval" / "results.json").is_file()
    assert (tmp_path / "exports" / "smoke" / "identifier.pt").is_file()
    with open(tmp_path / "who.csv") as f:
        rows = list(csv.DictReader(f))
    images = list((ROOT / "datasets" / "lfw-demo" / "images" / "Adrien_Brody").iterdir())
    assert len(rows) == len(images) > 0 and all(row["status"] for row in rows)
