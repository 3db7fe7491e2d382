"""GPU prediction (issue 6, target 5): micrographs/s at a 1024x1024 working size, fp32 vs half, AP check.

Data: the ten real micrographs of ``$DATA`` (EMPIAR-10028: 4 x 1024^2 at 5.36 A/px; EMPIAR-10017:
6 x 1024^2 at 7.08 A/px), each read at its own pixel size as the working pixel size, so the
network sees the real 1024x1024 images (no Fourier cropping; ``load_micrograph`` still
GMM-normalises them).  Timings cycle through these ten images.

Per feature model (``--feature-models``, default resnet16_u32):

* a BLR is fitted (the ``default`` recipe, on the ``--device``) to the expert picks of 10028
  micrographs 311 and 312 plus random negatives, at this working size;
* **AP** of the streaming engine (``stream_predict``: read, normalise, network, NMS) for each
  precision, against the expert picks via ``cryoal_ext.metrics.evaluate``:
  ``blr_10028`` = that BLR on the held-out 10028 micrographs 061 and 062 (radius 28 px);
  ``pretrained_10028`` / ``pretrained_10017`` = Topaz's own head on all micrographs of each set
  (radius 28 / 13.5 px; 10017 ignores a 20 px border band, as its README says);
  the half-precision AP must be within 0.005 of fp32 (``ok`` in the output);
* **speed of the network**: ``predict.backbone_seconds`` (host->device copy, forward pass with
  the BLR head folded in, logits back to the host), batch sizes ``--batch-sizes``, precisions
  ``--precisions``, median of ``--repeats`` over ``--timed`` images, after a warm-up batch;
* **end to end** (``--e2e N``): ``stream_predict`` over N micrograph files (the real ones under
  repeated names): MRC read, GMM normalisation, network, NMS, in the reader/compute/NMS pipeline;
* **CPU on the same machine** (``--cpu-n N``): the same network on the CPU, float32, batch 1,
  all cores.

**Issue 15, part 2** (``--pipeline N``; only this part runs): network only against the real
``cryoal predict`` (read, Fourier crop, normalise, network, NMS, writing) in one run, on N files
(the real ones of ``--pipeline-set``, repeated under new names) at ``--pipeline-wps`` (``native``:
1024^2, nothing to crop; ``8``: 686^2 for 10028, a real crop), Topaz's head, per config
batch:precision:view_batch:stages; prints both rates, their ratio (target >= 0.7) and the
per-stage milliseconds per micrograph, and writes them to ``--out``.

Precisions: ``fp32`` is torch's default on the device (on CUDA, cuDNN may use TF32 for float32
convolutions: ``torch.backends.cudnn.allow_tf32`` is True by default); ``fp32-strict`` turns TF32
off (CUDA only, the exact reference); ``fp16`` / ``bf16`` run the backbone under autocast, the
head in float32 (``predict.picking_net``).  fp16 is refused on the CPU.

    python benchmarks/gpu_predict.py                                  # on a GPU machine
    python benchmarks/gpu_predict.py --feature-models resnet16_u32,resnet16_u64 --e2e 64
    python benchmarks/gpu_predict.py --device cpu --timed 2 --repeats 1 --batch-sizes 1,2 \\
        --precisions fp32,bf16 --cpu-n 0 --ap-sets blr_10028     # a small CPU run (tests the script)
    python benchmarks/gpu_predict.py --pipeline 64 --pipeline-wps native      # issue 15: network vs end to end, GPU
    python benchmarks/gpu_predict.py --device cpu --pipeline 2 --pipeline-wps 32 \
        --pipeline-model resnet16_u32+views2 --pipeline-configs 1:fp32:8:on,1:fp32:0:off   # its CPU dry run
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from cryoal_ext.atomic import write_json

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(os.environ.get("CRYOAL_TEST_DATA", ROOT.parent / "shared" / "data"))
TRAIN, HELD_OUT = ["311_10028", "312_10028"], ["061_10028", "062_10028"]
SETS = {  # name: (dataset folder, radius in px, border band in px)
    "10028": ("empiar10028", 28.0, 0.0),
    "10017": ("empiar10017", 13.5, 20.0),
}


def log(*a) -> None:
    print(*a, flush=True)


def header_pixel_size(path: Path) -> float:
    from cryoal_ext.io import read_mrc

    return float(read_mrc(path)[1])


def dataset_files(data: Path, key: str) -> list[Path]:
    return sorted((data / SETS[key][0] / "micrographs").glob("*.mrc"))


def fit_blr(data: Path, feature_model: str, device: str, wps: float, out: Path):
    """A BLR on the expert picks of TRAIN (+ random negatives beyond the radius), at working pixel size wps."""
    from cryoal_ext.features import FeatureMap, compute_features_batch
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.io import load_micrograph
    from cryoal_ext.labels import Label
    from cryoal_ext.learner import ActiveLearner, Item
    from cryoal_ext.recipes import get_recipe

    d = data / "empiar10028"
    truth = by_micrograph(read_coordinates(d / "particles.txt"))
    mics = [load_micrograph(d / "micrographs" / f"{n}.mrc", wps) for n in TRAIN]
    t = time.perf_counter()
    feats = compute_features_batch([m.image for m in mics], feature_model, device, batch_size=2)
    items = [Item(m, FeatureMap(f, s)) for m, (f, s) in zip(mics, feats)]
    rng = np.random.default_rng(1)
    labels = []
    for m in mics:
        tx, ty = truth[m.name]
        labels += [Label(m.name, float(x), float(y), 1) for x, y in zip(tx, ty)]
        ny, nx = m.frame.original_shape
        for x, y in rng.uniform(0, [nx, ny], size=(200, 2)):
            if np.min(np.hypot(tx - x, ty - y)) > 28.0:
                labels.append(Label(m.name, float(x), float(y), 0))
    model = ActiveLearner(items, 28.0, get_recipe("default"), feature_model=feature_model).fit(labels)
    path = model.save(out / f"blr_{feature_model}.npz", feature_model=feature_model)
    log(f"[{feature_model}] BLR fitted on {TRAIN} ({len(labels)} labels) in {time.perf_counter() - t:.1f} s")
    return model, path


def predictions(files: list[Path], model, radius: float, wps: float, settings) -> tuple[dict, dict, float]:
    from cryoal_ext.predict import stream_predict

    t = time.perf_counter()
    preds, shapes = {}, {}
    for r in stream_predict([(f.stem, str(f), f.stem, None) for f in files], model, lambda *_: radius, settings):
        if r.picks is None:
            raise RuntimeError(f"{r.name}: {r.error}")
        preds[r.name] = (r.picks.x, r.picks.y, r.picks.score)
        shapes[r.name] = r.shape
    return preds, shapes, time.perf_counter() - t


def ap_table(data: Path, feature_model: str, model, precisions: list[str], device: str, wps: dict, sets: list[str],
             batch: int) -> dict:
    """AP per evaluation set and precision, via the streaming engine; half vs fp32 within 0.005."""
    from cryoal_ext.files import by_micrograph, read_coordinates
    from cryoal_ext.metrics import evaluate
    from cryoal_ext.predict import PredictSettings

    out: dict = {}
    for name in sets:
        key = name.split("_")[1]
        folder, radius, border = SETS[key]
        files = dataset_files(data, key)
        head = None
        if name.startswith("blr"):
            files = [f for f in files if f.stem in HELD_OUT]
            head = model
        truth = by_micrograph(read_coordinates(data / folder / "particles.txt"))
        row: dict = {"micrographs": [f.stem for f in files], "radius_px": radius, "border_px": border}
        picks = {}
        for p in precisions:
            with strict_fp32(p, device):
                s = PredictSettings(feature_model=feature_model, working_pixel_size=wps[key], device=device,
                                    batch_size=batch, precision=p.replace("-strict", ""), min_score=1e-4)
                preds, shapes, dt = predictions(files, head, radius, wps[key], s)
            e = evaluate(preds, truth, radius, shapes=shapes, border=border)
            row[p] = {"ap": round(e.ap, 4), "recall": round(e.recall, 4), "n_pred": e.n_pred, "seconds": round(dt, 2)}
            picks[p] = preds
        ref = "fp32-strict" if "fp32-strict" in row else "fp32"
        for p in precisions:
            if p != ref and ref in row:
                row[p]["ap_diff_vs_" + ref] = round(row[p]["ap"] - row[ref]["ap"], 4)
                row[p]["ok"] = bool(abs(row[p]["ap"] - row[ref]["ap"]) <= 0.005)
                row[p]["same_top100_picks"] = same_top(picks[ref], picks[p], 100)
        out[name] = row
        log(f"[{feature_model}] AP {name}: " + ", ".join(f"{p} {row[p]['ap']:.4f}" for p in precisions))
    return out


def same_top(a: dict, b: dict, k: int) -> float:
    """Fraction of each micrograph's k best picks that are at the same pixel in both runs (mean over micrographs)."""
    fr = []
    for n in a:
        ia, ib = np.argsort(-a[n][2])[:k], np.argsort(-b[n][2])[:k]
        sa = {(round(float(a[n][0][i]), 1), round(float(a[n][1][i]), 1)) for i in ia}
        sb = {(round(float(b[n][0][i]), 1), round(float(b[n][1][i]), 1)) for i in ib}
        fr.append(len(sa & sb) / max(len(sa), 1))
    return round(float(np.mean(fr)), 4)


