"""Pick micrographs with a trained model (or Topaz's pretrained head) and write coordinate files.

Streams: reading, the network and NMS overlap, feature maps are never stored, memory stays flat.
Outputs are per micrograph and atomic, so a re-run skips finished micrographs (resume) and
``--shard i/N`` splits the work across processes or nodes; ``cryoal merge`` joins the shards
(an unsharded run merges by itself).
"""
from __future__ import annotations

import sys
import time
from pathlib import Path

from ..calibration import calibrated
from ..features import parse_feature_model
from ..io import file_digest, resolve_normalisation
from ..model import BLR
from ..shard import Shard, is_complete, merge, reconcile_manifest, write_error, write_micrograph
from ..workflow import EngineSettings, expected_count, suggest_threshold
from .common import add_engine_arguments, add_size_arguments, apply_threads, check_inputs, given
from ..validate import probability, positive_int
from .features import expand

FORMATS = ("txt", "star")


def add_arguments(p) -> None:
    p.add_argument("micrographs", nargs="+",
                   help="MRC files, folders, or lists: .txt (one path a line), RELION .star (rlnMicrographName), "
                        "cryoSPARC exposures .cs (micrograph_blob/path)")
    p.add_argument("--project-dir", default=".",
                   help="folder that relative paths in .txt/.star/.cs lists start from (default: here)")
    p.add_argument("--model", default=None, help="model.npz from a round or the benchmark (default: pretrained head)")
    add_size_arguments(p)
    p.add_argument("--threshold", type=probability, default=None, help="keep picks with probability >= this")
    p.add_argument("--out-dir", required=True,
                   help="per-micrograph picks in OUT/micrographs/, merged into OUT/picks.txt (+ picks.star)")
    p.add_argument("--format", default="txt,star", help="comma-separated: txt, star (txt is always written)")
    p.add_argument("--shard", default=None, metavar="i/N",
                   help="process only the i-th of N parts of the sorted micrograph list (1-based); 'slurm' takes "
                        "i and N from a SLURM job array; join the parts with cryoal merge")
    p.add_argument("--overwrite", action="store_true", help="redo micrographs that already have outputs")
    p.add_argument("--batch-size", type=positive_int, default=None,
                   help="micrographs per forward pass (default 1 on CPU, 4 on GPU)")
    p.add_argument("--precision", default=None, choices=("fp32", "fp16", "bf16"),
                   help="backbone arithmetic: fp32 (default), fp16 (autocast, CUDA only), bf16 (autocast); "
                        "check the AP on your data first")
    p.add_argument("--half", action="store_true", help="same as --precision fp16")
    p.add_argument("--views", type=int, default=None, choices=(1, 2, 4, 8),
                   help="rotated/mirrored views averaged at prediction (default: the model's own on a GPU, e.g. 8 "
                        "for +views8; on the CPU at most 4, which kept the AP within 0.005 of 8 for half the "
                        "time); N views cost N one-view passes")
    p.add_argument("--prefetch", type=int, default=2, help="micrographs read ahead of the network (default 2)")
    p.add_argument("--readers", type=positive_int, default=None,
                   help="threads reading and normalising micrographs (default 1 on CPU, up to 4 on GPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("GPU stages (issue 15; each gives the CPU path's picks)")
    g.add_argument("--view-batch", type=int, default=None, metavar="N",
                   help="+viewsK models: stack the views into forward passes of at most N images "
                        "(default 8 on GPU, 0 = view by view, the CPU default)")
    g.add_argument("--gpu-crop", default="auto", choices=("auto", "on", "off"),
                   help="Fourier crop with torch.fft on the device (auto: on GPU)")
    g.add_argument("--device-nms", default="auto", choices=("auto", "on", "off"),
                   help="NMS on the device, exactly the CPU NMS's picks (auto: on GPU)")
    add_engine_arguments(p)


def _switch(value: str | None) -> bool | None:
    """auto/on/off -> None/True/False (None: the engine's default for the device)."""
    return {"on": True, "off": False}.get(str(value or "auto"))


def _listed(path: Path) -> list[str]:
    """Micrograph paths named by a list file (.txt, RELION .star, cryoSPARC .cs)."""
    suffix = path.suffix.lower()
    if suffix == ".star":
        import starfile

        tables = starfile.read(path, always_dict=True)
        table = next((t for t in tables.values() if hasattr(t, "columns") and "rlnMicrographName" in t.columns), None)
        if table is None:
            raise ValueError(f"{path}: no table with rlnMicrographName")
        return [str(v) for v in table["rlnMicrographName"]]
    if suffix == ".cs":
        from cryosparc.dataset import Dataset

        data = Dataset.load(str(path))
        if "micrograph_blob/path" not in data.fields():
            raise ValueError(f"{path}: no micrograph_blob/path field (is it an exposures .cs?)")
        return [v.decode() if isinstance(v, bytes) else str(v) for v in data["micrograph_blob/path"]]
    return [line.strip() for line in path.read_text().splitlines() if line.strip() and not line.startswith("#")]


def micrograph_inputs(items: list[str], project_dir: str = ".") -> list[Path]:
    """Expand folders and list files into micrograph paths (relative list entries start at ``project_dir``)."""
    out: list[Path] = []
    for item in items:
        p = Path(item)
        if p.suffix.lower() in (".txt", ".list", ".star", ".cs") and p.is_file():
            out += [q if q.is_absolute() else Path(project_dir) / q for q in map(Path, _listed(p))]
        else:
            out += expand([item])
    return out


def run_settings(args, model_path: str | None, feature_model: str, formats: set[str], views: int | None = None) -> dict:
    """What decides the picks: a folder's outputs are only reused under the same settings."""
    return {"model": f"sha1:{file_digest(Path(model_path).with_suffix('.npz'))}" if model_path else f"pretrained:{feature_model}",
            "feature_model": feature_model, "working_pixel_size": args.working_pixel_size,
            "pixel_size": args.pixel_size, "radius_px": args.radius_px, "diameter_A": args.diameter_A,
            "threshold": args.threshold, "precision": precision_of(args), "formats": sorted(formats),
            "normalisation": resolve_normalisation(), "views": views or parse_feature_model(feature_model)[1]}


def precision_of(args) -> str:
    """--precision, with --half as its fp16 shorthand."""
    p = getattr(args, "precision", None)
    if getattr(args, "half", False):
        if p not in (None, "fp16"):
            raise ValueError(f"--half means --precision fp16; it conflicts with --precision {p}")
        return "fp16"
    return p or "fp32"


def main(args) -> int:
    from tqdm import tqdm

    from ..features import precision_warning, resolve_precision
    from ..predict import PredictSettings, prediction_views, resolve_device, stream_predict

    apply_threads(args)
    shard = Shard.parse(args.shard)
    formats = {f.strip() for f in args.format.split(",") if f.strip()} | {"txt"}
    unknown = formats - set(FORMATS)
    if unknown:
        raise ValueError(f"--format: unknown {', '.join(sorted(unknown))}; choose from {', '.join(FORMATS)}")
    device = resolve_device(args.device)
    precision = precision_of(args)
    note = precision_warning(resolve_precision(precision, device), device)  # fp16 on the CPU is refused here
    if note:
        print(f"cryoal predict: warning: {note}", file=sys.stderr)
    if getattr(args, "view_batch", None) is not None and args.view_batch < 0:
        raise ValueError(f"--view-batch {args.view_batch}: give 0 (view by view) or a positive number of images")
    model = calibrated(BLR.load(args.model)) if args.model else None  # probabilities as the session calibrated them
    feature_model = model.meta.get("feature_model", args.feature_model) if model else args.feature_model
    if model is not None and given(args, "feature_model") and feature_model != args.feature_model:
        raise ValueError(f"--feature-model {args.feature_model} does not match {args.model}, which was trained on "
                         f"{feature_model} features; drop --feature-model (the model's own is used) or give a model "
                         f"trained on {args.feature_model}")
    engine = EngineSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=feature_model,
                            working_pixel_size=args.working_pixel_size, device=args.device)
    files = micrograph_inputs(args.micrographs, args.project_dir)
    by_name: dict[str, Path] = {}
    for f in files:
        if f.stem in by_name and by_name[f.stem] != f:
            raise ValueError(f"two micrographs share the name {f.stem}: {by_name[f.stem]} and {f}")
        by_name[f.stem] = f
    out = Path(args.out_dir)
    batch = args.batch_size or (4 if device.startswith("cuda") else 1)
    # a micrograph with a bad pixel size fails softly below (its error file says why); a particle too large for
    # the micrographs or a working image too large for memory is the settings' fault: refused before any work
    check_inputs(args, [by_name[n] for n in sorted(by_name)], {"output folder (--out-dir)": out}, batch=batch,
                 feature_model=feature_model, skip_bad_pixel_size=True)
    views = prediction_views(feature_model, device, args.views)
    settings = run_settings(args, args.model, feature_model, formats, views)
    reconcile_manifest(out, settings, [{"name": n, "path": str(by_name[n])} for n in sorted(by_name)],
                       overwrite=args.overwrite)
    mine = shard.select(list(by_name))
    todo = [n for n in mine if args.overwrite or not is_complete(out, n, formats)]
    ps = PredictSettings(feature_model=feature_model, working_pixel_size=args.working_pixel_size, device=device,
                         batch_size=batch, precision=precision, prefetch=args.prefetch, readers=args.readers,
                         threshold=args.threshold, normalisation=resolve_normalisation(), views=views,
                         view_batch=getattr(args, "view_batch", None), gpu_crop=_switch(getattr(args, "gpu_crop", None)),
                         device_nms=_switch(getattr(args, "device_nms", None)))
    print(f"shard {shard}: {len(mine)} of {len(by_name)} micrographs, {len(mine) - len(todo)} already done, "
          f"{len(todo)} to pick on {device} (batch {batch}, {precision}, {views} view{'s' if views > 1 else ''} "
          f"of {feature_model})")
    t = time.perf_counter()
    failed = 0
    inputs = [(n, str(by_name[n]), n, args.pixel_size) for n in todo]
    bar = tqdm(total=len(todo), unit="mic", desc="predict", disable=args.no_progress or not todo)
    stages: dict[str, float] = {}
    for res in stream_predict(inputs, model, lambda _k, mic: engine.radius_for(mic.frame.pixel_size), ps):
        w = time.perf_counter()
        if res.picks is None:
            failed += 1
            write_error(out, res.name, res.error or "unreadable")
            bar.write(f"skipped {res.name}: {res.error}")
        else:
            write_micrograph(out, res.picks, formats)
        for k, v in {**res.seconds, "write": time.perf_counter() - w}.items():
            stages[k] = stages.get(k, 0.0) + v
        bar.update(1)
    bar.close()
    dt = time.perf_counter() - t
    rate = f", {len(todo) / dt:.2f} mic/s" if todo and dt > 0 else ""
    print(f"picked {len(todo) - failed} micrograph(s) in {dt:.1f} s{rate}" + (f"; {failed} unreadable" if failed else ""))
    if stages:  # summed over micrographs; reading, the network and NMS + writing run at the same time
        order = ("read", "crop", "normalise", "network", "nms", "write")
        print("seconds per stage (overlapping): " + ", ".join(f"{k} {stages[k]:.3f}" for k in order if k in stages))
    if shard.count > 1:
        print(f"when every shard has finished: cryoal merge {out}")
        return 1 if failed else 0
    merged = merge(out, partial=bool(failed))
    thr = suggest_threshold(merged.scores)
    n = int((merged.scores >= thr).sum())
    print(f"{merged.micrographs} micrographs, {merged.picks} picks -> {out / 'picks.txt'}; "
          f"suggested threshold {thr:.3f} keeps {n} picks; expected particles "
          f"{expected_count(merged.scores, model).text} (the sum of the pick probabilities)")
    return 1 if failed else 0
