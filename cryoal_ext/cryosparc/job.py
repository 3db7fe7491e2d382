"""cryoSPARC: one active-learning round per run, as an external job (cryosparc-tools) or offline on .cs files.

Offline:  cryoal cryosparc --exposures exposures.cs --project-dir P --session S --radius-px 28 --out queries.cs
Live:     cryoal cryosparc --project P3 --workspace W1 --exposures-job J12 --session S --radius-px 28

Every run is one round kept in the session folder (labels are only ever appended, a re-run
resumes): labels come in (the reviewed queries of the last round, extra positives/negatives),
the model is refitted, and a ``queries`` particle set goes out for the next review in Manual
Picker, with the current picks as ``particles``.  ``--predict`` picks every exposure instead.
The live layer is a thin shell over cryosparc-tools' public API; all data handling is shared
with the offline mode (``cryoal_ext.cryosparc``).
"""
from __future__ import annotations

import argparse
import hashlib
import inspect
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path, PurePath
import numpy as np

from .atomic import folder_lock
from .features import DEFAULT_FEATURE_MODEL
from .cryosparc import (PickRows, check_shape, copy_into, exposures_to_specs, load_dataset,
                        particles_to_edited, particles_to_labels, picks_to_dataset, proposals_to_rows, save_dataset,
                        uids_of)
from .labels import Label
from .learner import ActiveLearner
from .model import BLR
from .recipes import get_recipe
from .review import Answer, Edited, apply_answers
from .session import Session
from .workflow import EngineSettings, MicrographSpec, choose_training, featurise, labelling_round, predict, \
    suggest_threshold

CONFIG_ENV = "CRYOAL_CRYOSPARC_CONFIG"
DEFAULT_CONFIG = Path("~/.config/cryoal/cryosparc.yaml")
MAX_OVERLAYS = 4


class CryoSPARCLiveError(RuntimeError):
    """A problem talking to a cryoSPARC instance (connection, unknown project/job, missing output or slot)."""


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
    seed: int = 0
    flip_y: bool = False
    threshold: float | None = 0.01  # lowest probability written to `particles`
    predict: bool = False
    model: str | None = None
    with_psize: bool = False
    plots: bool = True

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
    from .plots import plot_overlay

    f = item.mic.frame
    plot_overlay(item.mic.image, str(path), picks=picks, queries=queries, labels=labels,
                 radius=f.radius_to_working(radius), title=title, scale=(f.scale_x, f.scale_y))


def check_sizes(specs: list[MicrographSpec], s: RoundSettings) -> None:
    """The particle must fit every exposure (micrograph_blob/shape) and its working image the memory,
    checked from the dataset alone before any label is read or micrograph loaded."""
    from .validate import SizeRules, available_memory, check_micrograph

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
    res = labelling_round(session, items, get_recipe(s.recipe), radius, s.batch, s.feature_model, s.seed)
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
                 f"suggested threshold {thr:.3f}")
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
    learner = ActiveLearner(items, radius, get_recipe(s.recipe), s.feature_model, seed=s.seed)
    model = learner.fit(labels)
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
    plots = []
    if s.plots and shown:
        plots = _plots(folder, shown, [], session.labels.effective(), radii[shown[0][1].name], scores, thr, rnd)
        for path, caption in plots:
            reporter.plot(path, caption)
    summary = {"round": rnd, "predict": True, "labels_added": added, "inputs": counts, "micrographs": len(rows),
               "particles": len(particles), "suggested_threshold": round(thr, 4),
               "kept_at_suggested": int((scores >= thr).sum()), "flip_y": s.flip_y}
    session.record(front_end="cryosparc", **summary)
    reporter.log(f"predicted {len(particles)} picks on {len(rows)} micrographs; suggested threshold {thr:.3f} keeps "
                 f"{summary['kept_at_suggested']} (set it in Inspect Picks, with CTF calibration off)")
    return RoundOutput(rnd, folder, particles, None, plots, summary)