class strict_fp32:
    """'fp32-strict': TF32 off for cuDNN and matmuls inside the block (CUDA only)."""

    def __init__(self, precision: str, device: str):
        self.on = precision == "fp32-strict"
        if self.on and not device.startswith("cuda"):
            raise ValueError("fp32-strict is a CUDA variant; on the CPU fp32 is already strict")

    def __enter__(self):
        import torch

        if self.on:
            self.saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
            torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        import torch

        if self.on:
            torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = self.saved


def speed_table(images: list[np.ndarray], model, feature_model: str, device: str, precisions: list[str],
                batch_sizes: list[int], timed: int, repeats: int, channels_last: list[bool]) -> list[dict]:
    import torch

    from cryoal_ext.predict import backbone_seconds, picking_net

    rows = []
    work = [images[i % len(images)] for i in range(timed)]
    if device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True  # as stream_predict sets it on CUDA
    for p in precisions:
        for cl in channels_last:
            with strict_fp32(p, device):
                net = picking_net(model, feature_model, device, precision=p.replace("-strict", ""), channels_last=cl)
                for b in batch_sizes:
                    if device.startswith("cuda"):
                        torch.cuda.empty_cache()
                        torch.cuda.reset_peak_memory_stats()
                    backbone_seconds(work[:b], device=device, batch_size=b, net=net)  # warm-up (cuDNN autotune)
                    ts = [backbone_seconds(work, device=device, batch_size=b, net=net) for _ in range(repeats)]
                    med = statistics.median(ts)
                    row = {"precision": p, "channels_last": cl, "batch": b, "images": len(work),
                           "seconds": [round(t, 3) for t in ts], "mic_per_s": round(len(work) / med, 2),
                           "ms_per_mic": round(1000 * med / len(work), 2)}
                    if device.startswith("cuda"):
                        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
                    rows.append(row)
                    log(f"[{feature_model}] net {p:11s} cl={int(cl)} batch {b}: {row['mic_per_s']:8.2f} mic/s "
                        f"({row['ms_per_mic']:.1f} ms/mic)" + (f", peak {row['peak_gpu_mib']} MiB" if 'peak_gpu_mib' in row else ""))
            del net
    return rows


