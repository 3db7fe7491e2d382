"""cryoSPARC rounds: labels in from reviewed particle sets, one active-learning round or the final picks out.

Shared by the live external job (``live``) and the offline mode on .cs files (``cli``); nothing
here talks to a cryoSPARC instance.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import folder_lock
from ..features import DEFAULT_FEATURE_MODEL
from ..labels import Label
from ..learner import ActiveLearner
from ..model import BLR
from ..recipes import Recipe, recipe_for
from ..review import Answer, Edited, apply_answers
from ..session import Session
from ..workflow import EngineSettings, MicrographSpec, choose_training, expected_count, featurise, fit_calibrated, \
    labelling_round, predict, session_audits, suggest_threshold
from .data import (PickRows, check_shape, exposures_to_specs,
                   particles_to_edited, particles_to_labels, picks_to_dataset, proposals_to_rows, save_dataset,
                   uids_of)

MAX_OVERLAYS = 4


# --- settings -----------------------------------------------------------------------------------
@dataclass
class RoundSettings:
    """Everything one run needs besides its inputs (what the command-line flags say)."""

    radius_px: float | None = None
    diameter_A: float | None = None
    feature_model: str = DEFAULT_FEATURE_MODEL
    working_pixel_size: float = 8.0
    cache_dir: str | None = None
    device: str | None = None
    pixel_size: float | None = None  # only for exposures without micrograph_blob/psize_A
    batch: int = 10
    train_micrographs: int = 2
    recipe: str = "default"
    audits: int | None = None  # questions of each batch about the model's own picks (None: the recipe's)
    seed: int = 0
    flip_y: bool = False
    threshold: float | None = 0.01  # lowest probability written to `particles`
    predict: bool = False
    model: str | None = None
    with_psize: bool = False
    plots: bool = True

    def engine_recipe(self) -> Recipe:
        return recipe_for(self.recipe, self.audits, self.batch)

    def engine(self, feature_model: str | None = None) -> EngineSettings:
        return EngineSettings(radius_px=self.radius_px, diameter_A=self.diameter_A,
                              feature_model=feature_model or self.feature_model,
                              working_pixel_size=self.working_pixel_size, cache_dir=self.cache_dir, device=self.device)


@dataclass
class LabelInput:
    """A particle dataset that brings labels: the reviewed queries, or extra positives/negatives."""

    dset: object
    source: str  # file or job output, for messages and the label file
    kind: str  # 'reviewed', 'positive' or 'negative'


@dataclass
class RoundOutput:
    round: int
    folder: Path
    particles: object  # Dataset
    queries: object | None  # Dataset, None with --predict
    plots: list[tuple[str, str]] = field(default_factory=list)
    summary: dict = field(default_factory=dict)


class Reporter:
    """Where progress goes: stdout offline, the job's event log live."""

    def log(self, text: str, level: str = "text") -> None:
        print(text if level == "text" else f"{level}: {text}", flush=True)

    def progress(self, text: str) -> None:
        self.log(text)

    def plot(self, path: str, caption: str) -> None:
        self.log(f"plot: {path} ({caption})")


# --- one round ----------------------------------------------------------------------------------
def _check_session_settings(session: Session, s: RoundSettings) -> None:
    """flip_y changes how every stored coordinate maps to cryoSPARC; it must not change mid-session."""
    prev = session.state.get("cryosparc")
    now = {"flip_y": bool(s.flip_y)}
    if prev is None:
        session.save_state(cryosparc=now)
    elif bool(prev.get("flip_y")) != now["flip_y"]:
        raise ValueError(f"{session.folder}: this session was run with flip_y={bool(prev.get('flip_y'))}; "
                         f"rerun with the same --flip-y setting (or start a new session)")


def _queries_round_of(session: Session, reviewed) -> tuple[int | None, int]:
    """Which round's saved queries the reviewed dataset shares the most particle uids with."""
    ruids = np.asarray(reviewed["uid"], dtype=np.uint64) if len(reviewed) else np.empty(0, np.uint64)
    best, best_n = None, 0
    for path in sorted((session.folder / "cryosparc").glob("round_*/queries.cs")):
        n = int(np.isin(ruids, uids_of(path)).sum())
        if n > best_n:
            best, best_n = int(path.parent.name.split("_")[1]), n
    return best, best_n


