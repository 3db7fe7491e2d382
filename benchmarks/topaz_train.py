"""The peer a user would pick instead (issue 16, item 6): `topaz train` + `topaz extract`, as rows of the benchmark.

For each dataset and seed (the seed draws the 2 training micrographs, as in `cryoal benchmark`), three
Topaz models are scored on the evaluation micrographs with the benchmark's own matching and pooled AP:

* ``topaz pretrained``: `topaz extract -m resnet16`, Topaz's CLI default, which is ``resnet16_u64``
  (topaz/model/factory.py), not the ``resnet16_u32`` our one-view features and `topaz train --units 32`
  start from; and ``topaz pretrained_u32``: `topaz extract -m resnet16_u32`, the same network as
  our baseline (the two differ only in Topaz's own extraction);
* ``topaz train (our answers @B)``: `topaz train` on the positive answers our loop (default recipe,
  careful oracle) had collected at budget B, on the same 2 training micrographs;
* ``topaz train (all expert picks)``: `topaz train` on every expert pick of the 2 training micrographs.

Topaz sees the very images our features are computed from: each micrograph Fourier-cropped to the
working pixel size (~8 A/px) and normalised as `topaz preprocess` does (`cryoal_ext.io.load_micrograph`),
written as MRC; coordinates are converted with the micrograph's `Frame` both ways. `topaz train`
starts from the pretrained ResNet16 (`-m resnet16 --units 32`, its default `--pretrained`), with
`-n` = the true mean particle count of the training micrographs (a user's estimate at its best), the
GE-binomial objective and radius 3 (Topaz's defaults), and a bounded schedule on the CPU
(``--epochs`` x ``--epoch-size`` minibatches of 256; Topaz's default is 10 x 1000). The last epoch's
model is used (no test set to pick one: the evaluation micrographs stay unseen).

topaz-em needs torchvision, which does not import beside this project's CPU torch 2.13 wheel, so
Topaz runs from its own venv (``--topaz``):

    python3 -m venv /work/topaz-venv && /work/topaz-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 topaz-em==0.3.20
    python benchmarks/topaz_train.py --topaz /work/topaz-venv/bin/topaz --datasets 10028,10017 --seeds 0 \
        --budgets 25,100 --epochs 10 --epoch-size 100
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

import mrcfile
import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))
from accuracy import DATASETS  # noqa: E402

from cryoal_ext.atomic import write_json  # noqa: E402
from cryoal_ext.benchmark import BenchmarkSettings, load_data, run_one, training_splits  # noqa: E402
from cryoal_ext.metrics import evaluate  # noqa: E402
from cryoal_ext.recipes import get_recipe  # noqa: E402


def write_images(items: dict, folder: Path, names: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for n in names:
        with mrcfile.new(folder / f"{n}.mrc", overwrite=True) as m:
            m.set_data(np.ascontiguousarray(items[n].mic.image, dtype=np.float32))
            m.voxel_size = items[n].mic.frame.working_pixel_size


def write_targets(path: Path, items: dict, points: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    rows = []
    for n, (x, y) in points.items():
        wx, wy = items[n].mic.frame.to_working(x, y)
        rows += [(n, int(round(a)), int(round(b))) for a, b in zip(wx, wy)]
    pd.DataFrame(rows, columns=["image_name", "x_coord", "y_coord"]).to_csv(path, sep="\t", index=False)
    return len(rows)


def topaz(exe: str, *args: str, log: Path) -> float:
    t = time.perf_counter()
    with open(log, "a") as f:
        f.write("$ topaz " + " ".join(args) + "\n")
        f.flush()
        subprocess.run([exe, *args], check=True, stdout=f, stderr=subprocess.STDOUT)
    return time.perf_counter() - t


def score_extract(out: Path, items: dict, truth: dict, s: BenchmarkSettings, evals: list[str]) -> dict:
    t = pd.read_csv(out, sep="\t")
    preds = {}
    for n in evals:
        sub = t[t.image_name == n]
        x, y = items[n].mic.frame.to_original(sub.x_coord.to_numpy(float), sub.y_coord.to_numpy(float))
        preds[n] = (x, y, sub.score.to_numpy(float))
    shapes = {n: items[n].mic.frame.original_shape for n in evals}
    ev = evaluate(preds, {n: truth[n] for n in evals if n in truth}, s.radius_px, shapes=shapes, border=s.border_px)
    return {"ap": round(ev.ap, 4), "recall": round(ev.recall, 4), "picks": int(ev.tp.size)}


def extract(exe: str, model: str, items: dict, evals: list[str], img: Path, out: Path, s: BenchmarkSettings,
            log: Path, threads: int) -> float:
    r = max(1, int(round(items[evals[0]].mic.frame.radius_to_working(s.radius_px))))
    return topaz(exe, "extract", "-m", model, "-r", str(r), "-t", "-10", "-d", "-1", "-j", str(threads),
                 "-o", str(out), *[str(img / f"{n}.mrc") for n in evals], log=log)


def train(exe: str, work: Path, tag: str, items: dict, train_names: list[str], targets: dict, n_per_mic: float,
          a, log: Path) -> tuple[str, float, int]:
    tf = work / f"targets_{tag}.txt"
    n = write_targets(tf, items, targets)
    lst = work / f"train_{tag}.txt"
    lst.write_text("image_name\tpath\n" + "".join(f"{m}\t{work / 'images' / (m + '.mrc')}\n" for m in train_names))
    prefix = work / f"model_{tag}"
    secs = topaz(a.topaz, "train", "--train-images", str(lst), "--train-targets", str(tf), "-m", "resnet16",
                 "--units", "32", "-n", f"{n_per_mic:.1f}", "--num-epochs", str(a.epochs), "--epoch-size",
                 str(a.epoch_size), "--minibatch-size", str(a.minibatch), "-d", "-1", "-j", str(a.threads),
                 "--save-prefix", str(prefix), "-o", str(work / f"curve_{tag}.txt"), log=log)
    return f"{prefix}_epoch{a.epochs}.sav", secs, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--topaz", required=True, help="the topaz executable (its own venv, see the module docstring)")
    ap.add_argument("--datasets", default="10028,10017")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--splits", default="seed",
                    help="'seed' (each seed draws its training micrographs) or comma-separated split indices, "
                         "numbered as `cryoal benchmark --splits all` numbers them (the JSONs' 'split')")
    ap.add_argument("--budgets", default="25,100")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--epoch-size", type=int, default=100)
    ap.add_argument("--minibatch", type=int, default=256)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--feature-model", default="resnet16_u32")
    ap.add_argument("--cache-dir", default=os.environ.get("CRYOAL_CACHE", "/tmp/fcache"))
    ap.add_argument("--work", default=None, help="keep Topaz's inputs and models here (default: a temporary folder)")
    ap.add_argument("--tag", default="run")
    ap.add_argument("--pretrained-only", action="store_true", help="only the two `topaz extract` rows (no training)")
    ap.add_argument("--models", default="answers,experts",
                    help="which `topaz train` models: answers (one per budget), experts (all expert picks), or both")
    a = ap.parse_args()
    budgets = tuple(int(b) for b in a.budgets.split(","))
    out = {"command": "python benchmarks/topaz_train.py " + " ".join(sys.argv[1:]), "results": {}}
    root = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="topaz_train_"))
    for ds in a.datasets.split(","):
        s = BenchmarkSettings(**DATASETS[ds], budgets=budgets, feature_model=a.feature_model, cache_dir=a.cache_dir,
                              calibrate=False)
        data = load_data(s, progress=lambda m: None)
        items, truth = data["items"], data["truth"]
        rows = []
        every = training_splits(sorted(items), BenchmarkSettings(**DATASETS[ds], splits="all"))
        chosen = [None] if a.splits == "seed" else [int(i) for i in a.splits.split(",")]
        for split, seed in ((i, int(x)) for i in chosen for x in a.seeds.split(",")):
            work = root / (f"{ds}_seed{seed}" if split is None else f"{ds}_split{split}_seed{seed}")
            log = work / "topaz.log"
            work.mkdir(parents=True, exist_ok=True)
            labels_at: dict = {}
            rec = run_one(s, get_recipe("default"), seed, data, progress=print, labels_at=labels_at,
                          train=None if split is None else every[split])
            tr, evals = rec["train"], rec["eval"]
            write_images(items, work / "images", sorted(items))
            n_mean = float(np.mean([len(truth.get(n, ([], []))[0]) for n in tr]))
            row = {"seed": seed, "split": split, "train": tr, "eval": evals, "ours_baseline": rec["baseline"]["ap"],
                   "ours": {str(x["labels"]): x["ap"] for x in rec["active"]}, "topaz": {}}
            for key, net in (("pretrained", "resnet16"), ("pretrained_u32", "resnet16_u32")):
                o = work / f"extract_{key}.txt"
                secs = extract(a.topaz, net, items, evals, work / "images", o, s, log, a.threads)
                row["topaz"][key] = {**score_extract(o, items, truth, s, evals), "extract_s": round(secs, 1)}
                print(f"[{ds} seed {seed}] topaz {key} (-m {net}): {row['topaz'][key]}  (ours: {rec['baseline']['ap']})")
            if a.pretrained_only:
                rows.append(row)
                continue
            models = set(a.models.split(","))
            runs = {f"answers@{b}": {n: (np.array([l.x for l in labels_at[b] if l.micrograph == n and l.label == 1]),
                                         np.array([l.y for l in labels_at[b] if l.micrograph == n and l.label == 1]))
                                     for n in tr} for b in budgets if b in labels_at and "answers" in models}
            if "experts" in models:
                runs["all_expert_picks"] = {n: truth.get(n, (np.empty(0), np.empty(0))) for n in tr}
            for tag, pts in runs.items():
                model, t_train, n_pos = train(a.topaz, work, tag, items, tr, pts, n_mean, a, log)
                o = work / f"extract_{tag}.txt"
                t_ext = extract(a.topaz, model, items, evals, work / "images", o, s, log, a.threads)
                row["topaz"][tag] = {**score_extract(o, items, truth, s, evals), "positives": n_pos,
                                     "train_s": round(t_train, 1), "extract_s": round(t_ext, 1)}
                print(f"[{ds} seed {seed}] topaz train {tag}: {row['topaz'][tag]}")
            rows.append(row)
        out["results"][ds] = rows
        write_json(Path(__file__).resolve().parent / "results" / f"topaz_train_{a.tag}.json", out)
    print(json.dumps(out["results"], indent=1))


if __name__ == "__main__":
    main()