def e2e_table(files: list[Path], model, feature_model: str, device: str, wps: dict, n: int, configs: list[dict]) -> list[dict]:
    """stream_predict over n micrograph files (the real ones, repeated under new names)."""
    from cryoal_ext.predict import PredictSettings, stream_predict

    rows = []
    for cfg in configs:
        inputs = []
        for i in range(n):
            f = files[i % len(files)]
            inputs.append((f"r{i:04d}_{f.stem}", str(f), f"r{i:04d}_{f.stem}", None))
        key_of = {f.stem: ("10028" if "10028" in str(f) else "10017") for f in files}
        # one working pixel size per dataset: run each dataset's files as their own stream
        t = time.perf_counter()
        got = 0
        for key in ("10028", "10017"):
            sub = [x for x in inputs if key_of[Path(x[1]).stem] == key]
            if not sub:
                continue
            s = PredictSettings(feature_model=feature_model, working_pixel_size=wps[key], device=device, **cfg)
            for r in stream_predict(sub, model if key == "10028" else None, lambda *_: SETS[key][1], s):
                got += r.picks is not None
        dt = time.perf_counter() - t
        row = {**cfg, "micrographs": n, "seconds": round(dt, 2), "mic_per_s": round(n / dt, 2)}
        rows.append(row)
        log(f"[{feature_model}] end-to-end {cfg}: {row['mic_per_s']:.2f} mic/s ({dt:.1f} s for {n})")
        assert got == n
    return rows


