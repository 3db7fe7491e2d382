"""Labels are sacred: the label store only ever holds answers a user gave, each once.

The cases of issue 12 (a review applied twice, a session folder missing a part, a stale lock),
then a property-style test: random sequences of rounds, reviews, re-runs, runs killed with
SIGKILL at random moments and reviews of older rounds, after each of which the label store must
equal exactly the answers the simulated user gave to proposals it was shown.
"""
from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryoal_ext.acquisition import Proposal
from cryoal_ext.cli import main
from cryoal_ext.files import read_coordinates
from cryoal_ext.review import Edited, diff_edits

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RADIUS = 28.0


@pytest.fixture(scope="module")
def mics(example_data):
    return sorted(str(p) for p in (example_data / "micrographs").glob("*.mrc"))


@pytest.fixture(scope="module")
def truth(example_data):
    t = pd.read_csv(example_data / "particles.txt", sep="\t")
    return {n: g[["x_coord", "y_coord"]].to_numpy(float) for n, g in t.groupby("image_name")}


def round_args(mics, session, cache, *extra):
    return ["round", *mics, "--session", str(session), "--radius-px", str(RADIUS), "--feature-model", "resnet16_u32",
            "--batch", "6", "--cache-dir", cache, "--device", "cpu", *extra]


def shown_queries(path: Path) -> list[Proposal]:
    t = read_coordinates(path)
    return [Proposal(str(r.image_name), float(r.x), float(r.y), 0.0, "") for r in t.itertuples()]


def user_review(queries: Path, truth, out: Path, rng: random.Random) -> list[tuple]:
    """A careful user: keeps the queries on a particle, deletes the rest, sometimes adds a missed one.

    Returns the answers as (micrograph, x, y, label), by the documented rules applied to what was shown.
    """
    shown = shown_queries(queries)
    rows, edited = [], {}
    for name in sorted({p.micrograph for p in shown}):
        xs, ys = [], []
        pts = truth.get(name, np.empty((0, 2)))
        for p in (q for q in shown if q.micrograph == name):
            if pts.size and np.min(np.hypot(pts[:, 0] - p.x, pts[:, 1] - p.y)) < RADIUS:
                xs.append(p.x)
                ys.append(p.y)
        if pts.size and rng.random() < 0.5:
            k = rng.randrange(len(pts))
            far = [np.hypot(q.x - pts[k, 0], q.y - pts[k, 1]) > RADIUS for q in shown]
            if all(far):
                xs.append(float(pts[k, 0]))
                ys.append(float(pts[k, 1]))
        edited[name] = Edited(np.array(xs), np.array(ys))
        rows += [(name, x, y) for x, y in zip(xs, ys)]
    out.write_text("image_name\tx_coord\ty_coord\n" + "".join(f"{n}\t{x:.1f}\t{y:.1f}\n" for n, x, y in rows))
    edited = {n: Edited(np.round(e.x, 1), np.round(e.y, 1)) for n, e in edited.items()}
    return [(l.micrograph, round(l.x, 1), round(l.y, 1), l.label) for l in diff_edits(shown, edited, RADIUS, 0)]


def store_rows(session: Path) -> list[tuple]:
    f = session / "labels.tsv"
    if not f.exists():
        return []
    t = pd.read_csv(f, sep="\t", dtype={"micrograph": str})
    return [(r.micrograph, round(r.x, 1), round(r.y, 1), int(r.label)) for r in t.itertuples()]


def assert_store_is(session: Path, given: list[tuple], tol: float = 0.2) -> None:
    """Every stored row is one answer given and every answer is stored once (coordinates to ``tol`` px:
    the queries file the user edits keeps 0.1 px, the label file 0.01 px)."""
    rows = store_rows(session)
    left = list(given)
    for m, x, y, lab in rows:
        hit = next((i for i, (m2, x2, y2, l2) in enumerate(left)
                    if m2 == m and l2 == lab and abs(x2 - x) <= tol and abs(y2 - y) <= tol), None)
        assert hit is not None, f"stored but never given (or stored twice): {(m, x, y, lab)}"
        left.pop(hit)
    assert not left, f"given but not stored: {left}"