def _plots(folder: Path, picks, proposals, labels, radius: float, scores, thr: float, rnd: int):
    from .plots import plot_histogram

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


# --- connection (live) --------------------------------------------------------------------------
@dataclass
class ConnectionSettings:
    """How to reach cryoSPARC; secrets never appear in repr or messages."""

    base_url: str | None = None
    host: str | None = None
    base_port: int | None = None
    email: str | None = None
    password: str | None = field(default=None, repr=False)
    license: str | None = field(default=None, repr=False)
    origin: dict = field(default_factory=dict)  # setting -> where it came from (flag, env, file)

    @property
    def url(self) -> str:
        if self.base_url:
            return self.base_url.rstrip("/")
        return f"http://{self.host or 'localhost'}:{int(self.base_port or 39000)}"

    def host_port(self) -> tuple[str, int]:
        if self.base_url:
            from urllib.parse import urlparse

            u = urlparse(self.base_url if "://" in self.base_url else f"http://{self.base_url}")
            return u.hostname or "localhost", int(u.port or 39000)
        return self.host or "localhost", int(self.base_port or 39000)

    def describe(self) -> str:
        who = self.email or "(saved cryosparc-tools login)"
        return f"{self.url} as {who}" + (" with a password" if self.password else "")


def _read_yaml(path: Path) -> dict:
    import yaml

    try:
        data = yaml.safe_load(path.read_text()) or {}
    except Exception as exc:
        raise ValueError(f"{path}: not a readable YAML file ({exc})") from exc
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of connection settings")
    known = {"url", "base_url", "host", "port", "base_port", "email", "password", "password_file", "license"}
    bad = set(data) - known
    if bad:
        raise ValueError(f"{path}: unknown setting(s) {', '.join(sorted(bad))} (known: {', '.join(sorted(known))})")
    if data.get("password") and os.name == "posix" and path.stat().st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        import warnings

        warnings.warn(f"{path} holds a password and is readable by others: chmod 600 {path}")
    return data


def _read_password_file(path: str) -> str:
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"password file not found: {p}")
    return p.read_text().rstrip("\r\n")


def connection_settings(args, env: dict | None = None) -> ConnectionSettings:
    """Flags win over the environment, which wins over the YAML file (--config, $CRYOAL_CRYOSPARC_CONFIG,
    or ~/.config/cryoal/cryosparc.yaml).  There is deliberately no --password flag."""
    env = os.environ if env is None else env
    layers: list[tuple[str, dict]] = []
    cfg = getattr(args, "config", None) or env.get(CONFIG_ENV)
    path = Path(cfg).expanduser() if cfg else DEFAULT_CONFIG.expanduser()
    if cfg and not path.exists():
        raise ValueError(f"cryoSPARC connection file not found: {path}")
    if path.exists():
        y = _read_yaml(path)
        if y.get("password_file"):
            y["password"] = _read_password_file(str(y["password_file"]))
        layers.append((f"file {path}", {"base_url": y.get("base_url") or y.get("url"), "host": y.get("host"),
                                        "base_port": y.get("base_port") or y.get("port"), "email": y.get("email"),
                                        "password": y.get("password"), "license": y.get("license")}))
    layers.append(("environment", {"base_url": env.get("CRYOSPARC_BASE_URL"),
                                   "host": env.get("CRYOSPARC_MASTER_HOSTNAME"),
                                   "base_port": env.get("CRYOSPARC_BASE_PORT"), "email": env.get("CRYOSPARC_EMAIL"),
                                   "password": env.get("CRYOSPARC_PASSWORD"),
                                   "license": env.get("CRYOSPARC_LICENSE_ID")}))
    pw_file = getattr(args, "password_file", None)
    layers.append(("flags", {"base_url": getattr(args, "url", None), "host": getattr(args, "host", None),
                             "base_port": getattr(args, "port", None), "email": getattr(args, "email", None),
                             "password": _read_password_file(pw_file) if pw_file else None, "license": None}))
    out = ConnectionSettings()
    for origin, vals in layers:
        if vals.get("base_url") and (vals.get("host") or vals.get("base_port")):
            raise ValueError(f"{origin}: give either a URL or a host and port, not both")
        for key, value in vals.items():
            if value in (None, ""):
                continue
            if key == "base_url":
                out.host, out.base_port = None, None
            elif key in ("host", "base_port"):
                out.base_url = None
            setattr(out, key, int(value) if key == "base_port" else str(value))
            out.origin[key] = origin
    if not (out.base_url or out.host):
        raise ValueError("no cryoSPARC address: give --url (or --host/--port), $CRYOSPARC_BASE_URL, or a "
                         f"connection file ({DEFAULT_CONFIG})")
    return out