STAGES = ("read", "crop", "normalise", "network", "nms", "write")


def run_predict_command(files: list[Path], out: Path, device: str, fm: str, wps: float, radius: float, cfg: dict) -> tuple[float, dict, str]:
    """`cryoal predict` in-process (writes included): (seconds, seconds per stage summed, its output)."""
    import contextlib
    import io as _io

    from cryoal_ext import cli

    args = ["predict", *map(str, files), "--radius-px", str(radius), "--out-dir", str(out), "--no-progress",
            "--overwrite", "--device", device, "--feature-model", fm, "--working-pixel-size", str(wps),
            "--batch-size", str(cfg["batch"]), "--precision", cfg["precision"], "--view-batch", str(cfg["view_batch"]),
            "--gpu-crop", cfg["stages"], "--device-nms", cfg["stages"], "--format", "txt"]
    if cfg.get("readers"):
        args += ["--readers", str(cfg["readers"])]
    buf = _io.StringIO()
    t = time.perf_counter()
    with contextlib.redirect_stdout(buf):
        rc = cli.main(args)
    dt = time.perf_counter() - t
    if rc != 0:
        raise RuntimeError(f"cryoal predict failed (rc {rc}):\n{buf.getvalue()}")
    line = next((ln for ln in buf.getvalue().splitlines() if ln.startswith("seconds per stage")), "")
    stages = {k: float(v) for k, v in (x.rsplit(" ", 1) for x in line.split(": ", 1)[-1].split(", ") if " " in x)}
    return dt, stages, buf.getvalue()


