"""Clustering and routing at the scale the method is for (issue 9, in part).

Measures, on this machine, with class means of Glint360K's size (360,232 x 512):

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

    python bench/scale.py                       # writes bench/results/scale.json
    python bench/scale.py --classes 20000 --quick
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import faiss
import numpy as np
import torch

from facecluster.clustering import cluster_identities
from facecluster.inference.router import Router

RESULTS = Path(__file__).parent / "results" / "scale.json"


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


def clustering(means: np.ndarray, k: int, niter: int) -> dict:
    n, d = means.shape

    def bare():
        km = faiss.Kmeans(d, k, niter=niter, spherical=True, seed=0, max_points_per_centroid=n)
        km.train(means)
        return km

    x = torch.from_numpy(means)
    rows, raw = {}, {}
    for name, fn in (
        ("bare faiss.Kmeans", bare),
        ("facecluster kmeans", lambda: cluster_identities(x, k, "kmeans", seed=0, niter=niter)),
        ("facecluster balanced", lambda: cluster_identities(x, k, "balanced", 0, niter=niter)),
    ):
        seconds, out = _seconds(fn)
        row = {"seconds": round(seconds, 2)}
        if name != "bare faiss.Kmeans":
            sizes = out.cluster_sizes()
            row |= {"sizes_min": int(sizes.min()), "sizes_max": int(sizes.max())}
        rows[name], raw[name] = row, seconds
        print(f"{name}: {seconds:.1f} s {row}")
    for name, row in rows.items():
        row["vs_bare"] = round(raw[name] / raw["bare faiss.Kmeans"], 2)
    return rows


def routing(
    means: np.ndarray, k: int, niter: int, queries: int, batch: int, nprobes, ivf_nprobes
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
    settings = [("clusters", "ivf_nprobe", p) for p in nprobes if p <= k]
    settings += [("ivf", "ivf_nprobe", p) for p in ivf_nprobes]
    settings += [("hnsw", "hnsw_m", 32)]
    built: dict[str, tuple[Router, float]] = {}
    for kind, key, value in settings:
        if kind not in built:  # one index per kind; nprobe is a search-time setting
            start = time.perf_counter()
            router = Router(a.class_means, a.class_to_cluster, a.centroids, kind, use_gpu=False)
            built[kind] = router, time.perf_counter() - start
        router, seconds = built[kind]
        if key == "ivf_nprobe":
            router.index.nprobe = value
        ms, routed = per_query_ms(router)
        agree = float((routed == exact).float().mean())
        name = f"{kind}, {key}={value}"
        rows[name] = {"ms_per_query": round(ms, 3), "agreement": agree}
        rows[name]["build_s"] = round(seconds, 1)
        print(f"{name}: {ms:.2f} ms/query, agreement {agree:.4f}, built in {seconds:.1f} s")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=360_232)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--clusters", type=int, default=64)
    parser.add_argument("--topics", type=int, default=4096)
    parser.add_argument("--niter", type=int, default=20)
    parser.add_argument("--queries", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--nprobe", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32])
    parser.add_argument("--ivf-nprobe", type=int, nargs="+", default=[16, 64, 256])
    parser.add_argument("--quick", action="store_true", help="routing only (no clustering timing)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    threads = torch.get_num_threads()
    means = synthetic_means(args.classes, args.dim, args.topics, seed=0)
    result = {
        "command": "python bench/scale.py " + " ".join(
            f"--{k} {v}" for k, v in vars(args).items()
            if k not in ("out", "quick", "nprobe", "ivf_nprobe")
        ),
        "machine": f"{platform.processor() or platform.machine()}, {threads} threads",
        "classes": args.classes,
        "dim": args.dim,
        "clusters": args.clusters,
        "synthetic": f"{args.topics} topics, class means at cos ~0.5 to their topic, "
        "queries at cos ~0.7 to their class mean",
    }  # fmt: skip
    if not args.quick:
        result["clustering"] = clustering(means, args.clusters, args.niter)
    result["routing"] = routing(
        means, args.clusters, args.niter, args.queries, args.batch, args.nprobe, args.ivf_nprobe
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