def _scrub(text: str, c: ConnectionSettings) -> str:
    for secret in (c.password, c.license):
        if secret:
            text = text.replace(secret, "***").replace(hashlib.sha256(secret.encode()).hexdigest(), "***")
    return text


def _short(exc: BaseException, c: ConnectionSettings | None = None) -> str:
    text = str(exc).strip().splitlines()
    text = text[0] if text else type(exc).__name__
    return _scrub(text, c) if c else text


def connect(c: ConnectionSettings, factory=None):
    """A CryoSPARC client, with keyword arguments that suit cryosparc-tools 5.x (base_url) and 4.x (license)."""
    if factory is None:
        from cryosparc.tools import CryoSPARC as factory
    params = inspect.signature(factory.__init__).parameters
    # every keyword is passed explicitly: cryosparc-tools evaluates its env defaults at import time
    if "base_url" in params:
        kw = {"base_url": c.base_url, "host": None, "base_port": None} if c.base_url else \
            {"base_url": None, "host": c.host or "localhost", "base_port": int(c.base_port or 39000)}
        if c.license:
            kw["license"] = c.license
    else:  # cryosparc-tools 4.x: CryoSPARC(license, host, base_port, email, password)
        host, port = c.host_port()
        kw = {"host": host, "base_port": port, "license": c.license}
    kw.update(email=c.email, password=c.password)
    try:
        return factory(**kw)
    except Exception as exc:
        raise CryoSPARCLiveError(f"cannot connect to cryoSPARC at {c.describe()}: {_short(exc, c)}") from None


def dir_of(obj) -> str:
    """Project/job directory: a property in cryosparc-tools 5.x, a method in 4.x."""
    d = getattr(obj, "dir")
    if isinstance(d, (str, PurePath)):
        return str(d)
    return str(d())