def snapshot(session: Path) -> dict[str, bytes]:
    return {str(p.relative_to(session)): p.read_bytes() for p in sorted(session.rglob("*")) if p.is_file()
            and p.name != ".cryoal.lock"}


# --- the cases ---------------------------------------------------------------------------
def test_rerun_of_a_review_is_a_no_op(tmp_path, mics, truth, feature_cache, capsys):
    s = tmp_path / "K"
    assert main(round_args(mics, s, feature_cache)) == 0
    given = user_review(s / "round_000" / "queries.txt", truth, s / "round_000" / "queries_edited.txt",
                        random.Random(0))
    cmd = round_args(mics, s, feature_cache, "--reviewed", str(s / "round_000" / "queries_edited.txt"))
    assert main(cmd) == 0
    assert_store_is(s, given)
    before = snapshot(s)
    capsys.readouterr()
    assert main(cmd) == 0  # the same command again: nothing happens
    out = capsys.readouterr().out
    assert "already applied; nothing to do" in out and "round 2" not in out
    assert snapshot(s) == before
    # the same file copied elsewhere is recognised as an old review, not applied to round 1's queries
    copy = tmp_path / "copy.txt"
    shutil.copy(s / "round_000" / "queries_edited.txt", copy)
    rc = main(round_args(mics, s, feature_cache, "--reviewed", str(copy)))
    err = capsys.readouterr().err
    assert rc == 1 and "is, pick for pick, the answer already applied to the proposals of round 0" in err
    assert snapshot(s) == before
    # a different answer to round 0's proposals is refused
    edited = (s / "round_000" / "queries_edited.txt").read_text() + f"{Path(mics[1]).stem}\t300.0\t300.0\n"
    (s / "round_000" / "queries_edited.txt").write_text(edited)
    before = snapshot(s)
    assert main(cmd) == 1
    assert "already answered" in capsys.readouterr().err
    assert snapshot(s) == before


def test_positives_file_twice_counts_once(tmp_path, mics, truth, feature_cache):
    s = tmp_path / "K"
    name = Path(mics[1]).stem
    picks = tmp_path / "mine.txt"
    picks.write_text(f"image_name\tx_coord\ty_coord\n{name}\t100\t100\n{name}\t200\t210\n")
    assert main(round_args(mics, s, feature_cache, "--positives", str(picks))) == 0
    assert main(round_args(mics, s, feature_cache, "--positives", str(picks))) == 0
    assert_store_is(s, [(name, 100.0, 100.0, 1), (name, 200.0, 210.0, 1)])


@pytest.mark.parametrize("part", ["session.json", "labels.tsv", "proposals"])
def test_a_session_missing_a_part_is_refused_with_a_way_out(tmp_path, mics, truth, feature_cache, capsys, part):
    s = tmp_path / "K"
    assert main(round_args(mics, s, feature_cache)) == 0
    user_review(s / "round_000" / "queries.txt", truth, s / "round_000" / "edited.txt", random.Random(1))
    assert main(round_args(mics, s, feature_cache, "--reviewed", str(s / "round_000" / "edited.txt"))) == 0
    target = s / part
    if part == "proposals":  # the state says round 2, the folder has round 1's proposals: make it older instead
        state = (s / "session.json").read_text()
        (s / "session.json").write_text(state.replace('"round": 2', '"round": 0', 1))
    elif target.is_dir():
        shutil.rmtree(target)
    else:
        target.unlink()
    before = snapshot(s)
    capsys.readouterr()
    assert main(round_args(mics, s, feature_cache)) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err and str(s) in err
    assert {"session.json": "session.json is missing", "labels.tsv": "labels.tsv is missing",
            "proposals": "session.json is at round 0, but proposals/ holds round 1"}[part] in err
    assert snapshot(s) == before  # nothing overwritten
    if part != "labels.tsv":  # the way out: rebuild the state, then go on without re-applying anything
        assert ("--repair" in err)
        assert main(["session", str(s), "--repair"]) == 0
        rows = store_rows(s)
        assert main(round_args(mics, s, feature_cache, "--reviewed", str(s / "round_000" / "edited.txt"))) in (0, 1)
        assert store_rows(s) == rows


