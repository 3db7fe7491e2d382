"""End to end, offline: exposures.cs -> round 0 queries.cs -> edited as in Manual Picker -> round 1 -> picks.cs.

Runs the real engine (Topaz features on CPU) on the bundled EMPIAR-10028 crops through the
``cryoal cryosparc`` command, and checks that the picks' fractional coordinates land on the
expert-picked particles.
"""
from __future__ import annotations

import json
import os
import sys

import numpy as np
import pytest
from scipy.spatial import cKDTree

pytest.importorskip("cryosparc.dataset")
pytest.importorskip("topaz")
from cryosparc.dataset import Dataset  # noqa: E402

from cryoal_ext.cryosparc import data as csd  # noqa: E402
from cryoal_ext.cli import main as cli  # noqa: E402
from cryoal_ext.coords import from_fraction  # noqa: E402
from cryoal_ext.metrics import evaluate  # noqa: E402
from cryoal_ext.session import Session  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))  # the shared fixtures, under any pytest import mode
from test_cryosparc_data import EXAMPLE, make_project, truth  # noqa: E402

RADIUS = 28.0


@pytest.fixture(autouse=True)
def one_torch_thread(single_torch_thread):
    """Every test here on one torch thread (conftest's ``single_torch_thread``)."""


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> str:
    return os.environ.get("CRYOAL_TEST_CACHE") or str(tmp_path_factory.mktemp("features"))


def to_pixels(dset, specs):
    """Particle rows -> {name: (x, y, score)} through location/micrograph_uid and the row's own shape."""
    by_uid = {s.extra["uid"]: s for s in specs}
    out = {}
    mic = np.asarray(dset["location/micrograph_uid"])
    for u in np.unique(mic):
        sel = mic == u
        shape = tuple(int(v) for v in dset["location/micrograph_shape"][sel][0])
        x, y = from_fraction(dset["location/center_x_frac"][sel], dset["location/center_y_frac"][sel], shape)
        out[by_uid[int(u)].name] = (x, y, np.asarray(dset["pick_stats/ncc_score"][sel], float))
    return out


def review_like_manual_picker(queries, specs, tr, add_per_mic: int = 8):
    """A careful user: deletes queries that are not particles, keeps the rest (same rows, same uids),
    and clicks a few missed particles on every micrograph shown (new rows, new uids)."""
    q = to_pixels(queries, specs)
    mic = np.asarray(queries["location/micrograph_uid"])
    keep = np.zeros(len(queries), bool)
    by_uid = {s.extra["uid"]: s for s in specs}
    added = {}
    for u in np.unique(mic):
        name = by_uid[int(u)].name
        tx, ty = tr[name]
        tree = cKDTree(np.c_[tx, ty])
        idx = np.flatnonzero(mic == u)
        x, y, _ = q[name]
        d, _ = tree.query(np.c_[x, y])
        keep[idx] = d <= RADIUS
        kx, ky = x[d <= RADIUS], y[d <= RADIUS]
        free = [(a, b) for a, b in zip(tx, ty) if kx.size == 0 or np.min(np.hypot(kx - a, ky - b)) > RADIUS]
        added[name] = free[:add_per_mic]
    kept = queries.mask(keep)
    rows = [csd.PickRows(next(s for s in specs if s.name == n), np.array([p[0] for p in pts]),
                         np.array([p[1] for p in pts]), np.zeros(len(pts))) for n, pts in added.items() if pts]
    new = csd.picks_to_dataset(rows, RADIUS)
    new["pick_stats/ncc_score"] = 0
    return Dataset.append(kept, new), int(keep.sum()), int((~keep).sum()), sum(len(v) for v in added.values())


def run(args: list[str]) -> None:
    assert cli(["cryosparc", *args]) == 0


