"""The RELION job itself: one run in one job folder (inputs, session, labels in, a round or the final picks).

The steps live in mixins by seam: reading inputs (``inputs``), importing the user's answers
(``labels_in``), and writing outputs and pictures (``report``); this class runs them in order.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np

from ..atomic import copy_file, write_json
from .inputs import Inputs
from .labels_in import LabelImport
from .report import Report
from .settings import JobSettings
from .coordinates import extract_keeps, extract_threshold, file_digest, keep_for_extract, written_fom
from .markers import check_abort, write_output_nodes
from .micrographs import MicrographEntry
from .star import RelionError, mic_root


# --- logging to run.out / run.err ------------------------------------------------------------
class Log:
    """Progress with elapsed time on stdout (run.out); warnings also on stderr (run.err)."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self._seen: set[str] = set()

    def __call__(self, msg: str) -> None:
        print(f"[{time.perf_counter() - self.t0:7.1f} s] {msg}", flush=True)

    def warn(self, msg: str) -> None:
        if msg in self._seen:
            return
        self._seen.add(msg)
        self(f"WARNING: {msg}")
        print(f"WARNING: {msg}", file=sys.stderr, flush=True)


# --- the job ----------------------------------------------------------------------------------
class Job(Inputs, LabelImport, Report):
    """One run in one job folder.  Everything is project-relative (cwd = RELION project folder)."""

    def __init__(self, s: JobSettings, log: Log):
        self.s = s
        self.log = log
        self.out = s.outdir
        self.folder = Path(s.outdir)
        self.timing: dict[str, float] = {}

    # -- helpers ---------------------------------------------------------------------------
    def check(self) -> None:
        check_abort(self.out)

    def _timed(self, name: str, t0: float) -> None:
        self.timing[name] = round(self.timing.get(name, 0.0) + time.perf_counter() - t0, 2)

    def radius_of(self, entry: MicrographEntry) -> float:
        if self.s.radius_px:
            return float(self.s.radius_px)
        return float(self.diameter) / (2.0 * float(entry.pixel_size))

    def spec(self, entry: MicrographEntry):
        from ..workflow import MicrographSpec

        return MicrographSpec(str(entry.path), entry.key, self.s.pixel_size or entry.pixel_size,
                              extra={"relion_name": entry.name})

    def engine(self, feature_model: str, cache: bool = True):
        from ..workflow import EngineSettings

        return EngineSettings(radius_px=None, diameter_A=None, feature_model=feature_model,
                              working_pixel_size=self.s.working_pixel_size,
                              cache_dir=self.s.cache_dir if cache else None, device=self.s.device)


    # -- training set ----------------------------------------------------------------------
    def training_keys(self) -> list[str]:
        from ..workflow import choose_training

        keys = [e.key for e in self.table.entries]
        stored = [k for k in self.rstate.get("train", []) if k in self.by_key]
        base = stored or choose_training(keys, self.s.train_micrographs, self.s.seed)
        if stored and len(stored) < self.s.train_micrographs:  # asked for more: add, never drop (labels live there)
            rest = [k for k in keys if k not in stored]
            base = sorted(set(stored) | set(choose_training(rest, self.s.train_micrographs - len(stored), self.s.seed)))
        counts: dict[str, int] = {}
        for l in self.session.labels.effective():
            if l.micrograph in self.by_key:
                counts[l.micrograph] = counts.get(l.micrograph, 0) + 1
        extra = sorted((k for k in counts if k not in base), key=lambda k: (-counts[k], k))
        room = max(self.s.max_train_micrographs - len(base), 0)
        if len(extra) > room:
            self.log(f"note: labels on {len(extra)} more micrographs; learning on the {room} with most labels "
                     f"(--max_train_micrographs {self.s.max_train_micrographs})")
        train = sorted(set(base) | set(extra[:room]))
        self.rstate["train"] = sorted(set(base))
        return train


    # -- the run ---------------------------------------------------------------------------
    def run(self) -> dict:
        s = self.s
        self.read_inputs()
        model_meta = None
        if s.model:
            from ..model import BLR

            try:
                self.given_model = BLR.load(s.model)
            except (FileNotFoundError, ValueError) as exc:
                raise RelionError(f"--model {s.model}: {exc}") from exc
            model_meta = self.given_model.meta
        self.size_settings(model_meta)
        if s.working_pixel_size is None:  # features must be computed at the scale the model was fitted at
            wps = (model_meta or {}).get("working_pixel_size")
            s.working_pixel_size = round(float(wps), 2) if wps else 8.0
        self.open_session()
        self.rstate["in_mics"] = s.in_mics
        self.import_labels()
        self.check()
        if s.threads:
            import torch

            torch.set_num_threads(max(int(s.threads), 1))
        summary = self.predict_all() if s.final else self.labelling_round()
        summary["timing_s"] = self.timing
        write_json(self.folder / "summary.json", summary)
        nodes_path = write_output_nodes(self.out, self.nodes(), self.major)
        self.log(f"output nodes -> {nodes_path}")
        return summary

    def _featurise(self, keys: list[str], feature_model: str, cache: bool = True):
        from ..workflow import featurise

        entries = [self.by_key[k] for k in keys]
        return featurise([self.spec(e) for e in entries], self.engine(feature_model, cache),
                         progress=self.log, check=self.check)

    def _radius_for_training(self, train: list[str]) -> float:
        ps = np.array([self.s.pixel_size or self.by_key[k].pixel_size for k in train], float)
        if ps.size and (ps.max() - ps.min()) / ps.min() > 0.02:
            self.log.warn(f"training micrographs have different pixel sizes ({ps.min():g}-{ps.max():g} A); "
                          "the particle radius of the first is used for learning")
        return self.radius_of(self.by_key[train[0]])

    def labelling_round(self) -> dict:
        from ..extract import Picks
        from ..workflow import labelling_round, predict, suggest_threshold

        s, session = self.s, self.session
        rnd = session.round
        for msg in session.note_settings({"recipe": s.recipe, "feature_model": s.feature_model,
                                          "working_pixel_size": s.working_pixel_size}):
            self.log.warn(msg)
        train = self.training_keys()
        self.log(f"round {rnd}: learning on {len(train)} micrograph(s): {', '.join(train)}")
        t = time.perf_counter()
        items = list(self._featurise(train, s.feature_model))
        self._timed("features", t)
        self.check()
        radius = self._radius_for_training(train)
        t = time.perf_counter()
        res = labelling_round(session, items, s.engine_recipe(), radius, s.batch, s.feature_model, s.seed)
        if res.model is not None:
            res.model.save(session.model_path, round=rnd, n_labels=res.n_labels, diameter_A=self.diameter,
                           radius_px=radius)
        self._timed("fit_and_propose", t)
        self.log(f"fit {res.fit_s:.1f} s on {res.n_labels} labels ({res.n_positive} positive); "
                 f"{len(res.proposals)} queries in {res.propose_s:.1f} s; {res.note}")
        t = time.perf_counter()
        all_picks = {it.mic.name: pk for it, pk in
                     predict(items, res.model, lambda it: self.radius_of(self.by_key[it.mic.name]))}
        scores = np.concatenate([p.score for p in all_picks.values()]) if all_picks else np.empty(0)
        fom_thr = extract_threshold(scores, suggest_threshold(scores))
        thr = fom_thr.value
        picks = {k: keep_for_extract(p, thr) for k, p in all_picks.items()}
        queries = {}
        for k in train:
            q = [p for p in res.proposals if p.micrograph == k]
            queries[self.by_key[k].name] = Picks(k, np.array([p.x for p in q], float),
                                                 np.array([p.y for p in q], float),
                                                 np.array([p.score for p in q], float))
        self.check()
        names = [self.by_key[k].name for k in train]
        qlist, qfiles = self.write_coords(names, queries, "queries", "queries.star")
        plist, _ = self.write_coords(names, {self.by_key[k].name: p for k, p in picks.items()}, "autopick",
                                     "autopick.star")
        round_dir = self.folder / "rounds" / f"round_{rnd:03d}"
        for name, f in qfiles.items():  # our own copy: Display / Manual picking edit these files in place
            copy_file(f, round_dir / "queries" / (mic_root(name) + "_queries.star"))
        written = self.rstate.setdefault("written_queries", {})  # every file we ever wrote: unopened = ours
        written.update({f: {"digest": file_digest(f), "round": rnd} for f in qfiles.values()})
        self._timed("write", t)
        n_picks = int(sum(len(p) for p in picks.values()))
        pos, neg = session.labels.counts()
        summary = {"mode": "round", "round": rnd, "relion_version": self.major, "train": train,
                   "labels": {"positive": pos, "negative": neg}, "queries": len(res.proposals),
                   "queries_file": qlist, "picks_file": plist, "suggested_threshold": thr,
                   "picks_on_training_micrographs": n_picks, "model": str(session.model_path) if res.model else None}
        t = time.perf_counter()
        try:
            self.plots(round_dir, items, picks, res.proposals, thr, scores, summary)
        except Exception as exc:  # a picture must never cost the user a round
            self.log.warn(f"plots not written ({exc})")
        self._timed("plots", t)
        session.record(round=rnd, mode="relion-round", labels=res.n_labels, positives=res.n_positive, train=train,
                       queries=len(res.proposals), threshold=thr, fit_s=round(res.fit_s, 2),
                       propose_s=round(res.propose_s, 2), time=time.time())
        session.save_state(round=rnd + 1)
        self.log(f"round {rnd} done: {len(res.proposals)} queries -> {qlist}; {n_picks} picks with FOM > "
                 f"{fom_thr.text} (suggested threshold) -> {plist}")
        self.log("next: Display 'queries.star', delete non-particles, add missed ones (CTRL+1 + click: a red "
                 "negative), save with CTRL+S, then run this job again; --predict true for the final picks")
        return summary

    def predict_all(self) -> dict:
        from ..learner import ActiveLearner
        from ..workflow import expected_count, fit_calibrated, predict, session_audits, suggest_threshold

        s, session = self.s, self.session
        rnd = session.round
        keys = [e.key for e in self.table.entries]
        t = time.perf_counter()
        items = []
        if s.model:
            model = self.given_model
            feature_model = model.meta.get("feature_model", s.feature_model)
            for ext in (".npz", ".json"):
                src, dst = Path(s.model).with_suffix(ext), self.folder / f"model{ext}"
                if not dst.exists() or not os.path.samefile(src, dst):
                    shutil.copy2(src, dst)
            train: list[str] = []
            self.log(f"final run with the model {s.model} (feature model {feature_model}); no fitting")
        else:
            feature_model = s.feature_model
            train = self.training_keys()
            self.log(f"final run: fitting on {len(train)} micrograph(s) with {len(session.labels.effective())} labels")
            items = list(self._featurise(train, feature_model))
            self._timed("features", t)
            t = time.perf_counter()
            learner = ActiveLearner(items, self._radius_for_training(train), s.engine_recipe(), feature_model,
                                    seed=s.seed)
            # the rounds' fit, calibration included: the final FOMs are the probabilities the threshold assumes
            model = fit_calibrated(learner, session.labels.effective(), audits=session_audits(session))
            model.save(session.model_path, round=rnd, n_labels=len(session.labels.effective()),
                       diameter_A=self.diameter, radius_px=learner.radius_px)
            self._timed("fit", t)
            self.log(f"model -> {session.model_path} (+ .json); reuse it with --model {session.model_path}")
        t = time.perf_counter()
        radius = lambda it: self.radius_of(self.by_key[it.mic.name])  # noqa: E731
        all_picks: dict[str, object] = {}
        done = 0
        for it, pk in predict(items, model, radius):
            all_picks[it.mic.name] = pk
        rest = [k for k in keys if k not in all_picks]
        t_pred = time.perf_counter()
        for it, pk in predict(self._featurise(rest, feature_model, cache=s.cache_all), model, radius):
            all_picks[it.mic.name] = pk
            done += 1
            if len(items) < max(s.overlays, 0):
                items.append(it)  # kept only for the pictures
        self._timed("predict", t)
        if done:
            self.log(f"predicted {done} micrograph(s) in {time.perf_counter() - t_pred:.1f} s")
        self.check()
        scores = np.concatenate([p.score for p in all_picks.values()]) if all_picks else np.empty(0)
        optimum = suggest_threshold(scores)
        suggested = extract_threshold(scores, optimum)  # what Extract on candidates.star needs
        thr = s.threshold if s.threshold is not None else suggested.value
        thr_text = f"{s.threshold:g}" if s.threshold is not None else suggested.text
        t = time.perf_counter()
        names = [e.name for e in self.table.entries]
        by_name = {self.by_key[k].name: p for k, p in all_picks.items()}
        # autopick.star: exactly what Extract keeps from candidates.star at thr (FOM > thr)
        plist, _ = self.write_coords(names, {n: keep_for_extract(p, thr) for n, p in by_name.items()}, "autopick",
                                     "autopick.star")
        floor = min(s.min_fom, thr)  # candidates always hold every pick of autopick.star
        clist, _ = self.write_coords(names, {n: p.above(floor) for n, p in by_name.items()}, "candidates",
                                     "candidates.star")
        self._timed("write", t)
        n_picks = int(extract_keeps(written_fom(scores), thr).sum())
        count = expected_count(scores, model)
        pos, neg = session.labels.counts()
        summary = {"mode": "predict", "round": rnd, "relion_version": self.major, "micrographs": len(names),
                   "labels": {"positive": pos, "negative": neg}, "threshold": float(thr),
                   "suggested_threshold": suggested.value, "picks": n_picks,
                   "candidates": int((scores >= floor).sum()),
                   "expected_particles": count.to_dict(),
                   "picks_file": plist, "candidates_file": clist,
                   "model": str(self.folder / "model.npz")}
        write_json(self.folder / "threshold.json",
                   {"suggested_threshold": suggested.value, "suggested_threshold_text": suggested.text,
                    "threshold_used": float(thr), "max_expected_f1_probability": float(optimum),
                    "rule": "autopick.star holds the picks with FOM > threshold_used, as RELION's Extract keeps "
                            "them; Extract on candidates.star with 'Minimum autopick FOM' = suggested_threshold_text "
                            "keeps exactly the picks autopick.star has at the suggested threshold"})
        t = time.perf_counter()
        try:
            by_key = {k: keep_for_extract(p, thr) for k, p in all_picks.items()}
            self.plots(self.folder / "rounds" / f"final_{rnd:03d}", items, by_key, [], thr, scores, summary)
        except Exception as exc:
            self.log.warn(f"plots not written ({exc})")
        self._timed("plots", t)
        session.record(round=rnd, mode="relion-predict", micrographs=len(names), threshold=float(thr),
                       suggested=suggested.value, picks=n_picks, time=time.time())
        self.log(f"final picks: {n_picks} on {len(names)} micrographs with FOM > {thr_text} -> {plist}; "
                 f"all {summary['candidates']} candidates with FOM >= {floor:g} -> {clist}")
        self.log(f"suggested FOM threshold for Extract: {suggested.text} (Particle extraction on {clist} with "
                 f"'Minimum autopick FOM' {suggested.text} keeps exactly the picks autopick.star has at it; "
                 "RELION keeps FOM > threshold)")
        self.log(f"expected particles: {count.text} (the sum of the calibrated pick "
                 "probabilities, and the range its calibration allows; compare it with the picks you keep)")
        return summary
