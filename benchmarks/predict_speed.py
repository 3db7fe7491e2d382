"""Prediction speed and memory (issue 6, targets 2, 3 and 5), side by side in one run.

Speed, one process, the same N micrographs and the same trained BLR (resnet16_u32 backbone):

* ``backbone``: the bare network (backbone + folded 1x1 head) over the working-scale images
  already in memory: no reading, scaling, normalising, NMS or writing.  Timed before and after
  the others; the mean is the reference.
* ``cryoal predict``: the real command (``cli.main``, in-process): read MRC, Fourier-crop, GMM
  normalise, network, NMS, per-micrograph files, manifest, merge; once per ``--normalisations``
  method (default: the new histogram fit ``gmm`` and the old 1-in-10 fit ``gmm-sample``), side
  by side, with the seconds of each stage (read, crop, normalise, network, NMS, write) summed over
  the micrographs as the command reports them.  Stages overlap (a reader thread reads and
  normalises beside the network), so they need not add up to the end-to-end time.
* ``old predict``: what ``cryoal predict`` did before (featurise: backbone -> float16 feature maps,
  then ``BLR.logit_map`` and NMS, one micrograph after another), feature cache off.
* ``topaz extract`` (topaz-em, in-process via ``topaz.commands.extract`` because the ``topaz``
  console script does not start with this torch/torchvision pair): the same backbone
  (``-m resnet16_u32``; its own head, same cost as ours) on the same working-scale images,
  already normalised and written as MRC (topaz extract does no scaling or normalising, so it
  does less work than ``cryoal predict``).

Memory: peak RSS of ``cryoal predict`` over ``--memory-n`` micrographs (default 5 and 50: the
real micrographs repeated under new names in a temp folder), one fresh subprocess per run,
read with ``resource.getrusage(RUSAGE_CHILDREN)`` in a wrapper process.

AP: picks of the streaming engine (logits from float32 features inside the network) against
the old path (float16 cached features) on the held-out EMPIAR-10028 micrographs.

    python benchmarks/predict_speed.py                    # all of it (~10 min on 2 busy cores)
    python benchmarks/predict_speed.py --skip-memory --n 4
    python benchmarks/predict_speed.py --skip-topaz --skip-old --skip-memory --skip-ap   # issue 15: network vs end to end
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json

DATA = Path(os.environ.get("CRYOAL_TEST_DATA", Path(__file__).resolve().parents[2] / "shared" / "data"))
DATASETS = [DATA / "empiar10028" / "micrographs", DATA / "empiar10017" / "micrographs"]
RSS_WRAPPER = ("import resource, subprocess, sys; subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL, "
               "stderr=subprocess.DEVNULL); print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)")


def train_model(out: Path, cache_dir: str, fm: str) -> tuple[Path, list[str], list[str]]:
    """A BLR fitted to ground-truth labels of two EMPIAR-10028 micrographs (the model to predict with)."""
    from cryoal_ext.benchmark import BenchmarkSettings, load_data
    from cryoal_ext.labels import Label
    from cryoal_ext.learner import ActiveLearner
    from cryoal_ext.recipes import get_recipe

    d = DATA / "empiar10028"
    s = BenchmarkSettings(micrographs=str(d / "micrographs"), truth=str(d / "particles.txt"), radius_px=28.0,
                          cache_dir=cache_dir, feature_model=fm)
    data = load_data(s, progress=lambda *_: None)
    names = sorted(data["items"])
    train = sorted(np.random.default_rng(0).choice(names, size=2, replace=False).tolist())
    rng = np.random.default_rng(1)
    labels = []
    for n in train:
        tx, ty = data["truth"][n]
        labels += [Label(n, float(x), float(y), 1) for x, y in zip(tx, ty)]
        ny, nx = data["items"][n].mic.frame.original_shape
        for x, y in rng.uniform(0, [nx, ny], size=(200, 2)):
            if np.min(np.hypot(tx - x, ty - y)) > 28.0:
                labels.append(Label(n, float(x), float(y), 0))
    learner = ActiveLearner([data["items"][n] for n in train], 28.0, get_recipe("default"), fm)
    model = learner.fit(labels)
    path = model.save(out / "model.npz")
    return path, train, [n for n in names if n not in train]


def ap_check(model_path: Path, evals: list[str], cache_dir: str, fm: str) -> dict:
    """AP of the streaming engine vs the old cached-feature path on the same micrographs."""
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.metrics import evaluate
    from cryoal_ext.model import BLR
    from cryoal_ext.predict import PredictSettings, stream_predict
    from cryoal_ext.workflow import EngineSettings, MicrographSpec, featurise, predict

    d = DATA / "empiar10028"
    truth = by_micrograph(read_coordinates(d / "particles.txt"))
    model = BLR.load(model_path)
    files = [d / "micrographs" / f"{n}.mrc" for n in evals]
    s = EngineSettings(radius_px=28.0, cache_dir=cache_dir, feature_model=fm)
    old = {it.mic.name: (p.x, p.y, p.score) for it, p in
           predict(featurise([MicrographSpec(str(f), f.stem) for f in files], s, progress=lambda *_: None), model, 28.0)}
    new = {r.name: (r.picks.x, r.picks.y, r.picks.score) for r in
           stream_predict([(f.stem, str(f), f.stem, None) for f in files], model, lambda *_: 28.0, PredictSettings(feature_model=fm))}
    a_old, a_new = evaluate(old, truth, 28.0).ap, evaluate(new, truth, 28.0).ap
    return {"micrographs": evals, "ap_old_float16_features": round(a_old, 4), "ap_stream_float32": round(a_new, 4),
            "diff": round(abs(a_old - a_new), 4)}


def run_topaz_extract(paths: list[str], radius_w: int, out: Path) -> float:
    from topaz.commands import extract

    args = extract.add_arguments().parse_args(
        ["-m", "resnet16_u32", "-r", str(radius_w), "-t", f"{np.log(1e-4 / (1 - 1e-4)):.3f}", "-d", "-1",
         "-o", str(out), *paths])
    t = time.perf_counter()
    extract.main(args)
    return time.perf_counter() - t


def run_old_predict(files: list[Path], model_path: Path, out: Path, fm: str) -> float:
    from cryoal_ext.files import write_picks_star, write_topaz
    from cryoal_ext.model import BLR
    from cryoal_ext.workflow import EngineSettings, MicrographSpec, featurise, predict

    t = time.perf_counter()
    model = BLR.load(model_path)
    s = EngineSettings(radius_px=28.0, cache_dir=None, feature_model=fm)
    allp = []
    for _, p in predict(featurise([MicrographSpec(str(f), f.stem) for f in files], s, progress=lambda *_: None),
                        model, 28.0):
        write_picks_star(out / f"{p.name}_picks.star", p)
        allp.append(p)
    write_topaz(out / "picks.txt", allp)
    return time.perf_counter() - t


def run_cryoal_predict(files: list[Path], model_path: Path, out: Path, normalisation: str,
                       threads: int | None) -> tuple[float, dict]:
    """`cryoal predict` in-process with one normalisation: (seconds, seconds per stage summed over micrographs)."""
    import contextlib
    import io as _io

    from cryoal_ext import cli

    args = ["predict", *map(str, files), "--model", str(model_path), "--radius-px", "28", "--out-dir", str(out),
            "--no-progress"] + (["--threads", str(threads)] if threads else [])
    before = os.environ.get("CRYOAL_NORMALISATION")
    os.environ["CRYOAL_NORMALISATION"] = normalisation
    buf = _io.StringIO()
    try:
        t = time.perf_counter()
        with contextlib.redirect_stdout(buf):
            rc = cli.main(args)
        dt = time.perf_counter() - t
    finally:
        if before is None:
            os.environ.pop("CRYOAL_NORMALISATION", None)
        else:
            os.environ["CRYOAL_NORMALISATION"] = before
    assert rc == 0, buf.getvalue()
    line = next((ln for ln in buf.getvalue().splitlines() if ln.startswith("seconds per stage")), "")
    stages = {k: float(v) for k, v in (item.rsplit(" ", 1) for item in line.split(": ", 1)[-1].split(", ") if " " in item)}
    return dt, stages


def print_table(around: dict, times: dict, stages: dict, norms: list[str], n: int) -> None:
    """Network-only (mean of the timings just before and after) vs end to end, and the stages, per normalisation."""
    order = ("read", "crop", "normalise", "network", "nms", "write")
    print(f"\n{'':28s}" + "".join(f"{nm:>14s}" for nm in norms))
    print(f"{'network only (s)':28s}" + "".join(f"{around[nm]:14.2f}" for nm in norms))
    print(f"{'end to end (s)':28s}" + "".join(f"{times[f'cryoal_predict[{nm}]']:14.2f}" for nm in norms))
    print(f"{'end to end / network':28s}" + "".join(f"{times[f'cryoal_predict[{nm}]'] / around[nm]:14.3f}" for nm in norms))
    for k in order:
        print(f"{'  ' + k + ' (s, summed)':28s}" + "".join(f"{stages[nm].get(k, float('nan')):14.2f}" for nm in norms))
    print(f"({n} micrographs; stages overlap: reading + normalising run in a thread beside the network)", flush=True)


def peak_rss_kib(files: list[Path], model_path: Path, tmp: Path, n: int) -> int:
    """Peak RSS (KiB) of one `cryoal predict` subprocess over n micrographs (real ones, repeated)."""
    folder = tmp / f"mics_{n}"
    folder.mkdir()
    for k in range(n):
        src = files[k % len(files)]
        (folder / f"r{k // len(files):03d}_{src.name}").symlink_to(src)
    cmd = [sys.executable, "-m", "cryoal_ext.cli", "predict", str(folder), "--model", str(model_path),
           "--radius-px", "28", "--out-dir", str(tmp / f"out_{n}"), "--no-progress"]
    got = subprocess.run([sys.executable, "-c", RSS_WRAPPER, *cmd], check=True, capture_output=True, text=True)
    return int(got.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=10, help="micrographs for the speed comparison (real ones, both datasets)")
    ap.add_argument("--memory-n", default="5,50")
    ap.add_argument("--skip-topaz", action="store_true")
    ap.add_argument("--skip-old", action="store_true")
    ap.add_argument("--skip-memory", action="store_true")
    ap.add_argument("--skip-ap", action="store_true")
    ap.add_argument("--feature-model", default="resnet16_u32",
                    help="features of the model (default one view, the same network work as topaz extract)")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--normalisations", default="gmm,gmm-sample",
                    help="end to end once per io.normalise method, side by side (new histogram fit, old 1-in-10 fit)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads for cryoal predict (default: torch's)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "predict_speed.json"))
    a = ap.parse_args()

    import torch

    from cryoal_ext.io import load_micrograph

    # alternate datasets so any n mixes both working shapes
    by_ds = [sorted(d.glob("*.mrc")) for d in DATASETS]
    files = [f for pair in zip(*by_ds) for f in pair] + [f for ds in by_ds for f in ds[len(min(by_ds, key=len)):]]
    speed_files = files[: a.n]
    result: dict = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                    "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                                "python": platform.python_version(), "torch": torch.__version__,
                                "cuda": torch.cuda.is_available(),
                                "note": "2 CPU cores shared with other jobs; compare ratios within one run"}}
    with tempfile.TemporaryDirectory(prefix="cryoal_predict_bench_") as tmpd:
        tmp = Path(tmpd)
        model_path, train, evals = train_model(tmp, a.cache_dir, a.feature_model)
        result["model"] = {"trained_on": train, "feature_model": a.feature_model}
        if not a.skip_ap:
            result["ap"] = ap_check(model_path, evals, a.cache_dir, a.feature_model)
            print("AP:", result["ap"], flush=True)

        from cryoal_ext.model import BLR
        from cryoal_ext.predict import backbone_seconds

        model = BLR.load(model_path)
        mics = [load_micrograph(f) for f in speed_files]
        images = [m.image for m in mics]
        shapes = sorted({m.image.shape for m in mics})
        backbone_seconds([images[0][:256, :256]], model, a.feature_model)  # warm-up
        times: dict[str, float] = {}
        stages: dict[str, dict] = {}
        norms = [n for n in a.normalisations.split(",") if n]
        # the network alone before and after each end-to-end run: on a shared machine the load drifts, so each
        # end-to-end time is compared with the mean of the two network timings around it
        nets = [backbone_seconds(images, model, a.feature_model)]
        times["backbone_1"] = nets[0]
        print(f"network only: {nets[0]:.1f} s for {len(images)} micrographs {shapes}", flush=True)
        around: dict[str, float] = {}
        for norm in norms:
            key = f"cryoal_predict[{norm}]"
            t, stages[norm] = run_cryoal_predict(speed_files, model_path, tmp / f"ours_{norm}", norm, a.threads)
            times[key] = t
            nets.append(backbone_seconds(images, model, a.feature_model))
            around[norm] = 0.5 * (nets[-2] + nets[-1])
            print(f"cryoal predict, normalisation {norm}: {t:.1f} s; network only after it: {nets[-1]:.1f} s; "
                  f"stages {stages[norm]}", flush=True)
        if not a.skip_topaz:
            import mrcfile

            tin = tmp / "topaz_in"
            tin.mkdir()
            paths = []
            for m in mics:
                p = tin / f"{m.name}.mrc"
                with mrcfile.new(p) as mrc:
                    mrc.set_data(m.image.astype(np.float32))
                paths.append(str(p))
            radius_w = int(round(mics[0].frame.radius_to_working(28.0)))
            times["topaz_extract"] = run_topaz_extract(paths, radius_w, tmp / "topaz.txt")
            print(f"topaz extract: {times['topaz_extract']:.1f} s", flush=True)
        if not a.skip_old:
            (tmp / "old").mkdir()
            times["old_predict"] = run_old_predict(speed_files, model_path, tmp / "old", a.feature_model)
            print(f"old predict: {times['old_predict']:.1f} s", flush=True)
        times["backbone_2"] = backbone_seconds(images, model, a.feature_model)
        bare = 0.5 * (times["backbone_1"] + times["backbone_2"])
        result["speed"] = {
            "micrographs": [f.name for f in speed_files], "working_shapes": [list(s) for s in shapes],
            "seconds": {k: round(v, 2) for k, v in times.items()},
            "network_only_s": round(bare, 2), "network_only_each_s": [round(v, 2) for v in nets],
            "network_only_around_s": {n: round(v, 2) for n, v in around.items()},
            "end_to_end_over_network": {n: round(times[f"cryoal_predict[{n}]"] / around[n], 3) for n in norms},
            "micrographs_per_s": {n: round(len(speed_files) / times[f"cryoal_predict[{n}]"], 3) for n in norms},
            "stage_seconds_summed": stages,
        }
        main_t = times.get(f"cryoal_predict[{norms[0]}]") if norms else None
        if "topaz_extract" in times and main_t:
            result["speed"]["topaz_extract_over_cryoal_predict"] = round(times["topaz_extract"] / main_t, 3)
            result["speed"]["topaz_extract_over_backbone"] = round(times["topaz_extract"] / bare, 3)
        if "old_predict" in times and main_t:
            result["speed"]["old_predict_over_cryoal_predict"] = round(times["old_predict"] / main_t, 3)
        print_table(around, times, stages, norms, len(speed_files))
        print("speed:", json.dumps(result["speed"]), flush=True)
        if not a.skip_memory:
            ns = [int(v) for v in a.memory_n.split(",")]
            rss = {str(n): peak_rss_kib(files, model_path, tmp, n) for n in ns}
            result["memory"] = {"peak_rss_mib": {n: round(v / 1024, 1) for n, v in rss.items()},
                                "ratio_largest_over_smallest": round(rss[str(max(ns))] / rss[str(min(ns))], 3),
                                "micrographs": f"the {len(files)} real micrographs repeated under new names"}
            print("memory:", result["memory"], flush=True)
    write_json(a.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