def test_corrupt_files_are_named(tmp_path, mics, feature_cache, capsys):
    s = tmp_path / "K"
    assert main(round_args(mics, s, feature_cache)) == 0
    (s / "session.json").write_text("{not json")
    assert main(round_args(mics, s, feature_cache)) == 1
    assert f"{s / 'session.json'}: cannot read the session state" in capsys.readouterr().err
    s2 = tmp_path / "L"
    s2.mkdir()
    (s2 / "labels.tsv").write_text("micrograph\tx\ty\tlabel\nm\t1\t2\tyes\n")
    assert main(round_args(mics, s2, feature_cache)) == 1
    err = capsys.readouterr().err
    assert f"{s2 / 'labels.tsv'}, line 2: column 'label' is 'yes', not a number" in err


def test_failed_first_round_leaves_no_folder(tmp_path, mics, feature_cache):
    s = tmp_path / "new_session"
    assert main(round_args(mics, s, feature_cache, "--reviewed", str(tmp_path / "none.txt"))) == 1
    assert not s.exists()


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_get_the_mode_of_a_plain_write(tmp_path, mics, feature_cache, umask):
    old = os.umask(umask)
    try:
        s = tmp_path / "K"
        assert main(round_args(mics, s, feature_cache)) == 0
        plain = tmp_path / "plain"
        plain.write_text("x")
        want = plain.stat().st_mode & 0o777
        assert want == 0o666 & ~umask
        files = [p for p in s.rglob("*") if p.is_file()]
        assert len(files) >= 6  # labels/model/json/proposals/queries/picks
        assert {str(p.relative_to(s)): oct(p.stat().st_mode & 0o777) for p in files} == \
            {str(p.relative_to(s)): oct(want) for p in files}
    finally:
        os.umask(old)


def test_lock_of_a_killed_process_is_no_obstacle(tmp_path):
    from cryoal_ext.atomic import LockedError, folder_lock

    code = ("import sys, time; from cryoal_ext.atomic import folder_lock\n"
            "with folder_lock(sys.argv[1]):\n    print('locked', flush=True); time.sleep(60)\n")
    p = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    with pytest.raises(LockedError, match=str(p.pid)):
        with folder_lock(tmp_path):
            pass
    p.send_signal(signal.SIGKILL)
    p.wait()
    with folder_lock(tmp_path):  # at once: the kernel released the lock with the process
        pass


# --- the property: random sequences of the user's and the machine's doings ------------------------
def _same_answer_given(a: tuple, given: list[tuple], same_spot_px: float = 2.0) -> bool:
    """The store's documented rule: the same answer again at a spot already labelled so is not appended."""
    return any(g[0] == a[0] and g[3] == a[3] and np.hypot(g[1] - a[1], g[2] - a[2]) <= same_spot_px for g in given)