def pipeline_table(data: Path, device: str, a) -> dict:
    """Issue 15, part 2: network only vs `cryoal predict` end to end, same micrographs and settings, one run.

    Per config (batch:precision:view_batch:stages, stages = auto|on|off for the GPU crop + device NMS):
    the network alone (``backbone_seconds``, the working images in memory, the same ``picking_net``
    settings) before and after `cryoal predict` over N files (the real ones, repeated under new
    names; a 2-file warm-up run first, so cuDNN's autotuning is not in the timing); the ratio is
    end-to-end rate / network-only rate (the mean of the two network timings).
    """
    import tempfile

    import torch

    from cryoal_ext.io import load_micrograph
    from cryoal_ext.predict import backbone_seconds, picking_net

    keys = ["10028", "10017"] if a.pipeline_set == "both" else [a.pipeline_set]
    src = [f for k in keys for f in dataset_files(data, k)]
    if not src:
        raise SystemExit(f"no micrographs for --pipeline-set {a.pipeline_set} under {data}")
    if a.pipeline_wps == "native":
        if len(keys) > 1:
            raise SystemExit("--pipeline-set both needs a numeric --pipeline-wps (the sets differ in pixel size)")
        wps = header_pixel_size(src[0])
    else:
        wps = float(a.pipeline_wps)
    radius = SETS[keys[0]][1]
    fm = a.pipeline_model
    n = a.pipeline
    cuda = device.startswith("cuda")
    mics = [load_micrograph(f, wps) for f in src]
    images = [m.image for m in mics]
    work = [images[i % len(images)] for i in range(n)]
    if cuda:
        torch.backends.cudnn.benchmark = True  # as stream_predict sets it
    out: dict = {"micrographs": n, "sources": [f.name for f in src], "working_pixel_size": wps,
                 "working_shapes": [list(s) for s in sorted({im.shape for im in images})], "feature_model": fm, "radius_px": radius,
                 "head": "Topaz's pretrained head (same network cost as a BLR head)", "configs": []}
    log(f"pipeline: {n} micrographs from {[f.name for f in src]} at {wps:.2f} A/px -> {out['working_shapes']}, {fm}")
    with tempfile.TemporaryDirectory(prefix="cryoal_gpu_pipeline_") as tmpd:
        tmp = Path(tmpd)
        folder = tmp / "mics"
        folder.mkdir()
        files = []
        for i in range(n):
            f = src[i % len(src)]
            link = folder / f"r{i:04d}_{f.name}"
            link.symlink_to(f.resolve())
            files.append(link)
        for i_cfg, spec in enumerate(a.pipeline_configs.split(",")):
            b, p, vb, st, *rd = spec.split(":")
            cfg = {"batch": int(b), "precision": p, "view_batch": int(vb), "stages": st,
                   "readers": int(rd[0]) if rd else None}
            net = picking_net(None, fm, device, precision=p, channels_last=cuda, view_batch=int(vb))
            backbone_seconds(work[: cfg["batch"]], device=device, batch_size=cfg["batch"], net=net)  # warm-up
            before = backbone_seconds(work, device=device, batch_size=cfg["batch"], net=net)
            run_predict_command(files[: min(2, n)], tmp / f"warm{i_cfg}", device, fm, wps, radius, cfg)  # warm-up
            e2e, stages, text = run_predict_command(files, tmp / f"out{i_cfg}", device, fm, wps, radius, cfg)
            after = backbone_seconds(work, device=device, batch_size=cfg["batch"], net=net)
            del net
            net_s = 0.5 * (before + after)
            row = {**cfg, "network_only_s": [round(before, 3), round(after, 3)], "network_mic_per_s": round(n / net_s, 3),
                   "end_to_end_s": round(e2e, 3), "end_to_end_mic_per_s": round(n / e2e, 3),
                   "ratio_end_to_end_over_network_rate": round(net_s / e2e, 3),
                   "stage_seconds_summed": {k: round(stages[k], 3) for k in STAGES if k in stages},
                   "stage_ms_per_micrograph": {k: round(1000 * stages[k] / n, 2) for k in STAGES if k in stages},
                   "command_output": text.strip().splitlines()[-3:]}
            out["configs"].append(row)
            log(f"  {spec}: network only {row['network_mic_per_s']:.2f} mic/s, end to end "
                f"{row['end_to_end_mic_per_s']:.2f} mic/s, ratio {row['ratio_end_to_end_over_network_rate']:.3f}; "
                "ms per micrograph (overlapping): " + ", ".join(f"{k} {v:.1f}" for k, v in row["stage_ms_per_micrograph"].items()))
    return out


