"""The margin head, clustering and routing at the scale the method is for; writes
docs/SCALE.md (and docs/scale_heads.png) from its results.

Heads (``--part heads``): for C = 10K, 100K, 360K and 2M identities at d = 512, the
memory each process holds for its head (parameters, gradients, SGD momentum, and
the logits of a step), counted from the tensor shapes, and the time of one head
step (forward, backward, optimizer step) measured on this CPU at 128 images per
process: the whole head, Partial FC at r = 0.1 and 0.2, on 1 and 8 shards (a shard's
own work with the gathered batch of 8 x 128; communication not included), and the
sub-net heads of the clustered method at K = 8, 32, 64 (C / K identities each, one
shard). Steps too large for this machine's memory are computed from the same
configuration's measured time at 360K, scaled by C, and marked as such.

Clustering and routing (``--part clustering routing``), with class means of
Glint360K's size (360,232 x 512):

- the clustering unit against a bare ``faiss.Kmeans`` on the same matrix: k-means
  (every class mean used) and balanced clustering, K = 64;
- routing at batch 256 over all class means: exact search (``route.index=flat``)
  against inverted lists that are the clusters themselves (``route.index=clusters``),
  faiss's own IVF lists (``ivf``, about 4 sqrt(C) lists) at several
  ``route.ivf_nprobe``, and HNSW, with the share of queries routed to the cluster
  exact search picks (top_m = 1) and the index build time.

The class means are synthetic (a face model of that size cannot be trained here):
``--topics`` neighbourhoods on the unit sphere, each class mean at cosine about 0.5
to its neighbourhood's centre, and queries at cosine about 0.7 to their own class
mean (a face against its identity's mean). Routing agreement depends on that
structure, so it is a property of this synthetic set, not a promise for real data.

    python bench/scale.py                       # all parts: results/scale.json, docs
    python bench/scale.py --part heads          # one part; the others' results are kept
    python bench/scale.py --classes 20000 --part routing --out /tmp/scale.json
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from facecluster.cli import exit_process
from facecluster.clustering import cluster_identities
from facecluster.inference.router import Router
from facecluster.models.components import ArcFace
from facecluster.results import machine_name, markdown_table, measured

RESULTS = Path(__file__).parent / "results" / "scale.json"
DOC = Path(__file__).parents[1] / "docs" / "SCALE.md"
PLOT = DOC.parent / "scale_heads.png"
HEAD_CLASSES = (10_000, 100_000, 360_232, 2_059_906)
PER_PROCESS_BATCH = 128  # arcface_torch's default per GPU
LOGIT_COPIES = 4  # cosine, margin logits, saved softmax, their gradient
PARTS = ("heads", "clustering", "routing", "lfw")
MEASURE_LIMIT_GIB = 8.0  # larger heads are computed, not run, on this machine


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def synthetic_means(classes: int, dim: int, topics: int, seed: int) -> np.ndarray:
    """Class means near ``topics`` centres: cosine about 0.5 to their centre."""
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((topics, dim), dtype=np.float32))
    spread = np.sqrt(3.0 / dim)  # |noise|^2 = 3: cosine 1/sqrt(1 + 3) = 0.5
    means = centres[rng.integers(0, topics, classes)]
    means += spread * rng.standard_normal((classes, dim), dtype=np.float32)
    return np.ascontiguousarray(_unit(means), dtype=np.float32)


def queries_near(means: np.ndarray, count: int, seed: int) -> np.ndarray:
    """Faces of random identities: cosine about 0.7 to their own class mean."""
    rng = np.random.default_rng(seed + 1)
    own = means[rng.integers(0, len(means), count)]
    noise = np.sqrt(1.04 / means.shape[1]) * rng.standard_normal(own.shape, dtype=np.float32)
    return np.ascontiguousarray(_unit(own + noise), dtype=np.float32)


def _seconds(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def clustering(means: np.ndarray, k: int, niter: int, repeats: int) -> dict:
    """Seconds of each method, the median of ``repeats`` runs taken in turn (bare,
    kmeans, balanced, bare, ...), so that a slow spell of the machine hits all three."""
    n, d = means.shape

    def bare():
        km = faiss.Kmeans(d, k, niter=niter, spherical=True, seed=0, max_points_per_centroid=n)
        km.train(means)
        return km

    x = torch.from_numpy(means)
    methods = {
        "bare faiss.Kmeans": bare,
        "facecluster kmeans": lambda: cluster_identities(x, k, "kmeans", seed=0, niter=niter),
        "facecluster balanced": lambda: cluster_identities(x, k, "balanced", 0, niter=niter),
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    rows: dict[str, dict] = {}
    for _ in range(repeats):
        for name, fn in methods.items():
            seconds, out = _seconds(fn)
            times[name].append(seconds)
            print(f"{name}: {seconds:.1f} s")
            if name != "bare faiss.Kmeans":
                sizes = out.cluster_sizes()
                rows[name] = {"sizes_min": int(sizes.min()), "sizes_max": int(sizes.max())}
    bare_s = float(np.median(times["bare faiss.Kmeans"]))
    result = {}
    for name, values in times.items():
        median = float(np.median(values))
        result[name] = {
            "seconds": round(median, 2),
            "runs": [round(v, 2) for v in values],
            "vs_bare": round(median / bare_s, 2),
            **rows.get(name, {}),
        }
    return result


def head_bytes(rows: int, columns: int, batch: int, dim: int) -> dict[str, int]:
    """Peak bytes a process holds for a head shard of ``rows`` class centres in fp32 with
    SGD: parameters, gradients, momentum, and the larger of the two peaks of a step,
    the loss's forward and backward (``batch x columns`` logits, and a sampled head's
    rows and their gradient) and the optimizer's update (SGD's weight decay makes a
    new tensor of the rows' size). Checked against a step's measured peak in
    :func:`head_peak_check`."""
    state = rows * dim * 4
    sampled = 2 * columns * dim * 4 if columns < rows else 0
    return {
        "parameters": state,
        "gradients": state,
        "optimizer": state,
        "step": max(LOGIT_COPIES * batch * columns * 4 + sampled, state),
    }


def _head_step(rows: int, shards: int, sample_rate: float, dim: int):
    """One shard's head step as the training runs it (see :func:`head_step_seconds`)."""
    torch.manual_seed(0)
    head = ArcFace(rows, dim, sample_rate=sample_rate)
    head.world = shards  # a shard's own compute: labels of other shards have no column here
    head.num_classes = rows * shards  # the whole head's, as in a shard of a real one
    batch = PER_PROCESS_BATCH * shards
    embeddings = torch.randn(batch, dim, requires_grad=True)
    labels = torch.randint(0, rows * shards, (batch,))
    optimizer = torch.optim.SGD([head.weight], lr=0.1, momentum=0.9, weight_decay=5e-4)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        head.loss(embeddings, labels).backward()
        optimizer.step()

    return head, optimizer, step