def _run_killed(cmd: list[str], after_s: float) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.Popen([sys.executable, "-m", "cryoal_ext.cli", *cmd], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        p.wait(timeout=after_s)
    except subprocess.TimeoutExpired:
        p.send_signal(signal.SIGKILL)
        p.wait()


@pytest.mark.slow
@pytest.mark.parametrize("seq", range(int(os.environ.get("CRYOAL_PROPERTY_SEQUENCES", "3"))))
def test_label_store_holds_only_answers_given_each_once(tmp_path, mics, truth, feature_cache, seq):
    rng = random.Random(1000 + seq)
    s = tmp_path / "K"
    given: list[tuple] = []
    reviewed: dict[int, Path] = {}  # round -> the file the user wrote for it
    assert main(round_args(mics, s, feature_cache)) == 0
    last_cmd = None
    for step in range(7):
        state = json.loads((s / "session.json").read_text())
        latest = state["round"] - 1
        action = rng.choice(["review", "review", "review_killed", "rerun", "plain", "old"])
        if action in ("review", "review_killed") and latest not in reviewed:
            inside = rng.random() < 0.6
            f = (s / f"round_{latest:03d}" / "edited.txt") if inside else (tmp_path / f"edit_{latest}.txt")
            answers = user_review(s / f"round_{latest:03d}" / "queries.txt", truth, f, rng)
            cmd = round_args(mics, s, feature_cache, "--reviewed", str(f))
            if action == "review_killed":
                _run_killed(cmd, rng.uniform(0.5, 12.0))
            rc = main(cmd)  # (again, after a kill)
            assert rc == 0
            given += [a for a in answers if not _same_answer_given(a, given)]
            reviewed[latest] = f
            last_cmd = cmd
        elif action == "rerun" and last_cmd is not None:
            main(last_cmd)
        elif action == "old" and reviewed:
            r = rng.choice(sorted(reviewed))
            main(round_args(mics, s, feature_cache, "--reviewed", str(reviewed[r])))
        else:
            if rng.random() < 0.5:
                _run_killed(round_args(mics, s, feature_cache), rng.uniform(0.5, 8.0))
            assert main(round_args(mics, s, feature_cache)) == 0
            last_cmd = round_args(mics, s, feature_cache)
        assert_store_is(s, given)
    assert len(given) > 0


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_writer_gives_the_mode_of_a_plain_write(tmp_path, example_data, umask):
    """Plain round, prediction (txt/STAR), feature cache, RELION job (STAR, PDF, PNG, npz, json) and cryoSPARC
    (.cs, PNG): every file we write gets 0666 & ~umask, as open(..., 'w') would give it."""
    from cryoal_ext.cryosparc.data import exposures_from_files, save_dataset

    from conftest import relion_project_of

    mrcs = sorted((example_data / "micrographs").glob("*.mrc"))[:2]
    cache = tmp_path / "cache"
    want = oct(0o666 & ~umask)
    old = os.umask(umask)
    try:
        s = tmp_path / "session"
        common = ["--feature-model", "resnet16_u32", "--cache-dir", str(cache), "--device", "cpu"]
        assert main(["round", *map(str, mrcs), "--session", str(s), "--radius-px", "28", "--batch", "4",
                     "--train-micrographs", "1", *common]) == 0
        assert main(["predict", *map(str, mrcs), "--model", str(s / "model.npz"), "--radius-px", "28",
                     "--out-dir", str(tmp_path / "picks"), "--cache-dir", str(cache), "--device", "cpu"]) == 0
        proj, star = relion_project_of(example_data / "micrographs", tmp_path / "relion")
        job = "External/job005/"
        (proj / job).mkdir(parents=True)
        env = dict(os.environ, CRYOAL_CACHE=str(cache), OMP_NUM_THREADS="1")
        script = Path(__file__).resolve().parents[1] / "relion_scripts" / "cryoal_relion.py"
        res = subprocess.run([sys.executable, str(script), "--o", job, "--in_mics", str(star.relative_to(proj)),
                              "--radius_px", "28", "--batch", "4", "--train_micrographs", "1", "--feature_model",
                              "resnet16_u32", "--overlays", "1", "--pipeline_control", job],
                             cwd=proj, env=env, capture_output=True, text=True, timeout=600)
        assert (proj / job / "RELION_JOB_EXIT_SUCCESS").exists(), res.stdout + res.stderr
        cs = save_dataset(tmp_path / "cs" / "exposures.cs", exposures_from_files(mrcs, tmp_path / "cs"))
        assert main(["cryosparc", "--exposures", str(cs), "--project-dir", str(tmp_path / "cs"), "--session",
                     str(tmp_path / "cs_session"), "--radius-px", "28", "--batch", "4", "--cache-dir", str(cache),
                     "--out", str(tmp_path / "cs" / "queries.cs")]) == 0
    finally:
        os.umask(old)
    ours = [p for p in tmp_path.rglob("*") if p.is_file() and not p.is_symlink() and p.suffix != ".mrc"
            and p.name not in (".cryoal.lock",)]
    kinds = {p.suffix for p in ours}
    assert {".tsv", ".json", ".npz", ".npy", ".txt", ".star", ".png", ".pdf", ".cs"} <= kinds, kinds
    assert {str(p.relative_to(tmp_path)): oct(p.stat().st_mode & 0o777) for p in ours} == \
        {str(p.relative_to(tmp_path)): want for p in ours}