def import_labels(session: Session, specs: list[MicrographSpec], inputs: list[LabelInput], s: RoundSettings,
                  reporter: Reporter) -> tuple[int, dict]:
    """Turn every label input into labels and append them to the session; returns (added, counts)."""
    rnd = session.round
    new: list[Label] = []
    answers: list[Answer] = []
    radius: dict[str, float] = {}
    counts: dict = {}
    by_name = {sp.name: sp for sp in specs}
    eng = s.engine()
    for inp in inputs:
        if inp.kind == "reviewed":
            if rnd == 0:
                raise ValueError(f"{inp.source}: reviewed picks given, but session {session.folder} has not shown "
                                 "any queries yet (run a round without --reviewed first)")
            k, nshared = _queries_round_of(session, inp.dset)
            if k is not None and k != rnd - 1:
                raise ValueError(f"{inp.source} shares {nshared} particle uids with the queries of round {k}, but this "
                                 f"session expects the review of round {rnd - 1}'s queries")
            shown = session.load_proposals(rnd - 1)
            edited, unmatched = particles_to_edited(inp.dset, specs, inp.source, s.flip_y) if len(inp.dset) \
                else ({}, 0)
            for p in shown:  # a micrograph whose queries were all deleted is reviewed too
                edited.setdefault(p.micrograph, Edited(np.empty(0), np.empty(0)))
            gone = sorted(n for n in edited if n not in by_name)
            if gone:
                reporter.log(f"{inp.source}: queries on {len(gone)} micrograph(s) no longer among the exposures "
                             f"(e.g. {gone[0]}) are not turned into labels", level="warning")
            edited = {n: ed for n, ed in edited.items() if n in by_name}
            radius.update({n: eng.radius_for(by_name[n].pixel_size) for n in edited})
            mine = [Answer(rnd - 1, name, ed, inp.source, label_source=f"reviewed:{inp.source}")
                    for name, ed in sorted(edited.items())]
            answers += mine
            counts[inp.source] = {"kind": "reviewed", "answers": mine, "shown": len(shown), "uids_shared": nshared,
                                  "other_exposures": unmatched}
        else:
            lab = 1 if inp.kind == "positive" else 0
            labs, unmatched = particles_to_labels(inp.dset, specs, lab, rnd, f"{inp.kind}:{inp.source}", s.flip_y) \
                if len(inp.dset) else ([], 0)
            counts[inp.source] = {"kind": inp.kind, "labels": len(labs), "other_exposures": unmatched}
            reporter.log(f"{inp.kind}s {inp.source}: {len(labs)} labels")
            new += labs
        if counts[inp.source].get("other_exposures"):
            reporter.log(f"{inp.source}: {counts[inp.source]['other_exposures']} particles lie on exposures not in "
                         "the input and were left out", level="warning")
    outcome = apply_answers(session, answers, radius.__getitem__, "reviewed", extra=new)
    for src, c in counts.items():  # the review rules live in review.py; here only the report
        if c["kind"] != "reviewed":
            continue
        mine = c.pop("answers")
        labs = [l for l in outcome.labels if any(l.source.endswith(a.tag) and l.micrograph == a.micrograph
                                                  for a in mine)]
        pos = sum(l.label for l in labs)
        c.update(positive=pos, negative=len(labs) - pos)
        again = sum(a in outcome.repeated for a in mine)
        reporter.log(f"reviewed {src}: {c['shown']} queries shown -> {pos} positive, {len(labs) - pos} negative "
                     f"labels ({c['uids_shared']} rows kept by uid)" + (f"; {again} answer(s) applied before" if again
                                                                          else ""))
    return outcome.added, counts


def _overlay(item, path: Path, radius: float, picks=None, queries=None, labels=None, title: str = "") -> None:
    from ..plots import plot_overlay

    f = item.mic.frame
    plot_overlay(item.mic.image, str(path), picks=picks, queries=queries, labels=labels,
                 radius=f.radius_to_working(radius), title=title, scale=(f.scale_x, f.scale_y))


def check_sizes(specs: list[MicrographSpec], s: RoundSettings) -> None:
    """The particle must fit every exposure (micrograph_blob/shape) and its working image the memory,
    checked from the dataset alone before any label is read or micrograph loaded."""
    from ..validate import SizeRules, available_memory, check_micrograph

    rules = SizeRules(radius_px=s.radius_px, diameter_A=s.diameter_A, working_pixel_size=s.working_pixel_size,
                      feature_model=s.feature_model)
    memory = available_memory()
    for key in sorted({(sp.extra["shape"], float(sp.pixel_size)): sp.path for sp in specs}.items()):
        (shape, ps), path = key
        check_micrograph(path, shape, ps, rules, memory)