def head_step_seconds(rows: int, shards: int, sample_rate: float, dim: int, repeats: int) -> float:
    """Median seconds of one step of one head shard: loss forward and backward over the
    gathered batch (``shards`` x 128 embeddings, labels over all ``rows x shards``
    identities) and an SGD step. One process does a shard's work, without the
    communication (``world`` is set, the process group is not)."""
    _, _, step = _head_step(rows, shards, sample_rate, dim)
    step()  # warm-up (first-touch of the optimizer state)
    times = [_seconds(step)[0] for _ in range(repeats)]
    return float(np.median(times))


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status (needs Linux)")


def _peak_child(rows: int, shards: int, sample_rate: float, dim: int) -> None:
    """In a fresh process: one step's peak resident memory beyond the head's weights and
    momentum (made before, as a trained run holds them), as JSON on stdout. The
    process's own high-water mark (VmHWM), reset before the step: ``ru_maxrss`` starts
    from the parent's resident size when a large process starts the child."""
    head, optimizer, step = _head_step(rows, shards, sample_rate, dim)
    optimizer.state[head.weight]["momentum_buffer"] = torch.zeros_like(head.weight)
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
    before = _status_kib("VmRSS")
    step()
    print(json.dumps({"step_peak_bytes": (_status_kib("VmHWM") - before) * 1024}))


def head_peak_check(dim: int, whole_rows: int) -> list[dict]:
    """The memory model against a step's measured peak (resident memory, a fresh process
    each): a whole head of ``whole_rows`` rows on one process, and one of 8 shards of a
    fifth of that with the gathered batch, each whole and sampled at r = 0.1."""
    rows_out = []
    shard_rows = whole_rows // 5
    checks = [
        (whole_rows, 1, 1.0),
        (whole_rows, 1, 0.1),
        (shard_rows, 8, 1.0),
        (shard_rows, 8, 0.1),
    ]
    for rows, shards, rate in checks:
        code = (
            "import sys; sys.path.insert(0, 'bench'); import scale; "
            f"scale._peak_child({rows}, {shards}, {rate}, {dim})"
        )
        # glibc's mmap threshold fixed: by default it rises after a large block is freed,
        # and later ones then come from a heap that keeps freed pages resident
        env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
        done = subprocess.run(
            [sys.executable, "-c", code], cwd=Path(__file__).parents[1], check=True,
            capture_output=True, text=True, env=env,
        )  # fmt: skip
        measured = json.loads(done.stdout.strip().splitlines()[-1])["step_peak_bytes"]
        columns = rows if rate >= 1 else min(rows, max(int(np.ceil(rate * rows)), 128))
        parts = head_bytes(rows, columns, PER_PROCESS_BATCH * shards, dim)
        # the weights and momentum were resident before the step
        model = sum(parts.values()) - parts["parameters"] - parts["optimizer"]
        row = {
            "rows": rows,
            "shards": shards,
            "sample_rate": rate,
            "measured_mib": round(measured / 2**20, 1),
            "model_mib": round(model / 2**20, 1),
            # None: too small a head to raise the process's peak at all
            "model_vs_measured": round(model / measured, 3) if measured > 0 else None,
        }
        print(row)
        rows_out.append(row)
    return rows_out