def test_offline_rounds_end_to_end(tmp_path, cache_dir, capsys):
    proj, exposures = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    specs = csd.exposures_to_specs(csd.load_dataset(exposures), proj)
    tr = truth(EXAMPLE)
    sess = tmp_path / "session"
    common = ["--exposures", str(exposures), "--project-dir", str(proj), "--session", str(sess),
              "--radius-px", str(RADIUS), "--cache-dir", cache_dir, "--threads", "1", "--batch", "12"]

    # round 0: queries from the pretrained score
    run(common + ["--out", str(tmp_path / "queries_0.cs"), "--picks", str(tmp_path / "picks_0.cs")])
    q0 = csd.load_dataset(tmp_path / "queries_0.cs")
    assert len(q0) == 12
    assert set(q0.fields()) >= {f[0] for f in csd.particle_fields()}
    assert np.all((q0["pick_stats/ncc_score"] >= 0) & (q0["pick_stats/ncc_score"] <= 1))
    assert (sess / "cryosparc" / "round_000" / "score_histogram.png").exists()

    # the user reviews them in Manual Picker
    edited, kept, deleted, added = review_like_manual_picker(q0, specs, tr)
    csd.save_dataset(tmp_path / "queries_0_edited.cs", edited)
    assert deleted > 0 and added > 0

    # round 1: the review becomes labels, new queries come out
    run(common + ["--reviewed", str(tmp_path / "queries_0_edited.cs"), "--out", str(tmp_path / "queries_1.cs")])
    labels = Session(sess).labels
    pos, neg = labels.counts()
    assert (pos, neg) == (kept + added, deleted)
    state = json.loads((sess / "session.json").read_text())
    assert state["round"] == 2 and state["history"][-1]["inputs"][str(tmp_path / "queries_0_edited.cs")]["uids_shared"] == kept
    q1 = csd.load_dataset(tmp_path / "queries_1.cs")
    # new queries avoid the spots already labelled
    lab = np.array([[l.x, l.y] for l in labels.effective()])
    for name, (x, y, _) in to_pixels(q1, specs).items():
        mine = np.array([[l.x, l.y] for l in labels.effective() if l.micrograph == name])
        if mine.size:
            assert np.min(cKDTree(mine).query(np.c_[x, y])[0]) > 0.2 * RADIUS
    assert lab.shape[0] == pos + neg

    # final: pick every exposure with the model fitted on all labels
    run(common + ["--predict", "--out", str(tmp_path / "picks.cs")])
    picks = csd.load_dataset(tmp_path / "picks.cs")
    assert np.all(np.isin(picks["location/micrograph_uid"], [s.extra["uid"] for s in specs]))
    np.testing.assert_array_equal(picks["pick_stats/ncc_score"], picks["pick_stats/power"])
    assert np.allclose(picks["location/min_dist_A"], RADIUS * 5.36, rtol=1e-3)
    pred = to_pixels(picks, specs)
    assert set(pred) == set(tr)
    ev = evaluate(pred, tr, RADIUS)
    last = json.loads((sess / "session.json").read_text())["history"][-1]
    thr = last["suggested_threshold"]
    # the particles expected: the sum of the (calibrated) probabilities over every pick written
    assert last["expected_particles"]["expected"] == pytest.approx(float(np.sum(picks["pick_stats/ncc_score"])), abs=0.2)
    at = ev.counts_at(thr)
    out = capsys.readouterr().out
    with capsys.disabled():
        print(f"\ncryoSPARC offline e2e: {len(picks)} picks, AP {ev.ap:.3f}, recall {ev.recall:.3f} (all picks "
              f">= 0.01), at suggested threshold {thr:.3f}: recall {at['recall']:.3f} precision "
              f"{at['precision']:.3f}; labels {pos}+/{neg}-")
    assert ev.recall >= 0.9
    assert at["recall"] >= 0.7 and at["precision"] >= 0.6
    assert ev.ap >= 0.6
    assert "queries ->" in out and "picks ->" in out


def test_session_guards(tmp_path, cache_dir):
    proj, exposures = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    sess = tmp_path / "s"
    common = ["--exposures", str(exposures), "--project-dir", str(proj), "--session", str(sess),
              "--radius-px", str(RADIUS), "--cache-dir", cache_dir, "--threads", "1", "--no-plots",
              "--train-micrographs", "1", "--batch", "4"]
    run(common + ["--out", str(tmp_path / "q.cs")])
    # the flip cannot change within a session: stored labels would no longer match the fractions
    assert cli(["cryosparc", *common, "--flip-y", "--out", str(tmp_path / "q2.cs")]) == 1
    # offline mode writes files; a wrong project dir names the missing file
    assert cli(["cryosparc", *common[:2], "--project-dir", str(tmp_path), *common[4:], "--out", str(tmp_path / "x.cs")]) == 1
    assert not (tmp_path / "x.cs").exists()
    assert json.loads((sess / "session.json").read_text())["round"] == 1