def run_round(session_dir: str | os.PathLike, exposures, project_dir: str | os.PathLike | None,
              inputs: list[LabelInput], s: RoundSettings, reporter: Reporter | None = None,
              exposures_source: str = "exposures") -> RoundOutput:
    """One run on a session folder: import labels, refit, propose (or predict everything), make datasets."""
    reporter = reporter or Reporter()
    with folder_lock(session_dir):
        session = Session(session_dir)
        _check_session_settings(session, s)
        if not s.predict:
            for msg in session.note_settings({"recipe": s.recipe, "feature_model": s.feature_model,
                                              "working_pixel_size": s.working_pixel_size}):
                reporter.log(msg, level="warning")
        specs = exposures_to_specs(exposures, project_dir, exposures_source, s.pixel_size)
        check_sizes(specs, s)
        by_name = {sp.name: sp for sp in specs}
        rnd = session.round
        reporter.log(f"session {session.folder}, round {rnd}: {len(specs)} exposures from {exposures_source}")
        added, counts = import_labels(session, specs, inputs, s, reporter)
        pos, neg = session.labels.counts()
        reporter.log(f"labels: +{added} new, {pos} positive and {neg} negative in total")
        labelled = {l.micrograph for l in session.labels.effective()}
        unknown = sorted(labelled - set(by_name))
        if unknown:
            reporter.log(f"{len(unknown)} labelled micrograph(s) are not among these exposures and are not used "
                         f"(e.g. {unknown[0]})", level="warning")
        if s.predict:
            return _predict_all(session, specs, s, reporter, added, counts)
        return _labelling(session, specs, s, reporter, added, counts)


def _featurise(specs: list[MicrographSpec], eng: EngineSettings, reporter: Reporter):
    """Features per micrograph, refusing a file whose shape is not micrograph_blob/shape."""
    by_name = {sp.name: sp for sp in specs}
    for it in featurise(specs, eng, progress=reporter.progress):
        check_shape(by_name[it.mic.name], it.mic.frame.original_shape)
        yield it


def _labelling(session: Session, specs, s: RoundSettings, reporter: Reporter, added: int,
               counts: dict) -> RoundOutput:
    rnd = session.round
    by_name = {sp.name: sp for sp in specs}
    eng = s.engine()
    labelled = {l.micrograph for l in session.labels.effective()}
    train = choose_training(list(by_name), s.train_micrographs, s.seed, labelled)
    reporter.log(f"training micrographs: {', '.join(train)}")
    items = list(_featurise([by_name[n] for n in train], eng, reporter))
    radius = eng.radius_for(items[0].mic.frame.pixel_size)
    res = labelling_round(session, items, s.engine_recipe(), radius, s.batch, s.feature_model, s.seed)
    folder = session.folder / "cryosparc" / f"round_{rnd:03d}"
    rows = proposals_to_rows(res.proposals, specs)
    n_q = sum(len(r.x) for r in rows)
    queries = picks_to_dataset(rows, radius, s.flip_y, s.with_psize)  # random uids, kept by Manual Picker
    save_dataset(folder / "queries.cs", queries)
    picks = [(it, pk) for it, pk in predict(items, res.model, radius, s.threshold)]
    particles = picks_to_dataset([PickRows(by_name[pk.name], pk.x, pk.y, pk.score) for _, pk in picks], radius,
                                 s.flip_y, s.with_psize)
    save_dataset(folder / "particles.cs", particles)
    scores = np.concatenate([pk.score for _, pk in picks]) if picks else np.empty(0)
    thr = suggest_threshold(scores)
    plots = []
    if s.plots:
        plots = _plots(folder, picks, res.proposals, session.labels.effective(), radius, scores, thr, rnd)
        for path, caption in plots:
            reporter.plot(path, caption)
    summary = {"round": rnd, "labels_added": added, "labels": res.n_labels, "positives": res.n_positive,
               "inputs": counts, "train": train, "queries": n_q, "particles": len(particles),
               "suggested_threshold": round(thr, 4), "fit_s": round(res.fit_s, 3), "propose_s": round(res.propose_s, 3),
               "flip_y": s.flip_y}
    session.record(front_end="cryosparc", **summary)
    session.save_state(round=rnd + 1)
    reporter.log(f"round {rnd}: {res.n_labels} labels ({res.n_positive} positive); {n_q} queries on "
                 f"{len(rows)} micrograph(s); {len(particles)} picks on the training micrographs, "
                 f"suggested threshold {thr:.3f}; {res.note}")
    return RoundOutput(rnd, folder, particles, queries, plots, summary)