def machine(device: str) -> dict:
    import torch

    m = {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
         "torch_threads": torch.get_num_threads(), "device": device}
    if device.startswith("cuda"):
        m.update(gpu=torch.cuda.get_device_name(device), cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), cudnn_allow_tf32_default=torch.backends.cudnn.allow_tf32)
    return m


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(DEFAULT_DATA), help="folder with empiar10028/ and empiar10017/")
    ap.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when present)")
    ap.add_argument("--feature-models", default="resnet16_u32")
    ap.add_argument("--precisions", default=None,
                    help="comma-separated; default fp32,fp32-strict,fp16,bf16 on CUDA, fp32,bf16 on the CPU")
    ap.add_argument("--batch-sizes", default="1,4,8")
    ap.add_argument("--timed", type=int, default=None, help="images per timing (default 64 on CUDA, 2 on the CPU)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--channels-last", default=None,
                    help="comma-separated 0/1 to time (default 0,1 on CUDA, 0 on the CPU)")
    ap.add_argument("--ap-sets", default="blr_10028,pretrained_10028,pretrained_10017")
    ap.add_argument("--ap-batch", type=int, default=4)
    ap.add_argument("--e2e", type=int, default=None, help="micrographs for the end-to-end runs (default 32 on CUDA, 0 on CPU)")
    ap.add_argument("--e2e-configs", default=None,
                    help="batch:precision:readers,... (default 8:fp32:1,8:fp32:4,8:fp32:8,8:fp16:8 on CUDA)")
    ap.add_argument("--skip-network", action="store_true", help="no network timings (AP / end-to-end / CPU only)")
    ap.add_argument("--cpu-n", type=int, default=2, help="images for the CPU figure on this machine (0: skip)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_predict.json"))
    g = ap.add_argument_group("issue 15, part 2: network only vs cryoal predict end to end (only this part runs)")
    g.add_argument("--pipeline", type=int, default=0, metavar="N", help="micrographs for the comparison (0: off)")
    g.add_argument("--pipeline-set", default="10028", choices=("10028", "10017", "both"))
    g.add_argument("--pipeline-wps", default="native",
                   help="working pixel size: 'native' (the set's own: 1024^2, nothing to crop) or A/px (e.g. 8: a crop)")
    g.add_argument("--pipeline-model", default="resnet16_u32+views8")
    g.add_argument("--pipeline-configs", default=None,
                   help="batch:precision:view_batch:stages[:readers],... stages = auto|on|off (GPU crop + device NMS); "
                        "default on CUDA 1:fp16:8:auto,4:fp16:8:auto,4:fp16:0:auto,4:fp16:0:off")
    a = ap.parse_args()

    import torch

    from cryoal_ext.io import load_micrograph
    from cryoal_ext.predict import resolve_device

    device = resolve_device(a.device)
    cuda = device.startswith("cuda")
    data = Path(a.data)
    if a.pipeline > 0:
        a.pipeline_configs = a.pipeline_configs or ("1:fp16:8:auto,4:fp16:8:auto,4:fp16:0:auto,4:fp16:0:off" if cuda
                                                    else "1:fp32:8:on,1:fp32:0:off")
        result = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                  "machine": machine(device), "data": str(data)}
        log("machine:", json.dumps(result["machine"]))
        result["pipeline"] = pipeline_table(data, device, a)
        write_json(a.out, result)
        log("\nconfig (batch:precision:view_batch:stages)   network mic/s   end-to-end mic/s   ratio   "
            + "   ".join(f"{k} ms" for k in STAGES))
        for r in result["pipeline"]["configs"]:
            spec = f"{r['batch']}:{r['precision']}:{r['view_batch']}:{r['stages']}"
            log(f"{spec:44s}{r['network_mic_per_s']:14.2f}{r['end_to_end_mic_per_s']:19.2f}"
                f"{r['ratio_end_to_end_over_network_rate']:8.3f}   "
                + "   ".join(f"{r['stage_ms_per_micrograph'].get(k, float('nan')):{len(k) + 3}.1f}" for k in STAGES))
        log("(stage ms are per micrograph, summed over the stream: reading, the network and NMS + writing overlap; "
            "ratio = end-to-end rate / network-only rate, target >= 0.7)")
        log(f"-> {a.out}")
        return 0
    precisions = (a.precisions or ("fp32,fp32-strict,fp16,bf16" if cuda else "fp32,bf16")).split(",")
    batch_sizes = [int(v) for v in a.batch_sizes.split(",")]
    timed = a.timed or (64 if cuda else 2)
    cls = [bool(int(v)) for v in (a.channels_last or ("0,1" if cuda else "0")).split(",")]
    e2e_n = a.e2e if a.e2e is not None else (32 if cuda else 0)
    files = dataset_files(data, "10028") + dataset_files(data, "10017")
    if not files:
        raise SystemExit(f"no micrographs under {data}/empiar10028 or empiar10017 (--data)")
    wps = {k: header_pixel_size(dataset_files(data, k)[0]) for k in SETS if dataset_files(data, k)}
    result: dict = {"command": "python " + " ".join([Path(sys.argv[0]).as_posix()] + sys.argv[1:]),
                    "machine": machine(device), "working_pixel_size": wps, "data": str(data),
                    "images": "the real micrographs at their own pixel size: 1024x1024 working size, GMM-normalised"}
    log("machine:", json.dumps(result["machine"]))
    t0 = time.perf_counter()
    wps_of = {f: wps["10028" if "10028" in f.parent.parent.name else "10017"] for f in files}
    # the reader's cost per micrograph (read + GMM normalise), one torch thread, as a stream reader runs it
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    t = time.perf_counter()
    load_micrograph(files[0], wps_of[files[0]])
    reader_s = time.perf_counter() - t
    torch.set_num_threads(n_threads)
    import concurrent.futures

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        mics = list(pool.map(lambda f: load_micrograph(f, wps_of[f]), files))
    images = [m.image for m in mics]
    shapes = sorted({im.shape for im in images})
    log(f"{len(images)} micrographs, working shapes {shapes}, loaded in {time.perf_counter() - t0:.1f} s; "
        f"one read + GMM normalise on one thread: {reader_s:.2f} s")
    result["working_shapes"] = [list(s) for s in shapes]
    result["reader_seconds_per_micrograph_1_thread"] = round(reader_s, 3)

    out_dir = Path(a.out).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    result["models"] = {}
    for fm in a.feature_models.split(","):
        r: dict = {}
        model, path = fit_blr(data, fm, device, wps["10028"], out_dir) if "10028" in wps else (None, None)
        sets = [s for s in a.ap_sets.split(",") if s]
        result["models"][fm] = r
        if sets:
            r["ap"] = ap_table(data, fm, model, precisions, device, wps, sets, a.ap_batch)
            write_json(a.out, result)
        if not a.skip_network:
            r["network"] = speed_table(images, model, fm, device, precisions, batch_sizes, timed, a.repeats, cls)
            write_json(a.out, result)
        if a.cpu_n > 0 and cuda:
            from cryoal_ext.predict import backbone_seconds

            backbone_seconds([images[0][:256, :256]], model, fm, device="cpu")
            t = backbone_seconds(images[: a.cpu_n], model, fm, device="cpu")
            r["cpu_same_machine"] = {"images": a.cpu_n, "threads": torch.get_num_threads(), "seconds": round(t, 2),
                                     "mic_per_s": round(a.cpu_n / t, 3), "precision": "fp32", "batch": 1}
            log(f"[{fm}] CPU on this machine ({torch.get_num_threads()} threads): {a.cpu_n / t:.3f} mic/s")
            write_json(a.out, result)
        if e2e_n > 0:
            spec = a.e2e_configs or ("8:fp32:1,8:fp32:4,8:fp32:8,8:fp16:8" if cuda else "2:fp32:1,2:bf16:2")
            # batch:precision:readers, and an optional 4th field 'g': the GMM normalisation fit on the GPU
            configs = [{"batch_size": int(b), "precision": p, "readers": int(n), "gpu_normalise": bool(g and g[0] == "g")}
                       for b, p, n, *g in (c.split(":") for c in spec.split(","))]
            r["end_to_end"] = []
            for cfg in configs:  # one at a time, saved as it goes
                r["end_to_end"] += e2e_table(files, model, fm, device, wps, e2e_n, [cfg])
                write_json(a.out, result)
        result["models"][fm] = r
        write_json(a.out, result)  # after each model, so a cut-off run keeps what it measured
    result["total_s"] = round(time.perf_counter() - t0, 1)
    write_json(a.out, result)
    log("\nsummary (mic/s, network only; best over channels_last)")
    for fm, r in result["models"].items():
        for p in precisions if "network" in r else []:
            cells = []
            for b in batch_sizes:
                v = [x["mic_per_s"] for x in r["network"] if x["precision"] == p and x["batch"] == b]
                cells.append(f"b{b} {max(v):8.2f}" if v else f"b{b} -")
            log(f"  {fm} {p:11s} " + "  ".join(cells))
        for name, row in r.get("ap", {}).items():
            log(f"  {fm} AP {name}: " + ", ".join(f"{p} {row[p]['ap']:.4f}" + (f" (d {row[p].get('ap_diff_vs_fp32-strict', row[p].get('ap_diff_vs_fp32', 0)):+.4f}, ok={row[p].get('ok')})" if 'ok' in row[p] else "") for p in precisions))
        if "cpu_same_machine" in r:
            log(f"  {fm} CPU same machine: {r['cpu_same_machine']['mic_per_s']} mic/s")
    log(f"-> {a.out} ({result['total_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