def find_project(cs, project_uid: str):
    try:
        return cs.find_project(project_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown project {project_uid} ({_short(exc)})") from None


def check_workspace(project, workspace_uid: str) -> None:
    finder = getattr(project, "find_workspace", None)
    if finder is None:
        return
    try:
        finder(workspace_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown workspace {workspace_uid} in project {project.uid} "
                                 f"({_short(exc)})") from None


def find_job(project, job_uid: str):
    try:
        return project.find_job(job_uid)
    except Exception as exc:
        raise CryoSPARCLiveError(f"unknown job {job_uid} in project {project.uid} ({_short(exc)})") from None


def output_results(job, output: str) -> list[str] | None:
    """Slots (results) of a job output, or None when this cryosparc-tools cannot tell.

    Raises a clear error when the output itself does not exist.
    """
    names, slots = None, None
    outs = getattr(job, "outputs", None)
    if isinstance(outs, dict):  # 5.x models
        names = list(outs)
        if output in outs:
            slots = [r.name for r in getattr(outs[output], "results", [])]
    else:
        doc = getattr(job, "doc", None)  # 4.x documents
        if isinstance(doc, dict):
            names = [g.get("name") for g in doc.get("output_result_groups", [])]
            slots = [r.get("name") for r in doc.get("output_results", []) if r.get("group_name") == output]
    if names is not None and output not in names:
        raise CryoSPARCLiveError(f"job {job.uid} has no output {output!r} (outputs: {', '.join(names) or 'none'})")
    return slots or None


def check_output(job, output: str, slot: str) -> None:
    slots = output_results(job, output)
    if slots is not None and slot not in slots:
        raise CryoSPARCLiveError(f"{job.uid}.{output} has no slot {slot!r} (slots: {', '.join(slots)})")


class JobReporter(Reporter):
    """Log lines, a progress line updated in place, and plots in the external job's event log."""

    def __init__(self, job):
        self.job = job
        self._named = "name" in inspect.signature(job.log).parameters

    def log(self, text: str, level: str = "text") -> None:
        print(text, flush=True)
        self.job.log(text, level=level)

    def progress(self, text: str) -> None:
        print(text, flush=True)
        if self._named:
            self.job.log(text, name="progress")
        else:
            self.job.log(text)

    def plot(self, path: str, caption: str) -> None:
        self.job.log_plot(path, caption, formats=["png"])


@dataclass
class LiveSpec:
    """What to read from and write to the cryoSPARC project."""

    project: str
    workspace: str
    exposures_job: str
    exposures_output: str = "exposures"
    reviewed: tuple[str, str] | None = None  # (job, output)
    positives: list[tuple[str, str]] = field(default_factory=list)
    negatives: list[tuple[str, str]] = field(default_factory=list)
    title: str = "cryoAL active-learning picker"
    project_dir: str | None = None  # as this node sees it; default: the project's directory


def run_live(cs, live: LiveSpec, session_dir: str, s: RoundSettings,
             extra_inputs: list[LabelInput] = ()) -> RoundOutput:
    """Create the external job, connect its inputs, run one round inside ``job.run()``, save its outputs."""
    project = find_project(cs, live.project)
    check_workspace(project, live.workspace)
    src = find_job(project, live.exposures_job)
    check_output(src, live.exposures_output, "micrograph_blob")
    connections = []  # (input name, job, output, kind)
    if live.reviewed:
        connections.append(("reviewed", *live.reviewed, "reviewed"))
    for kind, pairs in (("positive", live.positives), ("negative", live.negatives)):
        connections += [(f"{kind}s_{i}" if i else f"{kind}s", j, o, kind) for i, (j, o) in enumerate(pairs)]
    for _, j, o, _ in connections:
        check_output(find_job(project, j), o, "location")

    mode = "final picks" if s.predict else "labelling round"
    job = project.create_external_job(live.workspace, title=live.title,
                                      desc=f"cryoal_ext {mode}; session {os.path.abspath(session_dir)}")
    job.connect("exposures", live.exposures_job, live.exposures_output, slots=["micrograph_blob"])
    for name, j, o, _ in connections:
        job.connect(name, j, o, slots=["location"])
    job.add_output("particle", "particles", slots=["location", "pick_stats"], title="Particles (cryoAL picks)")
    if not s.predict:
        job.add_output("particle", "queries", slots=["location", "pick_stats"],
                       title="Queries: review in Manual Picker, then run the next round")
    reporter = JobReporter(job)
    with job.run():
        reporter.log(f"external job {job.uid} ({dir_of(job)}): {mode}")
        exposures = job.load_input("exposures")
        inputs = [LabelInput(job.load_input(name), f"{j}.{o}", kind) for name, j, o, kind in connections]
        project_dir = live.project_dir or dir_of(project)
        out = run_round(session_dir, exposures, project_dir, list(extra_inputs) + inputs, s, reporter,
                        exposures_source=f"{live.exposures_job}.{live.exposures_output}")
        for name, dset in (("particles", out.particles), ("queries", out.queries)):
            if dset is None:
                continue
            alloc = job.alloc_output(name, dset["uid"])
            skipped = copy_into(alloc, dset)
            if skipped:
                reporter.log(f"{name}: this cryoSPARC has no field(s) {', '.join(skipped)}; left out", level="warning")
            job.save_output(name, alloc)
        reporter.log(f"saved outputs: particles ({len(out.particles)})"
                     + ("" if out.queries is None else f", queries ({len(out.queries)})")
                     + f"; connect them with the micrographs of {live.exposures_job}.{live.exposures_output}")
    out.summary["job"] = job.uid
    return out


# --- command line -------------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    from .commands.common import add_engine_arguments, add_size_arguments
    from .validate import positive_int, probability

    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--exposures", help="offline: exposures .cs file, e.g. <project>/J12/J12_exposures_accepted.cs")
    src.add_argument("--exposures-job", help="live: job uid whose output gives the exposures, e.g. J12")
    p.add_argument("--session", required=True, help="session folder (labels, model, queries shown); a re-run resumes")
    add_size_arguments(p)
    p.add_argument("--project-dir", default=None,
                   help="the cryoSPARC project folder as this node sees it (micrograph_blob/path is relative to it); "
                        "offline default: the current folder; live default: the project's directory")
    p.add_argument("--predict", action="store_true", help="final run: (re)fit on every label and pick every exposure")
    p.add_argument("--threshold", type=probability, default=0.01,
                   help="lowest probability written to particles (default %(default)s; threshold in Inspect Picks)")
    p.add_argument("--model", default=None, help="with --predict: pick with this model.npz instead of the session's")
    p.add_argument("--flip-y", action="store_true",
                   help="center_y_frac = 1 - y/ny (only if picks land mirrored top-bottom; fixed per session)")
    p.add_argument("--with-psize", action="store_true", help="also write location/micrograph_psize_A")
    p.add_argument("--batch", type=positive_int, default=10, help="queries per round (default %(default)s)")
    p.add_argument("--train-micrographs", type=positive_int, default=2,
                   help="micrographs queried per round (default %(default)s)")
    p.add_argument("--recipe", default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-plots", action="store_true", help="skip overlays and histograms")

    off = p.add_argument_group("offline (.cs files)")
    off.add_argument("--out", help="offline: write queries (or, with --predict, picks) to this .cs file")
    off.add_argument("--picks", default=None,
                     help="offline round: also write the current picks on the queried micrographs")
    off.add_argument("--reviewed", default=None, help="the last round's queries after review in Manual Picker (.cs)")
    off.add_argument("--positives", action="append", default=[], help="particles (.cs) to add as positives")
    off.add_argument("--negatives", action="append", default=[], help="particles (.cs) to add as negatives "
                                                                       "(e.g. Select 2D's particles_excluded)")

    live = p.add_argument_group("live (cryoSPARC instance through cryosparc-tools)")
    live.add_argument("--project", help="project uid, e.g. P3")
    live.add_argument("--workspace", help="workspace uid for the external job, e.g. W1")
    live.add_argument("--exposures-output", default="exposures", help="output of --exposures-job (default %(default)s)")
    live.add_argument("--reviewed-job", help="Manual Picker job in which the last queries were reviewed")
    live.add_argument("--reviewed-output", default="particles", help="(default %(default)s)")
    live.add_argument("--positives-job", "--particles-job", dest="positives_job", action="append", default=[],
                      help="job whose particles are positives (repeatable)")
    live.add_argument("--positives-output", default="particles", help="(default %(default)s)")
    live.add_argument("--negatives-job", action="append", default=[], help="job whose particles are negatives")
    live.add_argument("--negatives-output", default="particles_excluded", help="(default %(default)s)")
    live.add_argument("--title", default="cryoAL active-learning picker", help="external job title")
    conn = p.add_argument_group("connection (flags > environment > YAML file; no password flag)")
    conn.add_argument("--config", default=None, help=f"YAML file with url/host/port/email/password_file "
                                                     f"(default ${CONFIG_ENV} or {DEFAULT_CONFIG})")
    conn.add_argument("--url", default=None, help="cryoSPARC web address, e.g. http://cs.example.org:39000")
    conn.add_argument("--host", default=None)
    conn.add_argument("--port", type=int, default=None, help="cryoSPARC base port (default 39000)")
    conn.add_argument("--email", default=None)
    conn.add_argument("--password-file", default=None, help="file holding the password (or $CRYOSPARC_PASSWORD, "
                                                           "or a saved `python -m cryosparc.tools login`)")
    add_engine_arguments(p)


def settings_from_args(args) -> RoundSettings:
    return RoundSettings(radius_px=args.radius_px, diameter_A=args.diameter_A, feature_model=args.feature_model,
                         working_pixel_size=args.working_pixel_size, cache_dir=args.cache_dir, device=args.device,
                         pixel_size=args.pixel_size, batch=args.batch, train_micrographs=args.train_micrographs,
                         recipe=args.recipe, seed=args.seed, flip_y=args.flip_y,
                         threshold=args.threshold if args.threshold and args.threshold > 0 else None,
                         predict=args.predict, model=args.model, with_psize=args.with_psize, plots=not args.no_plots)


def _file_inputs(args) -> list[LabelInput]:
    out = []
    if args.reviewed:
        out.append(LabelInput(load_dataset(args.reviewed, "reviewed particles"), str(args.reviewed), "reviewed"))
    out += [LabelInput(load_dataset(f, "positive particles"), str(f), "positive") for f in args.positives]
    out += [LabelInput(load_dataset(f, "negative particles"), str(f), "negative") for f in args.negatives]
    return out


def main(args) -> int:
    from .commands.common import apply_threads

    from .validate import check_writable

    apply_threads(args)
    s = settings_from_args(args)
    check_writable(args.session, "session folder (--session)")
    check_writable(args.cache_dir, "feature cache folder (--cache-dir)")
    for f in (args.out, args.picks):
        if f:
            check_writable(Path(f).parent, f"folder of {f}")
    if s.model and not s.predict:
        raise ValueError("--model is only used with --predict")
    if args.exposures:
        if not args.out:
            raise ValueError("offline mode needs --out FILE.cs")
        if args.picks and s.predict:
            raise ValueError("with --predict the picks go to --out; drop --picks")
        exposures = load_dataset(args.exposures, "exposures")
        project_dir = args.project_dir or os.getcwd()
        out = run_round(args.session, exposures, project_dir, _file_inputs(args), s, Reporter(),
                        exposures_source=str(args.exposures))
        if s.predict:
            save_dataset(args.out, out.particles)
            print(f"{len(out.particles)} picks -> {args.out} (session copy {out.folder / 'particles.cs'})")
        else:
            save_dataset(args.out, out.queries)
            print(f"{len(out.queries)} queries -> {args.out}: open them in Manual Picker (or edit), then run the "
                  f"next round with --reviewed <edited.cs>")
            if args.picks:
                save_dataset(args.picks, out.particles)
                print(f"{len(out.particles)} picks -> {args.picks}")
        return 0
    missing = [f for f in ("project", "workspace") if not getattr(args, f)]
    if missing:
        raise ValueError(f"live mode needs --{' --'.join(missing)}")
    if args.out or args.picks:
        raise ValueError("--out/--picks are for offline mode (--exposures FILE.cs); live results are job outputs")
    live = LiveSpec(project=args.project, workspace=args.workspace, exposures_job=args.exposures_job,
                    exposures_output=args.exposures_output,
                    reviewed=(args.reviewed_job, args.reviewed_output) if args.reviewed_job else None,
                    positives=[(j, args.positives_output) for j in args.positives_job],
                    negatives=[(j, args.negatives_output) for j in args.negatives_job],
                    title=args.title, project_dir=args.project_dir)
    c = connection_settings(args)
    print(f"connecting to {c.describe()}", flush=True)
    cs = connect(c)
    out = run_live(cs, live, args.session, s, _file_inputs(args))
    print(f"external job {out.summary.get('job')}: outputs particles"
          + ("" if out.queries is None else " and queries") + f"; session {args.session}")
    return 0