def _fit_for_prediction(session: Session, specs, s: RoundSettings, reporter: Reporter, added: int):
    """The model to pick with: --model, the session's model when no label came in, else a refit."""
    if s.model:
        model = BLR.load(s.model)
        reporter.log(f"model {s.model} (feature model {model.meta.get('feature_model', s.feature_model)})")
        return model
    labels = session.labels.effective()
    if added == 0 and session.model_path.exists():
        model = BLR.load(session.model_path)
        if model.meta.get("n_labels") == len(labels):  # fitted on exactly these labels
            reporter.log(f"model {session.model_path} (no new labels)")
            return model
    if not labels:
        reporter.log("no labels yet: picking with Topaz's pretrained head", level="warning")
        return None
    by_name = {sp.name: sp for sp in specs}
    train = sorted({l.micrograph for l in labels} & set(by_name))
    if not train:
        raise ValueError("none of the labelled micrographs is among the exposures; cannot refit")
    items = list(_featurise([by_name[n] for n in train], s.engine(), reporter))
    radius = s.engine().radius_for(items[0].mic.frame.pixel_size)
    learner = ActiveLearner(items, radius, s.engine_recipe(), s.feature_model, seed=s.seed)
    model = fit_calibrated(learner, labels, audits=session_audits(session))  # as a round fits: calibrated
    model.save(session.model_path, round=session.round, n_labels=len(labels))
    reporter.log(f"refitted on {len(labels)} labels from {len(train)} micrograph(s) in {learner.last_fit_s:.1f} s")
    return model


def _predict_all(session: Session, specs, s: RoundSettings, reporter: Reporter, added: int,
                 counts: dict) -> RoundOutput:
    rnd = session.round
    by_name = {sp.name: sp for sp in specs}
    model = _fit_for_prediction(session, specs, s, reporter, added)
    fm = model.meta.get("feature_model", s.feature_model) if model is not None else s.feature_model
    eng = s.engine(fm)
    rows, shown, radii = [], [], {}
    for it, pk in predict(_featurise(specs, eng, reporter), model, lambda it: eng.radius_for(it.mic.frame.pixel_size),
                          s.threshold):
        radii[pk.name] = eng.radius_for(it.mic.frame.pixel_size)
        rows.append(PickRows(by_name[pk.name], pk.x, pk.y, pk.score))
        if len(shown) < MAX_OVERLAYS:
            shown.append((it, pk))
    particles = picks_to_dataset(rows, radii, s.flip_y, s.with_psize)
    folder = session.folder / "cryosparc" / f"predict_{rnd:03d}"
    save_dataset(folder / "particles.cs", particles)
    scores = np.concatenate([r.score for r in rows]) if rows else np.empty(0)
    thr = suggest_threshold(scores)
    count = expected_count(scores, model)
    plots = []
    if s.plots and shown:
        plots = _plots(folder, shown, [], session.labels.effective(), radii[shown[0][1].name], scores, thr, rnd)
        for path, caption in plots:
            reporter.plot(path, caption)
    summary = {"round": rnd, "predict": True, "labels_added": added, "inputs": counts, "micrographs": len(rows),
               "particles": len(particles), "suggested_threshold": round(thr, 4),
               "kept_at_suggested": int((scores >= thr).sum()),
               "expected_particles": count.to_dict(),
               "flip_y": s.flip_y}
    session.record(front_end="cryosparc", **summary)
    reporter.log(f"predicted {len(particles)} picks on {len(rows)} micrographs; suggested threshold {thr:.3f} keeps "
                 f"{summary['kept_at_suggested']} (set it in Inspect Picks, with CTF calibration off); expected "
                 f"particles {count.text} (the sum of the pick probabilities)")
    return RoundOutput(rnd, folder, particles, None, plots, summary)


def _plots(folder: Path, picks, proposals, labels, radius: float, scores, thr: float, rnd: int):
    from ..plots import plot_histogram

    out = []
    hist = folder / "score_histogram.png"
    plot_histogram(scores, str(hist), thr, title=f"round {rnd}: pick probabilities")
    out.append((str(hist), f"round {rnd}: pick probability histogram, suggested threshold {thr:.3f}"))
    for it, pk in picks[:MAX_OVERLAYS]:
        keep = pk.score >= thr
        q = [p for p in proposals if p.micrograph == pk.name]
        lab = [(l.x, l.y, l.label) for l in labels if l.micrograph == pk.name]
        path = folder / f"overlay_{pk.name}.png"
        _overlay(it, path, radius, picks=(pk.x[keep], pk.y[keep]),
                 queries=(np.array([p.x for p in q]), np.array([p.y for p in q])) if q else None, labels=lab,
                 title=f"{pk.name}: {int(keep.sum())} picks >= {thr:.2f} (blue), {len(q)} queries (yellow)")
        out.append((str(path), f"{pk.name}: picks (blue), queries (yellow), labels (green +, red x)"))
    return out
