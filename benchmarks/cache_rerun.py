"""Feature cache (issue 6, target 4): a re-run of `cryoal round` recomputes nothing.

Runs the same `cryoal round` twice (fresh processes, as a user would) on EMPIAR-10028 with an
empty feature cache: the first run computes and caches the training micrographs' features, the
second must find them all.  Reports both wall times, the cache entries (float16 .npy, checked
memory-mappable) and whether the second run wrote or changed any of them.

    python benchmarks/cache_rerun.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))


def snapshot(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.glob("*.npy"))}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--micrographs", default=str(DATA / "empiar10028" / "micrographs"))
    ap.add_argument("--truth", default=str(DATA / "empiar10028" / "particles.txt"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cache_rerun.json"))
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="cryoal_cache_bench_") as tmpd:
        tmp = Path(tmpd)
        cmd = [sys.executable, "-m", "cryoal_ext.cli", "round", a.micrographs, "--session", str(tmp / "session"),
               "--radius-px", "28", "--cache-dir", str(tmp / "cache")]
        runs = []
        for k in range(2):
            extra = ["--positives", a.truth] if k == 0 else []  # labels once; the re-run reuses the session
            t = time.perf_counter()
            subprocess.run(cmd + extra, check=True, stdout=subprocess.DEVNULL)
            runs.append(round(time.perf_counter() - t, 2))
            if k == 0:
                first = snapshot(tmp / "cache")
        second = snapshot(tmp / "cache")
        feats = sorted((tmp / "cache").glob("*.features.npy"))
        dtypes = sorted({str(np.load(f, mmap_mode="r").dtype) for f in feats})
        result = {
            "command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
            "round_wall_s": {"first_run_features_computed": runs[0], "rerun_features_cached": runs[1]},
            "cache_entries": len(feats), "feature_dtype_on_disk": dtypes,
            "rerun_changed_or_added_entries": sum(1 for n in second if first.get(n) != second[n]),
            "note": "wall time of a whole `cryoal round` process (python + torch import, reading micrographs, "
                    "fit, proposals, picks of the training micrographs); 2 shared CPU cores",
        }
    write_json(a.out, result)
    print(json.dumps(result, indent=1))
    return 0 if result["rerun_changed_or_added_entries"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
