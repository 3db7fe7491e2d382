"""The napari plugin's controller, without Qt or napari: open, label, retrain, predict, export, import.

Runs on the bundled EMPIAR-10028 crops (features cached in $CRYOAL_CACHE or a temporary folder).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryoal_ext.cryosparc.data import load_dataset
from cryoal_ext.files import read_coordinates
from cryoal_ext.labels import Label, LabelStore
from cryoal_ext.napari.controller import LabellingController, lowpass, stable_uid
from cryoal_ext.oracle import Oracle
from cryoal_ext.relion.coordinates import read_picks_table
from cryoal_ext.workflow import EngineSettings

sys.path.insert(0, os.path.dirname(__file__))  # conftest helpers, under any pytest import mode
from conftest import cryosparc_project_of, relion_project_of  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cryoal_ext" / "example_data" / "empiar10028_small"
MICS = EXAMPLE / "micrographs"
RADIUS = 28.0


def truth() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    t = pd.read_csv(EXAMPLE / "particles.txt", sep="\t", dtype={"image_name": str})
    return {n: (g["x_coord"].to_numpy(float), g["y_coord"].to_numpy(float)) for n, g in t.groupby("image_name")}


def controller(feature_cache: str, **kw) -> LabellingController:
    return LabellingController(EngineSettings(radius_px=RADIUS, cache_dir=feature_cache), **kw)


def label_set(labels) -> set:
    return {(l.micrograph, round(l.x, 1), round(l.y, 1), l.label) for l in labels}


def same_labels(a, b, atol: float) -> bool:
    """The same labels, coordinates equal within ``atol`` (files round them)."""
    def key(ls):
        return sorted((l.micrograph, l.label, l.x, l.y) for l in ls)

    ka, kb = key(a), key(b)
    return len(ka) == len(kb) and all(
        p[:2] == q[:2] and abs(p[2] - q[2]) <= atol and abs(p[3] - q[3]) <= atol for p, q in zip(ka, kb))


def answer_all(c: LabellingController, oracle: Oracle) -> int:
    """Answer every pending proposal as the oracle would (accept if within the radius of a particle)."""
    n = 0
    while c.current is not None:
        lab = oracle.answer([c.current])[0]
        c.accept() if lab.label else c.reject()
        n += 1
    return n


# --- opening -------------------------------------------------------------------------------------
def test_open_folder_files_relion_star_and_cryosparc_cs(tmp_path, feature_cache):
    c = controller(feature_cache)
    names = c.open(MICS)
    assert names == ["061_10028_crop", "311_10028_crop", "312_10028_crop"] and c.source_kind == "folder"
    assert c.open(MICS / "311_10028_crop.mrc") == ["311_10028_crop"] and c.source_kind == "mrc"
    assert c.open([MICS / "312_10028_crop.mrc", MICS / "061_10028_crop.mrc"]) == ["312_10028_crop", "061_10028_crop"]

    # a RELION project: MotionCorr/job002/Movies/*.mrc and a micrographs STAR naming them project-relative
    proj, star = relion_project_of(MICS, tmp_path / "relion")
    names = c.open(star)  # project folder found above the STAR
    assert names == ["061_10028_crop", "311_10028_crop", "312_10028_crop"] and c.source_kind == "relion"
    assert c.project_dir == proj
    assert c.specs["311_10028_crop"].extra["relion_name"] == "MotionCorr/job002/Movies/311_10028_crop.mrc"
    assert c.pixel_size_of("311_10028_crop") == pytest.approx(5.36)
    assert c.resolve("MotionCorr/job002/Movies/061_10028_crop.mrc") == "061_10028_crop"

    # a cryoSPARC project: J2/imported/*.mrc and J2/exposures.cs (project-relative micrograph_blob/path)
    cs_proj, cs = cryosparc_project_of(MICS, tmp_path / "cs")
    names = c.open(cs)
    assert names == ["061_10028_crop", "311_10028_crop", "312_10028_crop"] and c.source_kind == "cryosparc"
    assert c.project_dir == cs_proj and c.specs["061_10028_crop"].extra["shape"] == (512, 512)

    with pytest.raises(FileNotFoundError):
        c.open(tmp_path / "missing.mrc")
    with pytest.raises(ValueError, match="not a micrograph"):
        c.open(EXAMPLE / "particles.txt")


# --- the loop ------------------------------------------------------------------------------------
def test_label_retrain_predict_loop_with_session(tmp_path, feature_cache):
    c = controller(feature_cache, batch=8, session_dir=tmp_path / "session")
    c.open(MICS)
    c.ensure_features(["311_10028_crop", "312_10028_crop"])
    info = c.retrain()
    assert info.fitted == (c.recipe.pseudo_labels > 0)  # no labels: pseudo-labels if the recipe has them
    assert info.n_proposals == 8 and info.train == ["311_10028_crop", "312_10028_crop"]
    assert c.current is c.proposals[0]
    # proposals come one micrograph after another
    mics = [p.micrograph for p in c.proposals]
    assert mics == sorted(mics, key=mics.index)
    oracle = Oracle(truth(), RADIUS, mode="literal")
    assert answer_all(c, oracle) == 8 and c.current is None
    assert len(c.labels) == 8
    first = {(p.micrograph, round(p.x), round(p.y)) for p in c.proposals}

    t = time.perf_counter()
    info = c.retrain()
    wall = time.perf_counter() - t
    assert info.fitted and info.n_labels == 8 and c.model is not None
    # target: within a second on an idle CPU (0.2-0.4 s measured); generous here, the CI machine is shared
    assert wall < 3.0, f"retrain took {wall:.2f} s"
    second = {(p.micrograph, round(p.x), round(p.y)) for p in c.proposals}
    assert not first & second  # a labelled spot is never proposed again
    for p in c.proposals:
        near = [l for l in c.labels if l.micrograph == p.micrograph and np.hypot(l.x - p.x, l.y - p.y) < 0.5 * RADIUS]
        assert not near
    # skip leaves a proposal pending but unlabelled
    skipped = c.current
    c.skip()
    assert c.current is not skipped and skipped in c.pending() and len(c.labels) == 8

    # the session folder has what the CLI's sessions have
    s = tmp_path / "session"
    assert (s / "labels.tsv").exists() and (s / "model.npz").exists() and (s / "model.json").exists()
    assert (s / "proposals" / "round_000.tsv").exists() and (s / "proposals" / "round_001.tsv").exists()
    assert len(LabelStore(s / "labels.tsv").effective()) == 8
    resumed = controller(feature_cache, session_dir=s)
    assert resumed.round == 2 and same_labels(resumed.labels, c.labels, atol=0.006) and resumed.model is not None

    # picks of the training micrographs come with every round; predict adds the rest
    assert set(c.picks) == {"311_10028_crop", "312_10028_crop"}
    steps = list(c.predict())
    assert [s[:2] for s in steps] == [(1, 3), (2, 3), (3, 3)] and set(c.picks) == set(c.names)
    assert 0.0 < c.threshold < 1.0
    counts = [c.count(t) for t in (0.1, 0.3, 0.5, 0.7, 0.9)]
    assert counts == sorted(counts, reverse=True) and counts[0] > counts[-1]
    assert c.count(0.5) == sum(len(c.picks_above(n, 0.5)) for n in c.names)


def test_predict_can_be_stopped(feature_cache):
    c = controller(feature_cache)
    c.open(MICS)

    class Stop(Exception):
        pass

    calls = []

    def check():
        calls.append(1)
        if len(calls) > 1:
            raise Stop

    with pytest.raises(Stop):
        list(c.predict(check=check))
    assert len(c.picks) == 1


def test_exports_reread_and_import_back(tmp_path, feature_cache):
    c = controller(feature_cache, batch=6)
    c.open(MICS)
    c.ensure_features(["061_10028_crop"])
    c.retrain()
    answer_all(c, Oracle(truth(), RADIUS, mode="literal"))
    assert c.counts()[0] > 0 and c.counts()[1] > 0
    c.retrain()
    list(c.predict())
    t = 0.5
    want = {n: c.picks_above(n, t) for n in c.names}
    n_want = sum(len(p) for p in want.values())
    assert n_want == c.count(t) > 0

    # picks: Topaz txt, RELION STAR, cryoSPARC .cs (+ exposures, since the source was plain files)
    (txt,) = c.export_picks(tmp_path / "picks.txt", threshold=t)
    (star,) = c.export_picks(tmp_path / "picks.star", threshold=t)
    cs, exposures = c.export_picks(tmp_path / "picks.cs", threshold=t)
    assert exposures.name == "picks_exposures.cs"
    for path in (txt, star):
        table = read_coordinates(path)
        assert len(table) == n_want
        for name, g in table.groupby("image_name"):
            p = want[name]
            assert np.allclose(np.sort(g["x"].to_numpy()), np.sort(p.x), atol=0.06)
            assert np.allclose(np.sort(g["score"].to_numpy()), np.sort(p.score), atol=1e-5)
    parts, exps = load_dataset(cs), load_dataset(exposures)
    assert len(parts) == n_want and len(exps) == 3
    assert set(np.asarray(parts["location/micrograph_uid"]).tolist()) <= set(np.asarray(exps["uid"]).tolist())
    uid = stable_uid("061_10028_crop")
    sel = np.asarray(parts["location/micrograph_uid"]) == uid
    x = np.sort(np.asarray(parts["location/center_x_frac"])[sel] * 512)
    assert np.allclose(x, np.sort(want["061_10028_crop"].x), atol=0.05)
    assert np.allclose(np.sort(np.asarray(parts["pick_stats/ncc_score"])[sel]), np.sort(want["061_10028_crop"].score),
                       atol=1e-6)

    # labels: every format back into a fresh controller gives the same labels
    pos, neg = c.counts()
    (lstar,) = c.export_labels(tmp_path / "labels.star")
    t2 = read_picks_table(lstar)
    assert len(t2) == pos + neg and int(t2["label"].sum()) == pos
    ltsv = c.export_labels(tmp_path / "labels.tsv")
    lcs = c.export_labels(tmp_path / "labels.cs")
    ltxt = c.export_labels(tmp_path / "labels.txt")
    assert [p.name for p in lcs] == ["labels_positive.cs", "labels_negative.cs"]
    assert [p.name for p in ltxt] == ["labels_positive.txt", "labels_negative.txt"]
    assert len(load_dataset(lcs[0])) == pos and len(load_dataset(lcs[1])) == neg
    for files in ([lstar], ltsv):  # these carry the label
        d = controller(feature_cache)
        d.open(MICS)
        for f in files:
            assert d.import_labels(f) == (pos + neg, 0)
        assert same_labels(d.labels, c.labels, atol=0.006)
    for files in (lcs, ltxt):  # positives and negatives as two files
        d = controller(feature_cache)
        d.open(MICS)
        assert d.import_labels(files[0]) == (pos, 0)
        assert d.import_labels(files[1], label=0) == (neg, 0)
        assert same_labels(d.labels, c.labels, atol=0.06)

    # existing picks as labels: the expert picks, as positives; names not open are counted
    d = controller(feature_cache)
    d.open([MICS / "061_10028_crop.mrc", MICS / "311_10028_crop.mrc"])
    added, unmatched = d.import_labels(EXAMPLE / "particles.txt", label=1)
    tr = truth()
    assert added == len(tr["061_10028_crop"][0]) + len(tr["311_10028_crop"][0])
    assert unmatched == len(tr["312_10028_crop"][0]) and d.counts() == (added, 0)


def test_model_save_and_load_give_the_same_picks(tmp_path, feature_cache):
    c = controller(feature_cache, batch=6)
    c.open(MICS)
    with pytest.raises(ValueError, match="no model"):
        c.save_model(tmp_path / "m.npz")
    c.ensure_features(["312_10028_crop"])
    c.retrain()
    answer_all(c, Oracle(truth(), RADIUS, mode="literal"))
    c.retrain()
    path = c.save_model(tmp_path / "m.npz")
    assert path.exists() and path.with_suffix(".json").exists()
    list(c.predict(["061_10028_crop"]))

    d = LabellingController(EngineSettings(cache_dir=feature_cache))  # no particle size: taken from the model
    d.open(MICS)
    d.load_model(path)
    assert d.settings.radius_px == RADIUS
    list(d.predict(["061_10028_crop"]))
    a, b = c.picks["061_10028_crop"], d.picks["061_10028_crop"]
    assert np.array_equal(a.x, b.x) and np.allclose(a.score, b.score)
    # a loaded model proposes without labels
    d.ensure_features(["311_10028_crop"])
    info = d.retrain()
    assert not info.fitted and info.n_proposals == 10 and d.model is not None


def test_edit_labels_add_remove_move(feature_cache):
    c = controller(feature_cache)
    c.open(MICS)
    n = "061_10028_crop"
    assert c.add_label(n, 100, 120, 1) and c.add_label(n, 300, 40, 0)
    assert not c.add_label(n, 100, 120, 1)  # the same label twice is one label
    assert c.counts() == (1, 1)
    c.add_label(n, 300.5, 40.5, 1)  # relabel the same spot: the newest wins
    assert c.counts() == (2, 0)
    assert c.remove_label(n, 300.5, 40.5) == 1 and c.counts() == (1, 0)  # one spot, retracted
    # a points layer edited by the user: one moved, one added, one deleted
    c.add_label(n, 200, 200, 0)
    added, removed = c.sync_labels(n, np.array([110.0, 50.0]), np.array([120.0, 60.0]), np.array([1, 1]))
    assert (added, removed) == (2, 2)
    assert label_set(c.labels_on(n)) == {(n, 110.0, 120.0, 1), (n, 50.0, 60.0, 1)}
    assert c.sync_labels(n, np.array([110.0, 50.0]), np.array([120.0, 60.0]), np.array([1, 1])) == (0, 0)
    with pytest.raises(KeyError):
        c.add_label("nope", 1, 1, 1)
    assert c.nearest_label(n, 112, 118, 5).x == 110.0 and c.nearest_label(n, 0, 0, 5) is None


def test_label_store_remove_retracts_without_dropping_history(tmp_path):
    s = LabelStore(tmp_path / "labels.tsv")
    s.add([Label("m", 10, 10, 1), Label("m", 11, 10, 0), Label("m", 50, 50, 1), Label("k", 10, 10, 1)])
    assert s.remove("m", 10.5, 10) == 1  # (10,10)+ and (11,10)- are one spot: its newest label is retracted
    again = LabelStore(tmp_path / "labels.tsv")
    assert label_set(again.effective()) == {("m", 50.0, 50.0, 1), ("k", 10.0, 10.0, 1)}
    assert len(again.labels) == 5  # every label given is still in the file, plus the retraction
    assert s.remove("m", 0, 0) == 0
    s.add([Label("m", 10, 10, 1)])  # labelling the spot again brings it back
    assert ("m", 10.0, 10.0, 1) in label_set(LabelStore(tmp_path / "labels.tsv").effective())


def test_display_lowpass():
    rng = np.random.default_rng(0)
    img = rng.normal(size=(128, 128)).astype(np.float32)
    out = lowpass(img, 40.0, 8.0)
    assert out.shape == img.shape and out.std() < 0.5 * img.std()
    assert lowpass(img, 0.0, 8.0) is img and lowpass(img, 10.0, 8.0) is img  # off, or finer than Nyquist


def test_retrain_asks_the_default_audits_and_calibrates_its_picks_as_every_front_end(tmp_path, feature_cache):
    """The viewer's round fits through ``workflow.fit_calibrated`` as the jobs do: from 50 answers its
    batches hold audits of the training micrographs, the model carries a map refined on them, and the
    picks it shows are the calibrated ones ``predict`` (and so every export) gives."""
    from cryoal_ext.calibration import of
    from cryoal_ext.workflow import predict

    c = controller(feature_cache, batch=10)  # no session at first: the viewer keeps the audits it asked
    c.open(MICS)
    c.ensure_features(["311_10028_crop", "312_10028_crop"])
    oracle = Oracle(truth(), RADIUS, mode="careful")
    asked = 0
    for rnd in range(9):
        if rnd == 6:  # a session set halfway keeps the audits asked before it; its round files hold the rest
            c.set_session(tmp_path / "session")
            assert c.round == 6  # and the round numbers go on (the calibration's folds are rounds)
        info = c.retrain()
        kinds = [p.kind for p in c.proposals]
        assert kinds.count("audit") == (3 if info.n_labels >= 50 else 0)
        asked += kinds.count("audit")
        answer_all(c, oracle)
    cal = of(c.model)  # fitted before the last batch's audits were answered
    assert info.n_labels >= 80 and 5 <= cal.audits <= asked - 3 and cal.n == info.n_labels
    assert (cal.a, cal.b) != (1.0, 0.0) and len(c.asked_audits()) == asked
    assert info.note.startswith("3 of the 10 queries are the model's own picks") and "audited picks" in info.note
    name = "311_10028_crop"
    (_, shown), = predict([c.items[name]], c.model, RADIUS)
    assert np.allclose(np.sort(c.picks[name].score), np.sort(shown.score), atol=1e-5)
