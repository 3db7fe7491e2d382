"""One active-learning round on plain files: import labels, refit, write the next proposals."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import folder_lock
from ..extract import Picks
from ..files import by_micrograph, read_coordinates, write_topaz
from ..labels import Label
from ..recipes import get_recipe
from ..session import Edited, Session, diff_edits
from ..validate import positive_int
from ..workflow import EngineSettings, MicrographSpec, choose_training, featurise, labelling_round, predict
from .common import add_engine_arguments, add_size_arguments, apply_threads, check_inputs
from .features import expand


def add_arguments(p) -> None:
    p.add_argument("micrographs", nargs="+", help="MRC files or folders")
    p.add_argument("--session", required=True, help="session folder (labels, model, proposals); resumes if it exists")
    add_size_arguments(p)
    p.add_argument("--positives", action="append", default=[], help="picks to add as positives (txt/STAR)")
    p.add_argument("--negatives", action="append", default=[], help="picks to add as negatives (txt/STAR)")
    p.add_argument("--reviewed", default=None,
                   help="the last round's queries after review (txt/STAR): kept = positive, deleted = negative, added = positive")
    p.add_argument("--batch", type=positive_int, default=10)
    p.add_argument("--train-micrographs", type=positive_int, default=2)
    p.add_argument("--recipe", default="default")
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)


def import_picks(path: str, label: int, round_: int, source: str) -> list[Label]:
    t = read_coordinates(path)
    return [Label(str(r.image_name), float(r.x), float(r.y), label, source, round_) for r in t.itertuples()]


def main(args) -> int:
    apply_threads(args)
    _check_round_inputs(args)
    with folder_lock(args.session):
        session = Session(args.session)
        rnd = session.round
        new: list[Label] = []
        for f in args.positives:
            new += import_picks(f, 1, rnd, f"file:{Path(f).name}")
        for f in args.negatives:
            new += import_picks(f, 0, rnd, f"file:{Path(f).name}")
        files = expand(args.micrographs)
        specs = {f.stem: MicrographSpec(str(f), f.stem, args.pixel_size) for f in files}
        s = EngineSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=args.feature_model,
                           working_pixel_size=args.working_pixel_size, cache_dir=args.cache_dir, device=args.device)
        if args.reviewed and rnd > 0:
            shown = session.load_proposals(rnd - 1)
            edited = {n: Edited(x, y) for n, (x, y) in by_micrograph(read_coordinates(args.reviewed)).items()}
            for p in shown:  # a micrograph whose proposals were all deleted is reviewed too
                edited.setdefault(p.micrograph, Edited(np.empty(0), np.empty(0)))
            radius = args.radius_px or s.radius_for(_pixel_size(specs, args))
            new += diff_edits(shown, edited, radius, rnd, source="reviewed")
        unknown = {l.micrograph for l in new} - set(specs)
        if unknown:
            raise ValueError(f"labels name micrograph(s) not among the inputs: {', '.join(sorted(unknown)[:5])}")
        added = session.labels.add(new)
        train = choose_training(list(specs), args.train_micrographs, args.seed,
                                {l.micrograph for l in session.labels.effective()})
        items = list(featurise([specs[n] for n in train], s))
        radius = args.radius_px or s.radius_for(items[0].mic.frame.pixel_size)
        res = labelling_round(session, items, get_recipe(args.recipe), radius, args.batch, args.feature_model, args.seed)
        out = Path(args.session) / f"round_{rnd:03d}"
        write_topaz(out / "queries.txt", [Picks(n, np.array([p.x for p in res.proposals if p.micrograph == n]),
                                                np.array([p.y for p in res.proposals if p.micrograph == n]),
                                                np.array([p.score for p in res.proposals if p.micrograph == n]))
                                          for n in train])
        write_topaz(out / "picks.txt", [pk for _, pk in predict(items, res.model, radius)])
        session.record(round=rnd, labels_added=added, labels=res.n_labels, positives=res.n_positive,
                       train=train, fit_s=round(res.fit_s, 3), propose_s=round(res.propose_s, 3))
        session.save_state(round=rnd + 1)
        print(f"round {rnd}: +{added} labels ({res.n_labels} total, {res.n_positive} positive); "
              f"{len(res.proposals)} queries -> {out / 'queries.txt'}; model -> {session.model_path}")
    return 0


def _check_round_inputs(args) -> None:
    """Bad input is refused here, before the session folder is locked (created) or a label is stored."""
    from ..files import check_inside
    from ..validate import read_header

    files = expand(args.micrographs)
    check_inputs(args, files, {"session folder (--session)": args.session,
                               "feature cache folder (--cache-dir)": args.cache_dir})
    shapes = {f.stem: h.shape for f in files if (h := read_header(f)) is not None}
    for f in [*args.positives, *args.negatives, *([args.reviewed] if args.reviewed else [])]:
        check_inside(read_coordinates(f), shapes, f)


def _pixel_size(specs, args) -> float:
    from ..io import read_mrc

    if args.pixel_size:
        return args.pixel_size
    first = next(iter(specs.values()))
    ps = read_mrc(first.path)[1]
    if not ps:
        raise ValueError(f"{first.path}: no pixel size in header; give --pixel-size")
    return ps