def heads(
    dim: int,
    repeats: int,
    kmeans_k8: dict | None,
    classes_list: list[int],
    limit_gib: float,
    peak_rows: int = 0,
) -> dict:
    rows_out = []
    configs = [("whole head", 1.0, 1), ("whole head", 1.0, 8)]
    configs += [(f"Partial FC r={r}", r, w) for r in (0.1, 0.2) for w in (1, 8)]
    # a sub-net's head: C / K identities, one shard
    configs += [(f"sub-net, K={k}", 1.0, k) for k in (8, 32, 64)]
    measured: dict[tuple[str, int], tuple[int, float]] = {}
    for classes in classes_list:
        for name, rate, split in configs:
            rows = -(-classes // split)  # ceil: a shard's rows, or a sub-net's identities
            world = 1 if name.startswith("sub-net") else split
            # sampled: ceil(r * rows) columns, at least the shard's positives (~128)
            columns = rows if rate >= 1 else min(rows, max(int(np.ceil(rate * rows)), 128))
            memory = head_bytes(rows, columns, PER_PROCESS_BATCH * world, dim)
            row = {
                "classes": classes,
                "head": name,
                "shards": world,
                "rows": rows,
                "memory_gib": round(sum(memory.values()) / 2**30, 3),
                "memory_parts_gib": {k: round(v / 2**30, 3) for k, v in memory.items()},
            }
            if sum(memory.values()) <= limit_gib * 2**30 or (name, world) not in measured:
                seconds = head_step_seconds(rows, world, rate, dim, repeats)
                row |= {"step_ms": round(1000 * seconds, 1), "step": "measured"}
                measured[(name, world)] = (classes, seconds)
            else:
                base_classes, base = measured[(name, world)]
                row |= {
                    "step_ms": round(1000 * base * classes / base_classes, 1),
                    "step": f"computed from {base_classes:,} x {classes / base_classes:.2f}",
                }
            print(row)
            rows_out.append(row)
    result: dict = {"batch_per_process": PER_PROCESS_BATCH, "rows": rows_out}
    if peak_rows:
        result["peak_check"] = head_peak_check(dim, peak_rows)
    if kmeans_k8 is not None:
        result["kmeans_k8_at_360k"] = kmeans_k8
    return result


def sample_rate_on_lfw(rates: list[float], out_dir: Path) -> dict:
    """The single model (stage 1 alone) on LFW-423 with 2 gloo processes, the head
    sharded, at each sample rate: held-out top-1 of the final epoch."""
    root = Path(__file__).parents[1]
    rows = {}
    for rate in rates:
        name = f"r{rate}"
        command = [
            sys.executable, "train.py", "-c", "configs/experiment/lfw423.yaml",
            "-c", "configs/method/single.yaml", "logger=csv", "eval.after_training=false",
            "trainer.devices=2", "trainer.strategy=ddp", f"head.sample_rate={rate}",
            f"output_dir={out_dir}", f"run_name={name}",
        ]  # fmt: skip
        seconds, _ = _seconds(lambda c=command: subprocess.run(c, cwd=root, check=True))
        summary = json.loads((out_dir / name / "stage1.json").read_text())
        rows[str(rate)] = {
            "test_acc": round(float(summary["test_acc"]), 4),
            "minutes": round(seconds / 60, 1),
            "command": " ".join(command[1:]),
        }
        print(rate, rows[str(rate)])
    return rows


def largest_cluster(means: np.ndarray, k: int, niter: int) -> dict:
    """k-means cluster sizes of the synthetic class means: the largest sub-net's head."""
    a = cluster_identities(torch.from_numpy(means), k, "kmeans", seed=0, niter=niter)
    sizes = a.cluster_sizes()
    n = len(means)
    return {
        "k": k,
        "classes": n,
        "largest": int(sizes.max()),
        "smallest": int(sizes.min()),
        "largest_share": round(int(sizes.max()) / n, 4),
    }


def _sq8_like(ivf: faiss.Index, means: np.ndarray) -> faiss.Index:
    """``route.index=ivf route.ivf_codes=sq8`` over the lists an ``ivf`` index already
    trained (what ``build_index`` makes, without training the same lists twice)."""
    quantizer = faiss.clone_index(faiss.downcast_index(ivf.quantizer))
    index = faiss.IndexIVFScalarQuantizer(
        quantizer, means.shape[1], ivf.nlist, faiss.ScalarQuantizer.QT_8bit,
        faiss.METRIC_INNER_PRODUCT, False,
    )  # fmt: skip
    index.train(means)  # the lists are trained: only the 8-bit ranges are
    index.add(means)
    return index


def routing(
    means: np.ndarray,
    k: int,
    niter: int,
    queries: int,
    batch: int,
    nprobes: list[int],
    ivf_nprobes: list[int],
    hnsw_efs: list[int],
    lists_per_cluster: int,
    split_nprobes: list[int],
    fine_nlist: int,
    fine_nprobes: list[int],
) -> dict:
    a = cluster_identities(torch.from_numpy(means), k, "kmeans", seed=0, niter=niter)
    q = torch.from_numpy(queries_near(means, queries, seed=0))
    flat = Router(a.class_means, a.class_to_cluster, a.centroids, "flat", use_gpu=False)

    def per_query_ms(router: Router) -> tuple[float, torch.Tensor]:
        router.route(q[:batch])  # warm-up
        seconds, routes = _seconds(
            lambda: torch.cat([router.route(q[i : i + batch]) for i in range(0, len(q), batch)])
        )
        return 1000 * seconds / len(q), routes[:, 0]

    exact_ms, exact = per_query_ms(flat)
    rows = {"flat (exact)": {"ms_per_query": round(exact_ms, 3), "agreement": 1.0}}
    print(f"flat: {exact_ms:.2f} ms/query")
    split = f"clusters, lists_per_cluster={lists_per_cluster}, ivf_codes=sq8"
    # (index and its build settings, search-time setting, its values)
    settings = [("clusters", "ivf_nprobe", [p for p in nprobes if p <= k])]
    settings += [(split, "ivf_nprobe", split_nprobes)]
    settings += [("ivf", "ivf_nprobe", ivf_nprobes)]
    settings += [("ivf, ivf_codes=sq8", "ivf_nprobe", ivf_nprobes)]
    settings += [(f"ivf, ivf_nlist={fine_nlist}, ivf_codes=sq8", "ivf_nprobe", fine_nprobes)]
    settings += [("hnsw", "hnsw_ef_search", hnsw_efs)]
    built: dict[str, tuple[Router, float]] = {}
    for name, key, values in settings:
        kind, *options = name.split(", ")
        start = time.perf_counter()
        if name == "ivf, ivf_codes=sq8":  # ivf's trained lists, 8-bit codes
            router = copy.copy(built["ivf"][0])  # the same settings, another index
            router.index = _sq8_like(built["ivf"][0].index, means)
            seconds = built["ivf"][1] + time.perf_counter() - start
        else:
            kwargs = {o.split("=")[0]: o.split("=")[1] for o in options}
            for key_ in ("lists_per_cluster", "ivf_nlist"):
                if key_ in kwargs:
                    kwargs[key_] = int(kwargs[key_])
            router = Router(
                a.class_means, a.class_to_cluster, a.centroids, kind, use_gpu=False, **kwargs
            )
            seconds = time.perf_counter() - start
        built[name] = router, seconds
        for value in values:
            if key == "ivf_nprobe":
                router.index.nprobe = value
            else:
                router.index.hnsw.efSearch = value
            ms, routed = per_query_ms(router)
            agree = float((routed == exact).float().mean())
            row = f"{name}, {key}={value}"
            rows[row] = {"ms_per_query": round(ms, 3), "agreement": agree}
            rows[row]["build_s"] = round(seconds, 1)
            print(f"{row}: {ms:.2f} ms/query, agreement {agree:.4f}, built in {seconds:.1f} s")
    return rows


def plot_heads(heads_result: dict, path: Path) -> None:
    """Memory and step time per process against C, one line per head configuration."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    lines: dict[str, list[dict]] = {}
    for row in heads_result["rows"]:
        lines.setdefault(f"{row['head']}, {row['shards']} shard(s)", []).append(row)
    for label, rows in lines.items():
        c = [r["classes"] for r in rows]
        style = "--" if "sub-net" in label else "-"
        axes[0].plot(c, [r["memory_gib"] for r in rows], style, marker="o", label=label)
        axes[1].plot(c, [r["step_ms"] for r in rows], style, marker="o", label=label)
    titles = ("head memory per process (GiB)", "head step per process (ms)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("identities C")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _table(header: list[str], rows: list[list[str]]) -> str:
    """The package's table, its first column left, the others right."""
    return markdown_table(header, rows, "l" + "r" * (len(header) - 1))


def _peak_check_text(h: dict) -> str:
    checks = h.get("peak_check")
    if not checks:
        return ""
    shown = ";\n  ".join(
        f"{c['rows']:,} rows{' (a shard of 8)' if c['shards'] > 1 else ''}, "
        f"r = {c['sample_rate']:g}: {c['measured_mib']:,.0f} MiB measured, "
        f"{c['model_mib']:,.0f} counted"
        for c in checks
    )
    return f"""
  The count against a step's measured peak, beyond the weights and momentum (resident
  memory of a fresh process on this CPU, glibc's mmap threshold fixed at 128 KiB):
  {shown}.
  The head's cosine keeps no normalised copy of the rows; with one, as
  before 2026-12-01, the first of these steps took 1,966 MiB against 795 MiB now
  (glibc's default settings, a one-off script)."""


def _heads_section(h: dict) -> str:
    rows = h["rows"]
    table = _table(
        ["C", "head", "shards", "rows / process", "memory / process (GiB)", "step (ms)", ""],
        [
            [
                f"{r['classes']:,}", r["head"], str(r["shards"]), f"{r['rows']:,}",
                f"{r['memory_gib']:.2f}", f"{r['step_ms']:,.1f}",
                "" if r["step"] == "measured" else r["step"],
            ]
            for r in rows
        ],
    )  # fmt: skip

    def find(classes: int, head: str, shards: int) -> dict:
        key = (classes, head, shards)
        return next(r for r in rows if (r["classes"], r["head"], r["shards"]) == key)

    big = max(r["classes"] for r in rows)
    whole, pfc = find(big, "whole head", 1), find(big, "Partial FC r=0.1", 8)
    whole8 = find(big, "whole head", 8)
    text = f"""### Memory and step time per process

{table}

![head memory and step time against C](scale_heads.png)

- **Memory** is counted from the tensor shapes (fp32, SGD): the process's rows x
  {h.get("dim", 512)} for the parameters, their gradients and their momentum, plus the
  larger of a step's two peaks: the loss's forward and backward, {LOGIT_COPIES} copies of
  the step's logits ({h["batch_per_process"]} images per process, gathered over the
  shards; sampled heads use ceil(r x rows) columns, at least 128 for the positives)
  and a sampled head's rows and their gradient; and the optimizer's update, one more
  tensor of the rows' size (SGD's weight decay). Activations of the backbone are not
  included.{_peak_check_text(h)}
- **Step time** is one head step on this machine's CPU: loss forward and backward and
  the SGD update of the process's rows. With 8 shards it is one shard's work on the
  gathered batch of {8 * h["batch_per_process"]}. A step's communication is not
  included: the batch sizes, the embeddings and labels gathered, two all-reduces for
  the loss (the rows' maxima, [gathered batch] floats, then their normalisers and
  target logits, [2, gathered batch]), and one of [gathered batch, 512] for the
  embeddings' gradient. Rows marked "computed" did not fit this machine and are
  the same configuration's time at the largest measured C, scaled by C.
- At {big:,} identities the whole head on one process needs {whole["memory_gib"]:.1f}
  GiB; split over 8 processes {whole8["memory_gib"]:.1f} GiB each, and with Partial FC
  r = 0.1 {pfc["memory_gib"]:.1f} GiB each. Step time falls with the columns computed:
  {whole["step_ms"]:,.0f} ms for the whole head on one process, {pfc["step_ms"]:,.0f} ms
  per shard at r = 0.1 on 8 (the SGD update still touches every row of the shard, as in
  arcface_torch's partial_fc_v2).
"""
    k8 = h.get("kmeans_k8_at_360k")
    if k8:
        ratio = k8["largest_share"]
        verdict = "meets" if ratio <= 1 / 6 else "misses"
        text += f"""
### A sub-net's head at {k8["classes"]:,} identities, K = 8

k-means on the synthetic class means (below) at K = 8 gives clusters of
{k8["smallest"]:,} to {k8["largest"]:,} identities. The largest sub-net's head state
(parameters, gradients, momentum) is {ratio:.3f} of the single model's
({k8["largest"]:,} / {k8["classes"]:,} rows), which {verdict} the goal of at most
1/6 = 0.167. `clustering.method=balanced` makes every cluster C / K = 1/8 exactly.
"""
    return text


def _lfw_section(lfw: dict) -> str:
    rows = [[f"{float(rate):g}", f"{100 * r['test_acc']:.2f}%"] for rate, r in lfw.items()]
    accs = {float(rate): r["test_acc"] for rate, r in lfw.items()}
    gaps = "; ".join(
        f"r = {rate:g}: {100 * (acc - accs[1.0]):+.2f} points against r = 1"
        for rate, acc in accs.items()
        if rate != 1.0 and 1.0 in accs
    )
    return f"""### Sampling on real faces: LFW-423, 2 gloo processes

The single model (stage 1 alone) on the 423 LFW identities with at least 5 images,
trained by 2 gloo processes with the head sharded, at each sample rate (held-out
test top-1, final epoch):

{_table(["head.sample_rate", "test top-1"], rows)}

{gaps} (goal: within 2 points), one seed each. `python bench/scale.py --part lfw`
runs them: `train.py` with `configs/experiment/lfw423.yaml`, `configs/method/single.yaml`,
`trainer.devices=2 trainer.strategy=ddp head.sample_rate=R` (the exact commands are in
`bench/results/scale.json`).
"""


def _clustering_section(c: dict, classes: int, k: int) -> str:
    rows = []
    for name, r in c.items():
        sizes = f"{r['sizes_min']:,} to {r['sizes_max']:,}" if "sizes_min" in r else ""
        rows.append([name, f"{r['seconds']:.1f}", f"{r['vs_bare']:.2f}", sizes])
    km, bal = c["facecluster kmeans"]["vs_bare"], c["facecluster balanced"]["vs_bare"]
    return f"""## Clustering, K = {k}

{_table(["", "seconds", "/ bare faiss", "cluster sizes"], rows)}

- **k-means uses every class mean.** faiss trains on a sample of 256 points per
  centroid unless told otherwise: at K = {k} that is {min(classes, 256 * k):,} of the
  {classes:,} class means.
  facecluster sets `max_points_per_centroid` to C / K (never below faiss's 256), so
  every identity is used
  (`tests/test_inference.py::test_kmeans_trains_on_every_class_mean_not_faiss_sample`
  checks the partition against faiss's on all points).
  Time: {km:.2f}x the bare call ({"meets" if km <= 1.2 else "misses"} the goal of 1.2x);
  the rest is normalising and the nearest-centroid assignment.
- Times are the median of {len(next(iter(c.values()))["runs"])} runs of each, taken in turn.
- **Balanced clustering** (`clustering.method=balanced`): {bal:.2f}x the bare call
  ({"meets" if bal <= 2.5 else "misses"} the goal of 2.5x). After k-means it runs up
  to 10 rounds of deferred acceptance over the C x K similarities (each identity's
  first 8 preferences sorted up front, the rest on demand; each cluster keeps its
  holders sorted and rejects outright what falls below its weakest holder, but a
  round in which a proposal beats it re-sorts that cluster's holders, about C / K of
  them); cluster sizes differ by at most one (before `clustering.overlap`, whose
  extra members are not balanced).
"""


def _routing_section(r: dict, batch: int, topics: str) -> str:
    rows = []
    for name, v in r.items():
        kind, _, setting = name.partition(", ")
        build = f"{v['build_s']:.1f} s" if "build_s" in v else ""
        rows.append(
            [f"`{kind.split()[0]}`", setting, f"{v['ms_per_query']:.2f}",
             f"{100 * v['agreement']:.2f}%", build]
        )  # fmt: skip
    good = [
        (v["ms_per_query"], name)
        for name, v in r.items()
        if v["ms_per_query"] <= 2.0 and v["agreement"] >= 0.995
    ]
    if good:
        ms, name = min(good)
        verdict = f"**Met** by `{name}`: {ms:.2f} ms per query."
        if any(n == "flat (exact)" for _, n in good) and "exact" not in name:
            exact = r["flat (exact)"]["ms_per_query"]
            verdict += f" Exact search (`flat`) meets it too: {exact:.2f} ms per query."
    else:
        best = max(
            (v["agreement"], name) for name, v in r.items()
            if v["ms_per_query"] <= 2.0 and "exact" not in name
        )  # fmt: skip
        verdict = (
            f"**No index met it on this set.** The best agreement within 2 ms is "
            f"{100 * best[0]:.2f}% (`{best[1]}`)."
        )
    return f"""## Routing, top_m = 1, batch {batch}

Each row: the time per query over 1,024 queries, and the share routed to the cluster
exact search picks (the cluster of the nearest class mean).

{_table(["`route.index`", "setting", "ms / query", "agreement with exact", "build"], rows)}

The goal is at most 2 ms per query with at least 99.5% agreement. {verdict}

- `clusters` uses the clustering's own clusters as inverted lists: built in about a
  second, no training, but 64 lists are too coarse; a face's identity often sits in a
  cluster whose centroid is not among the face's nearest. With
  `route.lists_per_cluster` each cluster is split into that many lists by a k-means
  over its own identities (one small k-means per cluster, not one over all C class
  means), and `route.ivf_codes=sq8` stores 8-bit codes.
- `ivf` is faiss's IVF with its own k-means lists (about 4 sqrt(C)); training them is
  most of its build time. With `route.ivf_codes=sq8` the same lists hold 8-bit codes
  (its build time here includes training those lists), so a query scans a quarter of
  the bytes.
- More, finer IVF lists (`route.ivf_nlist`) cost a longer build and scan fewer class
  means per probe. Caution: this synthetic set has {topics} neighbourhoods, so lists
  as many as the neighbourhoods suit it unusually well; on real class means, measure
  agreement on your own embeddings (`route.*` settings are evaluation-time options).
- `hnsw` is faiss's graph index; `route.hnsw_ef_search` trades time for agreement.

Exact search stays the default; `route.index` picks another (docs/EVALUATION.md). It
needs no faiss: each cluster's class means are one block, and a query's score for a
cluster is its best similarity in that block, one matrix product per cluster, so
every cluster is ranked by its nearest class mean (the faiss `IndexFlatIP` search it
replaced took 8.36 ms per query in the table's previous run, 2026-11-29, retrieved 64
neighbours and ranked the other clusters by centroid).
"""


def _machine(result: dict) -> str:
    """Where the parts ran, in words: one machine, or each part's."""
    by_part = result.get("measured_by", {})
    names = {
        # parts run before 2026-12-03 have only the platform's name, in "machine"
        part: f"{machine_name(by_part[part]['machine'])}, {by_part[part]['threads']} threads"
        if part in by_part
        else result.get("machine", "not recorded")
        for part in PARTS
        if part in result
    }
    if len(set(names.values())) == 1:
        return next(iter(names.values()))
    return "; ".join(f"{part} on {name}" for part, name in names.items())


def render(result: dict) -> str:
    """docs/SCALE.md from the results."""
    walls = ", ".join(f"{p} {s / 60:.1f} min" for p, s in result.get("wall_s", {}).items())
    parts = [
        f"""# Scale: 360K to 2M identities

<!-- Written by bench/scale.py from bench/results/scale.json: edit the script. -->

facecluster is for 93K (MS1MV3) to 360K (Glint360K) and 2M (WebFace42M) identities.
Three things grow with the identity count C: the margin head (at 2M x 512 the
largest tensor of the model), the clustering of the C class means, and routing over
them. This page shows what facecluster does about each and what it costs, measured on
this machine ({_machine(result)}) where it fits and computed from measured costs where
it does not (marked).

```bash
python bench/scale.py      # every part; one part: --part heads|lfw|clustering|routing
```

Wall time of the last runs: {walls}. Exact commands: `commands` in
`bench/results/scale.json`. `tests/test_performance.py` runs the script at toy size.

## The margin head: sharded and sampled (Partial FC)

- **Sharding is automatic under DDP.** With more than one process (`trainer.devices`,
  `trainer.num_nodes`), every margin head (stage 1, each sub-net's, the single model's)
  is split into one contiguous block of class centres per process, with its optimizer
  state. DDP leaves the head alone (`_ddp_params_and_buffers_to_ignore`), and in
  stage 2 the cluster maps too (set alike on every rank by the clustering). The
  stage-2 model does not hold the [C, d] class means at all (4 GB at 2M identities x
  512, computed: 2M x 512 x 4 bytes): the warm start reads them once on the CPU, so
  they are neither on the GPUs, nor broadcast by DDP, nor in every job's
  checkpoints. They stay in host memory through stage 2, in the clustering's
  assignment. A stage-2 job (and a resumed run) maps `clusters.pt` instead of reading
  it (`ClusterAssignment.load`), so the processes of a node share the file's pages in
  the page cache: loading 500K x 512 means (a 1.03 GB file) and ranking one cluster's
  neighbours added 42 MB of private memory to the process and 996 MB of shared file
  pages, against 1,015 MB of private memory when the file was read (2026-12-01, one
  process, `/proc/self/status`; a one-off script). The processes that ran the
  clustering (stage 1 and stage 2 in one command) map the file too, once each has
  checked that it holds the assignment they made; until 2026-12-01 each kept its own
  copy through stage 2 (4 GB at 2M x 512, 32 GB on a node of 8, computed). At 500K x
  512 the check and the mapping took 2.9 s and the process's private memory fell from
  1,443 to 531 MiB (2026-12-01, one process, `/proc/self/status`; a one-off script).
  The check (every class mean finite and of unit norm) runs wherever an assignment is
  built or loaded: at 2M x 512 it took 12.8-17.3 s with a finiteness pass and float64
  norms, 0.26-0.65 s since 2026-12-04 with one float32 norm per row (two threads,
  random unit rows, 2026-12-04; a review's runs and one alternating the two versions,
  beside a training; one-off scripts).
  Before that mapping, while the clustering runs, every rank holds the all-reduced
  means once (4 GB at 2M x 512, computed), and rank 0 a normalised copy for k-means
  besides (8 GB); the other ranks normalise theirs in place (since 2026-12-03: a
  second copy before, 64 GB on a node of 8 for a moment, computed). The float64 sums
  of the all-reduce are on the training device until then (7.6 GiB at 2M x 512).
  With
  `stage2.negatives` each job's start ranks every identity by its cosine to each
  centroid, once per cluster (the datamodule is connected to all clusters, then to the
  job's, with the same ranking): 0.6-0.9 s per cluster at 2M x 512 on this machine's 2
  cores (one matrix-vector product and a full sort), so about a minute per job at K=64
  (computed from it; twice that before 2026-12-01, when each connection ranked again). Each step
  all-gathers the embeddings and labels (any batch size, so an epoch's last batch is
  fine) and normalises the softmax across processes.
- **`head.sample_rate=r`** (default 1) makes each process use only its rows of the
  gathered batch's identities plus a uniform sample of its other rows, ceil(r x rows)
  in all (An et al., CVPR 2022; arcface_torch's partial_fc_v2). It works in one process
  too.
- **Gradients are exact.** The embeddings' gradient is summed over processes and
  multiplied by the world size, because DDP averages the backbone's gradient while the
  loss is the mean over the whole gathered batch (the docstring of
  `facecluster/models/components/partial_fc.py` works it out).
  `tests/test_partial_fc.py` checks, on 3 gloo processes with unequal batches, that the
  loss, the backbone gradient and each shard's gradient equal one process's with the
  whole head (within 1e-5), for ArcFace, CosFace and AdaFace (whose running norm
  statistics, taken over the gathered batch, are alike in every process), and that
  sampling keeps every positive and uses exactly max(positives, ceil(r x rows)) rows.
  The margin is applied in fp32 with autocast off.
- **Clipping** by norm counts every shard: the shards' squared norms are summed over
  processes, so all processes scale their gradients by the same factor.
- **Checkpoints hold the whole head** and its whole optimizer state, gathered on save
  (rank 0 receives one shard at a time into host memory) and split on load
  (`tests/test_partial_fc.py` splits one over 3 processes and gathers it back). A run
  trained on N processes resumes, evaluates and exports on M.
  `tests/test_ddp.py` trains on 2 processes, resumes on 1, then on 2 again, each fit
  starting from exactly the saved weights and momentum, and evaluates in one process;
  evaluate.py under torchrun evaluates on N, and so do the N processes of a DDP
  train.py after training, each process scoring a shard of the test split, with one
  process's figures (docs/EVALUATION.md).
- **Limits.** Each process builds the whole head once at start (from the run's seed, so
  every device count starts from the same head) and then keeps its rows: at 2M x 512
  that is 4.2 GB of host memory for a moment per process. A resume reads the
  checkpoint memory-mapped (`AtomicCheckpointIO.load_checkpoint`), so each process
  reads the pages of its own shard of the saved whole head and its optimizer state,
  not all of them. Rows outside a step's sample
  get a zero gradient but still a momentum and weight-decay update, as in
  arcface_torch's partial_fc_v2. Only `ddp` is supported: `ddp_spawn`, `ddp_fork`,
  `ddp_notebook`, `xla`, FSDP and DeepSpeed are refused when the config loads. The sharded
  head has been run on CPU with gloo only (no GPU was available): NCCL, bf16-mixed and
  16-mixed with loss scaling are untested. The head computes in fp32 and gathers
  embeddings in fp32, so a non-finite value reaches every process through the shared
  loss and fp16 loss scaling skips the same steps everywhere; the checkpoint gather
  goes through the current CUDA device under NCCL, one shard at a time.
"""
    ]
    if "heads" in result:
        parts.append(_heads_section(result["heads"] | {"dim": result["dim"]}))
    if "lfw" in result:
        parts.append(_lfw_section(result["lfw"]))
    parts.append(
        """## Synthetic class means for clustering and routing

No face model of this size can be trained here, so clustering and routing use
synthetic class means: """
        + f"{result['classes']:,} x {result['dim']} unit vectors in {result['synthetic']}. "
        + "Clustering times hardly depend on that structure. Routing agreement depends on "
        "it entirely, so those figures describe this set, not real faces.\n"
    )
    if "clustering" in result:
        parts.append(
            _clustering_section(result["clustering"], result["classes"], result["clusters"])
        )
    if "routing" in result:
        topics = result["synthetic"].split(" topics")[0]
        parts.append(_routing_section(result["routing"], 256, topics))
    return "\n".join(parts).rstrip() + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--part",
        nargs="+",
        choices=PARTS,
        default=list(PARTS),
    )
    parser.add_argument("--rates", type=float, nargs="+", default=[1.0, 0.5])
    parser.add_argument(
        "--render-only", action="store_true", help="rewrite the page from --out, measure nothing"
    )
    parser.add_argument("--classes", type=int, default=360_232)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--topics", type=int, default=4096)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ivf-nprobe", type=int, nargs="+", default=[16, 64, 192, 256])
    parser.add_argument("--hnsw-ef", type=int, nargs="+", default=[16, 64, 128, 256])
    parser.add_argument("--lists-per-cluster", type=int, default=32)
    parser.add_argument("--clustering-repeats", type=int, default=3)
    parser.add_argument("--fine-nlist", type=int, default=4096, help="a second ivf, sq8")
    parser.add_argument("--fine-nprobe", type=int, nargs="+", default=[64, 128, 192])
    parser.add_argument("--split-nprobe", type=int, nargs="+", default=[64, 128, 192, 256])
    parser.add_argument("--repeats", type=int, default=3, help="timed head steps")
    parser.add_argument("--head-classes", type=int, nargs="+", default=list(HEAD_CLASSES))
    parser.add_argument(
        "--measure-limit-gib",
        type=float,
        default=MEASURE_LIMIT_GIB,
        help="heads needing more memory are computed from the largest one measured",
    )
    parser.add_argument(
        "--peak-rows",
        type=int,
        default=200_000,
        help="the memory model's check: a whole head of this many rows (0: none)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument(
        "--doc",
        type=Path,
        default=None,
        help="where the page goes (default: docs/SCALE.md for the default --out, else "
        "beside --out, as .md; the heads plot beside it)",
    )
    args = parser.parse_args()
    # an --out of one's own (a trial at toy size) rewrote the project's page and plot
    own = args.out.resolve() != RESULTS.resolve()  # the default, however it is written
    args.doc = args.doc or (args.out.with_suffix(".md") if own else DOC)
    threads = torch.get_num_threads()
    result = json.loads(args.out.read_text()) if args.out.is_file() else {}
    parts = [] if args.render_only else args.part
    result |= (
        {}
        if not parts
        else {
            "classes": args.classes,
            "dim": args.dim,
            "clusters": args.clusters,
            "synthetic": f"{args.topics} topics, class means at cos ~0.5 to their topic, "
            "queries at cos ~0.7 to their class mean",
        }
    )
    skip = ("out", "doc", "part", "render_only")
    options = {k: v for k, v in vars(args).items() if k not in skip}
    flags = " ".join(
        f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for k, v in options.items()
    )
    means = synthetic_means(args.classes, args.dim, args.topics, seed=0) if parts else None
    commands = result.setdefault("commands", {})
    for part in parts:
        commands[part] = f"python bench/scale.py --part {part} {flags}"
        start = time.perf_counter()
        if part == "heads":
            k8 = largest_cluster(means, 8, args.niter)
            result["heads"] = heads(
                args.dim,
                args.repeats,
                k8,
                args.head_classes,
                args.measure_limit_gib,
                args.peak_rows,
            )
        elif part == "lfw":
            with tempfile.TemporaryDirectory() as tmp:
                result["lfw"] = sample_rate_on_lfw(args.rates, Path(tmp))
        elif part == "clustering":
            result["clustering"] = clustering(
                means, args.clusters, args.niter, args.clustering_repeats
            )
        else:
            result["routing"] = routing(
                means,
                args.clusters,
                args.niter,
                args.queries,
                args.batch,
                args.nprobe,
                args.ivf_nprobe,
                args.hnsw_ef,
                args.lists_per_cluster,
                args.split_nprobe,
                args.fine_nlist,
                args.fine_nprobe,
            )
        result.setdefault("wall_s", {})[part] = round(time.perf_counter() - start, 1)
        # parts may run apart, on different machines
        result.setdefault("measured_by", {})[part] = measured() | {"threads": threads}
    if all(part in result.get("measured_by", {}) for part in PARTS if part in result):
        result.pop("machine", None)  # earlier versions' platform name: no part uses it
    result.pop("command", None)  # the single command of earlier versions
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")
    if "heads" in result:
        plot_heads(result["heads"], args.doc.parent / PLOT.name)
    args.doc.write_text(render(result))
    print(f"written to {args.doc}")


if __name__ == "__main__":
    main()
    exit_process(0)  # without the final garbage collection (facecluster.cli)
