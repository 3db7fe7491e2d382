"""One active-learning round on plain files: import labels, refit, write the next proposals."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import folder_lock
from ..extract import Picks
from ..files import by_micrograph, read_coordinates, write_topaz
from ..io import file_digest
from ..labels import Label
from ..recipes import recipe_for
from ..review import Answer, Edited, apply_answers
from ..session import Session
from ..validate import positive_int
from ..workflow import (EngineSettings, MicrographSpec, audit_micrographs, choose_audit, choose_training, featurise,
                        labelling_round, predict)
from .common import add_audits_argument, add_engine_arguments, add_size_arguments, apply_threads, check_inputs
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
    add_audits_argument(p)
    p.add_argument("--seed", type=int, default=0)
    add_engine_arguments(p)


def import_picks(path: str, label: int, round_: int, source: str) -> list[Label]:
    t = read_coordinates(path)
    return [Label(str(r.image_name), float(r.x), float(r.y), label, source, round_) for r in t.itertuples()]


def reviewed_round(path: str, session: Session) -> int:
    """The round whose queries ``path`` answers: its ``round_NNN`` folder in the session, the round this
    same file (path and content) was applied to before, else the latest round."""
    p = Path(path).resolve()
    top = session.folder.resolve()
    if p.parent.parent == top and p.parent.name.startswith("round_") and p.parent.name[6:].isdigit():
        return int(p.parent.name[6:])
    before = session.state.get("review_files", {}).get(str(p))
    if before and before.get("digest") == file_digest(p):
        return int(before["round"])
    return session.round - 1


def review_answers(path: str, session: Session) -> tuple[int, list[Answer]]:
    """The answers in a reviewed queries file: one per micrograph shown in its round (all of a file is the review)."""
    if session.round == 0:
        raise ValueError(f"--reviewed {path}: session {session.folder} has not shown any queries yet "
                         "(run a round without --reviewed first)")
    rnd = reviewed_round(path, session)
    if rnd >= session.round:
        raise ValueError(f"--reviewed {path}: it lies in the folder of round {rnd}, but the session has shown "
                         f"queries up to round {session.round - 1} only")
    shown = session.shown(rnd)
    edited = {n: Edited(x, y) for n, (x, y) in by_micrograph(read_coordinates(path)).items()}
    for p in shown:  # a micrograph whose proposals were all deleted is reviewed too
        edited.setdefault(p.micrograph, Edited(np.empty(0), np.empty(0)))
    session.state.setdefault("review_files", {})[str(Path(path).resolve())] = {"digest": file_digest(path),
                                                                               "round": rnd}
    return rnd, [Answer(rnd, n, ed, str(path)) for n, ed in sorted(edited.items())]


def main(args) -> int:
    apply_threads(args)
    _check_round_inputs(args)
    with folder_lock(args.session):
        session = Session(args.session)
        rnd = session.round
        files = expand(args.micrographs)
        specs = {f.stem: MicrographSpec(str(f), f.stem, args.pixel_size) for f in files}
        s = EngineSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=args.feature_model,
                           working_pixel_size=args.working_pixel_size, cache_dir=args.cache_dir, device=args.device)
        answers: list[Answer] = []
        reviewed = None
        if args.reviewed:
            reviewed, answers = review_answers(args.reviewed, session)
        for f in args.positives + args.negatives:
            lab = 1 if f in args.positives else 0
            by_mic: dict[str, list[Label]] = {}
            for l in import_picks(f, lab, rnd, ""):
                by_mic.setdefault(l.micrograph, []).append(l)
            answers += [Answer(rnd, n, Edited(np.array([l.x for l in ls]), np.array([l.y for l in ls]),
                                              np.full(len(ls), lab)), f, independent=True,
                               label_source=f"file:{Path(f).name}")
                        for n, ls in sorted(by_mic.items())]
        unknown = {a.micrograph for a in answers if a.edited.x.size} - set(specs)
        if unknown:
            raise ValueError(f"labels name micrograph(s) not among the inputs: {', '.join(sorted(unknown)[:5])}")
        answers = [a for a in answers if a.micrograph in specs]
        recipe = recipe_for(args.recipe, args.audits, args.batch)
        _check_audit_room(session, recipe, specs, answers, args)
        radius_all = (args.radius_px or s.radius_for(_pixel_size(specs, args))) if answers else 0.0
        outcome = apply_answers(session, answers, lambda m: radius_all, "reviewed")
        if reviewed is not None and outcome.repeated and not outcome.applied and reviewed < rnd - 1:
            print(f"{args.reviewed}: this review of round {reviewed} was already applied; nothing to do. "
                  f"The latest queries (round {rnd - 1}) are in {Path(args.session) / f'round_{rnd - 1:03d}'}")
            return 0
        added = outcome.added
        for msg in session.note_settings({"recipe": args.recipe, "feature_model": args.feature_model,
                                          "working_pixel_size": args.working_pixel_size}):
            print(f"warning: {msg}")
        audited = [n for n in audit_micrographs(session) if n in specs]  # never trained on, whatever their labels
        train = choose_training([n for n in specs if n not in audited], args.train_micrographs, args.seed,
                                {l.micrograph for l in session.labels.effective()} - set(audited),
                                keep_free=int(recipe.audits_apart and not audited))  # room for an audit micrograph
        audited = choose_audit(session, list(specs), train, recipe, args.seed)
        items = list(featurise([specs[n] for n in train], s))
        audit_items = list(featurise([specs[n] for n in audited], s)) if recipe.audits_apart else []
        radius = args.radius_px or s.radius_for(items[0].mic.frame.pixel_size)
        res = labelling_round(session, items, recipe, radius, args.batch, args.feature_model, args.seed,
                              audit_items=audit_items)
        out = Path(args.session) / f"round_{rnd:03d}"
        write_topaz(out / "queries.txt", [Picks(n, np.array([p.x for p in res.proposals if p.micrograph == n]),
                                                np.array([p.y for p in res.proposals if p.micrograph == n]),
                                                np.array([p.score for p in res.proposals if p.micrograph == n]))
                                          for n in train + [a.mic.name for a in audit_items]])
        write_topaz(out / "picks.txt", [pk for _, pk in predict(items, res.model, radius)])
        session.record(round=rnd, labels_added=added, labels=res.n_labels, positives=res.n_positive,
                       train=train, **({"audited": [a.mic.name for a in audit_items]} if audit_items else {}),
                       reviewed=reviewed, fit_s=round(res.fit_s, 3), propose_s=round(res.propose_s, 3))
        session.save_state(round=rnd + 1)
        again = f" ({len(outcome.repeated)} answer(s) applied before, skipped)" if outcome.repeated else ""
        print(f"round {rnd}: +{added} labels{again} ({res.n_labels} total, {res.n_positive} positive); "
              f"{len(res.proposals)} queries -> {out / 'queries.txt'}; model -> {session.model_path}; {res.note}")
    return 0


def _check_round_inputs(args) -> None:
    """Bad input is refused here, before the session folder is locked (created) or a label is stored."""
    from ..files import check_inside
    from ..validate import read_header

    files = expand(args.micrographs)
    check_inputs(args, files, {"session folder (--session)": args.session,
                               "feature cache folder (--cache-dir)": args.cache_dir})
    recipe = recipe_for(args.recipe, args.audits, args.batch)
    if recipe.audits_apart and len({f.stem for f in files}) <= args.train_micrographs:
        raise ValueError(f"--recipe {args.recipe}: its audits ask about a micrograph never trained on, so it needs "
                         f"more micrographs than --train-micrographs {args.train_micrographs} (got {len(files)})")
    shapes = {f.stem: h.shape for f in files if (h := read_header(f)) is not None}
    for f in [*args.positives, *args.negatives, *([args.reviewed] if args.reviewed else [])]:
        check_inside(read_coordinates(f), shapes, f)


def _check_audit_room(session: Session, recipe, specs: dict, answers: list[Answer], args) -> None:
    """Refuse, before a label is stored, a round whose labels would leave no micrograph for the audits.

    A micrograph with labels is always trained on; audits need one that is not (chosen once, then kept).
    """
    if not recipe.audits_apart or any(n in specs for n in audit_micrographs(session)):
        return
    labelled = {l.micrograph for l in session.labels.effective()} | {a.micrograph for a in answers}
    if not set(specs) <= labelled:
        return  # the training draw leaves a micrograph without labels for the audits (keep_free)
    raise ValueError(f"--recipe {args.recipe}: its audits ask about a micrograph never trained on, but these labels "
                     f"cover every one of the {len(specs)} micrograph(s), and a micrograph with labels is always "
                     "trained on; nothing was stored. Add a micrograph without labels to the inputs, leave "
                     "one micrograph's labels out of this round, or use --recipe default")


def _pixel_size(specs, args) -> float:
    from ..io import read_mrc

    if args.pixel_size:
        return args.pixel_size
    first = next(iter(specs.values()))
    ps = read_mrc(first.path)[1]
    if not ps:
        raise ValueError(f"{first.path}: no pixel size in header; give --pixel-size")
    return ps
