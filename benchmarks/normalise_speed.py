"""GMM normalisation: the old 1-in-10 fit vs the new histogram fit vs Topaz's full fit, per micrograph, in one run.

For every working-scale image (the bundled crops and ../shared/data: read + Fourier crop to 8 A/px,
as ``io.load_micrograph`` does), on one thread (torch and BLAS limited to 1):

* ``old``: ``io.normalise(x, "gmm-sample")``, Topaz's ``norm_fit`` on a 1-in-10 pixel sample
  (the method before issue 15);
* ``new``: ``io.normalise(x, "gmm")``, ``cryoal_ext.normalise.fit_gmm`` on all pixels;
* ``full``: ``topaz.stats.normalize(x, alpha=900, beta=1, num_iters=100, sample=1)``, the
  reference (``--full fixture`` takes its statistics from tests/fixtures instead of refitting).

Prints wall and thread-CPU seconds (the CPU time is what one core costs when other jobs share the
machine) and max |difference| from the full fit in normalised units, side by side.

    python benchmarks/normalise_speed.py
    python benchmarks/normalise_speed.py --full fixture --repeats 5
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from normalise_reference import DATA, OUT as FIXTURE, ROOT, reference_files, topaz_full_fit, working_image  # noqa: E402

from cryoal_ext.atomic import write_json  # noqa: E402


def timed(fn, repeats: int) -> tuple[object, float, float]:
    """(result, median wall s, median thread-CPU s) over ``repeats`` calls."""
    walls, cpus, out = [], [], None
    for _ in range(max(1, repeats)):
        t, c = time.perf_counter(), time.thread_time()
        out = fn()
        walls.append(time.perf_counter() - t)
        cpus.append(time.thread_time() - c)
    return out, statistics.median(walls), statistics.median(cpus)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--full", choices=("refit", "fixture"), default="refit",
                    help="refit: Topaz's full fit in this run (5-30 s per image); fixture: its stored statistics")
    ap.add_argument("--repeats", type=int, default=3, help="timings of old and new per image (median)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "normalise_speed.json"))
    a = ap.parse_args()

    import torch
    from threadpoolctl import threadpool_limits

    from cryoal_ext.io import normalise

    torch.set_num_threads(1)
    fixture = {e["file"]: e for e in json.loads(FIXTURE.read_text())["images"]} if a.full == "fixture" else {}
    rows = []
    head = f"{'micrograph':34s} {'shape':>10s} | {'old s':>6s} {'cpu':>6s} {'|d|':>7s} | {'new s':>6s} {'cpu':>6s} {'|d|':>7s} | {'full s':>6s}"
    print(head + "\n" + "-" * len(head), flush=True)
    with threadpool_limits(1):
        for group, path in reference_files():
            x = working_image(path)
            old, t_old, c_old = timed(lambda: normalise(x, "gmm-sample"), a.repeats)
            new, t_new, c_new = timed(lambda: normalise(x, "gmm"), a.repeats)
            rel = path.relative_to(ROOT) if path.is_relative_to(ROOT) else Path("../shared/data") / path.relative_to(DATA)
            if a.full == "refit":
                fit = topaz_full_fit(x)
                t_full = fit["seconds"]
            else:
                fit, t_full = fixture[rel.as_posix()], float("nan")
            full = ((x - fit["mu"]) / fit["std"]).astype(np.float32)
            d_old, d_new = float(np.abs(old - full).max()), float(np.abs(new - full).max())
            rows.append({"group": group, "file": rel.as_posix(), "working_shape": list(x.shape),
                         "old": {"wall_s": round(t_old, 4), "cpu_s": round(c_old, 4), "max_abs_diff": round(d_old, 5)},
                         "new": {"wall_s": round(t_new, 4), "cpu_s": round(c_new, 4), "max_abs_diff": round(d_new, 5)},
                         "full": {"wall_s": t_full, "mu": fit["mu"], "std": fit["std"]}})
            print(f"{path.name[:34]:34s} {'x'.join(map(str, x.shape)):>10s} | {t_old:6.3f} {c_old:6.3f} {d_old:7.4f} | "
                  f"{t_new:6.3f} {c_new:6.3f} {d_new:7.4f} | {t_full:6.1f}", flush=True)
    big = [r for r in rows if r["working_shape"] == [686, 686]]
    summary = {
        "max_abs_diff_old": max(r["old"]["max_abs_diff"] for r in rows),
        "max_abs_diff_new": max(r["new"]["max_abs_diff"] for r in rows),
        "new_within_0.01_everywhere": all(r["new"]["max_abs_diff"] <= 0.01 for r in rows),
        "median_686_cpu_s": {"old": statistics.median(r["old"]["cpu_s"] for r in big) if big else None,
                             "new": statistics.median(r["new"]["cpu_s"] for r in big) if big else None},
        "median_686_wall_s": {"old": statistics.median(r["old"]["wall_s"] for r in big) if big else None,
                              "new": statistics.median(r["new"]["wall_s"] for r in big) if big else None,
                              "full": statistics.median(r["full"]["wall_s"] for r in big) if big else None},
    }
    print(json.dumps(summary, indent=1))
    write_json(a.out, {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                       "threads": 1, "images": rows, "summary": summary})
    return 0


if __name__ == "__main__":
    sys.exit(main())
