"""The External job inside REAL RELION 4.0.2 and 5.0.1 (the kits in ../shared/relion), as a user runs it.

For each kit: a project made by RELION's GUI (``relion --do_projdir`` under a private Xvfb),
micrographs imported by ``relion.import``, our External job added and run by ``relion_pipeliner``
(running it again is RELION's Continue!), the picker's edits written by RELION's own STAR writer,
the final run, and RELION's Extract on autopick.star and on candidates.star at the suggested
threshold.  A second test continues the session in a new External job.  Skipped, with the reason,
when a kit, one of its runtime libraries or Xvfb is missing.

The opt-in ``test_picker_gui`` (CRYOAL_RELION_GUI_TEST=1) drives relion_manualpick itself with
xdotool, as the Display button starts it; it depends on window timing, so it is not run in CI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import starfile

sys.path.insert(0, os.path.dirname(__file__))  # the helpers, under any pytest import mode
import relion_kit as K  # noqa: E402

from cryoal_ext.features import DEFAULT_FEATURE_MODEL  # noqa: E402

# CI: two EMPIAR-10028 micrographs as 512² crops, one-view features.  CRYOAL_RELION_FULL_DATA=1: all
# four full 1024² micrographs of ../shared/data/empiar10028 with the default feature model.
FULL = bool(os.environ.get("CRYOAL_RELION_FULL_DATA"))
MICROGRAPHS = ["061_10028", "062_10028", "311_10028", "312_10028"] if FULL else ["061_10028", "311_10028"]
SIZE = 1024 if FULL else 512
PIXEL = 5.36
DIAMETER = 300.0  # Angstrom: radius 28 px
RADIUS = DIAMETER / (2 * PIXEL)
PARAMS = {"diameter": DIAMETER, "feature_model": DEFAULT_FEATURE_MODEL if FULL else "resnet16_u32",
          "train_micrographs": 2, "batch": 10 if FULL else 8, "predict": "false"}
ROUND0_LIMIT_S = 1800 if FULL else 600  # how long the pipeliner sleeps while the open GUI is watched


def external_options(in_mics: str, in_coords: str | None = None, **params) -> dict:
    """The External job's fields as RELION's job.star names them (fn_exe, in_mic, paramN_label/value)."""
    opts = {"fn_exe": str(K.SCRIPT), "in_mic": in_mics, "nr_threads": 1}
    if in_coords:
        opts["in_coords"] = in_coords
    for i, (label, value) in enumerate({**PARAMS, **params}.items(), start=1):
        opts[f"param{i}_label"], opts[f"param{i}_value"] = label, value
    return opts


PREDICT_PARAM = f"param{list(PARAMS).index('predict') + 1}_value"


@pytest.fixture(scope="module")
def xvfb():
    if shutil.which("Xvfb") is None:
        pytest.skip("Xvfb not found (apt-get install xvfb): RELION's GUI needs a display to make a project")
    server = K.Xvfb()
    yield server.display
    server.close()


@pytest.fixture(scope="module", params=[4, 5], ids=["relion4", "relion5"])
def project(request, xvfb, tmp_path_factory, feature_cache):
    """A RELION project with two micrographs imported by relion.import (the kit's relion_import)."""
    major = request.param
    why = K.missing(major)
    if why:
        pytest.skip(why)
    t0 = time.perf_counter()
    p = K.RelionProject(tmp_path_factory.mktemp(f"relion{major}_project"), major, xvfb, feature_cache)
    p.make()
    data = os.environ.get("CRYOAL_TEST_DATA")
    full = (Path(data) if data else K.REPO.parent / "shared" / "data") / "empiar10028" / "micrographs"
    if FULL and not full.is_dir():
        pytest.skip(f"CRYOAL_RELION_FULL_DATA needs the shared data: {full} not found")
    K.write_micrographs(p.root / "Micrographs", full if full.is_dir() else None, MICROGRAPHS, SIZE, PIXEL)
    imp = p.add_job("relion.import", {"fn_in_raw": "Micrographs/*.mrc", "is_multiframe": "No", "angpix": PIXEL,
                                      "kV": 300, "Cs": 2.7, "Q0": 0.1})
    assert p.run_job(imp) == "Succeeded", p.text(imp, "run.err")
    p.mics = imp + "micrographs.star"
    assert (p.root / p.mics).read_text().lstrip().startswith(f"# version {K.VERSION_TAG[major]}")
    p.t0 = t0
    yield p
    print(f"\nRELION {major}: project {p.root}, {time.perf_counter() - t0:.1f} s in all")
    for line in p.log:
        print("   ", line)


def ran(p: K.RelionProject, job: str) -> list[str]:
    """The last command RELION ran for ``job``, as it recorded it in the job's note.txt."""
    lines = [line for line in p.text(job, "note.txt").splitlines() if line.startswith(str(K.SCRIPT))]
    assert lines, f"no command in {job}note.txt"
    return lines[-1].split()


def check_our_nodes(p: K.RelionProject, job: str, files: set[str]) -> None:
    """Exactly ``files`` are our nodes, with this version's type labels, and RELION touched them in .Nodes/."""
    want = {job + f: (K.LOGFILE_LABEL if f.endswith(".pdf") else K.COORDS_LABEL[p.major]) for f in files}
    got = {n: label for n, label in p.nodes().items() if n.startswith(job)}
    assert got == want, f"nodes of {job}: {got}"
    for name, label in want.items():
        assert p.node_file(name, label).exists(), f"{p.node_file(name, label)} not made by RELION"


def edit_queries(p: K.RelionProject, queries_star: str, which: list[int] | None = None, seed: int = 0):
    """The user's review in RELION's picker: per micrograph, delete one proposal, add a pick, CTRL+1 and a red pick."""
    files = p.coordinate_list(queries_star)
    edits = []
    for i, (mic, f) in enumerate(sorted(files.items())):
        if which is None or i in which:
            edits.append(K.picker_edit(p, mic, f, size=SIZE, radius=RADIUS, seed=seed + 10 * i))
    return files, edits


def expected_labels(edits) -> list:
    return [lab for e in edits for lab in e.expected(Path(e.micrograph).stem)]


def particles_by_mic(path: Path) -> dict[str, np.ndarray]:
    t = starfile.read(path, always_dict=True)["particles"]
    return {str(m): np.sort(np.round(g[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), 3), axis=0)
            for m, g in t.groupby("rlnMicrographName")}


def picks_by_mic(p: K.RelionProject, coord_list: str, threshold: float | None = None) -> dict[str, np.ndarray]:
    out = {}
    for mic, f in p.coordinate_list(coord_list).items():
        df = K.read_table(f)
        if threshold is not None:
            df = df[df["rlnAutopickFigureOfMerit"].astype(float) > np.float32(threshold)]
        if len(df):
            out[mic] = np.sort(np.round(df[["rlnCoordinateX", "rlnCoordinateY"]].to_numpy(float), 3), axis=0)
    return out


def assert_same_coordinates(extracted: dict, ours: dict) -> None:
    assert set(extracted) == set(ours)
    for mic in ours:
        assert extracted[mic].shape == ours[mic].shape, mic
        np.testing.assert_allclose(extracted[mic], ours[mic], atol=1e-3, err_msg=mic)


def extract(p: K.RelionProject, coords: str, threshold: str | None = None) -> str:
    opts = {"star_mics": p.mics, "coords_suffix": coords, "extract_size": 64, "do_float16": "No"}
    if threshold is not None:
        opts.update({"do_fom_threshold": "Yes", "minimum_pick_fom": threshold})
    job = p.add_job("relion.extract", opts)
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    return job


def run_round0_with_gui_open(p: K.RelionProject, job: str) -> float:
    """Round 0 started by the pipeliner, with RELION's GUI open on the project.

    The pipeliner checks for the job's end only after ROUND0_LIMIT_S here, so if the pipeline says
    Succeeded before that, the open GUI did it: its timer looks for finished jobs only while
    .pipeline_has_changed exists, which our job creates after its exit marker.  Returns the
    seconds from the exit marker to the GUI's update.
    """
    pipeliner = p.start_job(job, sec_wait=ROUND0_LIMIT_S)
    gui = None
    try:
        deadline = time.time() + 60
        while p.status(job) != "Running" and time.time() < deadline:
            time.sleep(0.2)
        assert p.status(job) == "Running"
        gui = subprocess.Popen(["relion", "--refresh", "1", "--idle", "900"], cwd=p.root, env=p.env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        marker = p.root / job / "RELION_JOB_EXIT_SUCCESS"
        deadline = time.time() + ROUND0_LIMIT_S - 60
        while not marker.exists() and time.time() < deadline and pipeliner.poll() is None:
            if (p.root / job / "RELION_JOB_EXIT_FAILURE").exists():
                raise AssertionError(p.text(job, "run.err"))
            time.sleep(0.2)
        assert marker.exists(), p.text(job, "run.err")
        t_marker = time.time()
        while p.status(job) != "Succeeded" and time.time() < t_marker + 30:
            time.sleep(0.2)
        assert p.status(job) == "Succeeded", "the open GUI did not notice the finished job"
        assert pipeliner.poll() is None  # still asleep: it was the GUI that noticed
        noticed = time.time() - t_marker
    finally:
        if gui is not None:
            K.stop(gui)
        K.stop(pipeliner)  # asleep between checks, outside the pipeline lock
    assert not (p.root / ".relion_lock").exists(), "a RELION program left its pipeline lock behind"
    return noticed


# --- the round trip ----------------------------------------------------------------------------
def test_round_trip(project):
    p = project
    t0 = time.perf_counter()
    job = p.add_job("relion.external", external_options(p.mics))

    # round 0 -------------------------------------------------------------------------------------
    gui_s = run_round0_with_gui_open(p, job)
    check_our_nodes(p, job, {"queries.star", "autopick.star", "logfile.pdf"})
    assert "model.npz" not in " ".join(p.nodes())  # no node: Display would run relion_display on it
    out = p.text(job, "run.out")
    assert f"RELION {p.major} conventions" in out
    # the command RELION ran (note.txt): inputs, then --<label> <value> per parameter, --j, and
    # --pipeline_control because the executable's path contains "relion_"
    params = " ".join(f"--{k} {v}" for k, v in PARAMS.items())
    assert ran(p, job) == f"{K.SCRIPT} --o {job} --in_mics {p.mics} {params} --j 1 --pipeline_control {job}".split()
    queries = p.coordinate_list(job + "queries.star")
    assert len(queries) == 2 and set(queries) <= {f"Micrographs/{m}.mrc" for m in MICROGRAPHS}
    for f in queries.values():
        assert f.parent == p.root / job / "Micrographs" and f.read_text().lstrip().startswith(
            f"# version {K.VERSION_TAG[p.major]}")

    # review in the picker's format, then Continue! ------------------------------------------------
    _, edits = edit_queries(p, job + "queries.star")
    assert sum(len(e.deleted) for e in edits) >= 1
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    problem = K.same_labels(K.labels_of(p.root / job), expected_labels(edits))
    assert problem is None, problem
    assert "review: 2 micrograph(s) edited" in p.text(job, "run.out")
    check_our_nodes(p, job, {"queries.star", "autopick.star", "logfile.pdf"})

    # the final round: predict true, as changed in the job's fields before Continue! -------------
    p.edit_job(job, PREDICT_PARAM, "true")
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    assert "--predict Yes" in " ".join(ran(p, job))  # the pipeliner's --editJob turns "true" into "Yes"
    check_our_nodes(p, job, {"queries.star", "autopick.star", "candidates.star", "logfile.pdf"})
    thr = json.loads(p.text(job, "threshold.json"))
    text = thr["suggested_threshold_text"]
    assert f"suggested FOM threshold for Extract: {text} " in p.text(job, "run.out")
    assert float(text) == thr["suggested_threshold"] == thr["threshold_used"]
    ours = picks_by_mic(p, job + "autopick.star")
    n_picks = sum(len(v) for v in ours.values())
    assert n_picks > 10

    # RELION's Extract on autopick.star, and on candidates.star with the suggested threshold ------
    ex1 = extract(p, job + "autopick.star")
    got1 = particles_by_mic(p.root / ex1 / "particles.star")
    assert sum(len(v) for v in got1.values()) == n_picks
    assert_same_coordinates(got1, ours)
    ex2 = extract(p, job + "candidates.star", text)
    got2 = particles_by_mic(p.root / ex2 / "particles.star")
    assert sum(len(v) for v in got2.values()) == n_picks, \
        f"Extract with Minimum autopick FOM {text} kept {sum(len(v) for v in got2.values())} of {n_picks}"
    assert_same_coordinates(got2, ours)
    n_cand = sum(len(K.read_table(f)) for f in p.coordinate_list(job + "candidates.star").values())
    print(f"\nRELION {p.major}: round trip {time.perf_counter() - t0:.1f} s; GUI noticed the end after "
          f"{gui_s:.1f} s; autopick.star {n_picks} picks, candidates.star {n_cand}; Extract wrote "
          f"{sum(len(v) for v in got1.values())} particles from autopick.star and "
          f"{sum(len(v) for v in got2.values())} from candidates.star at {text}")


def test_continued_session(project):
    """A NEW External job whose Input coordinates is an earlier job's queries.star continues that
    session: after each run the labels are exactly the edits made, nothing from unopened files."""
    p = project
    t0 = time.perf_counter()
    first = p.add_job("relion.external", external_options(p.mics))
    assert p.run_job(first) == "Succeeded", p.text(first, "run.err")
    base = K.labels_of(p.root / first)
    # the user opens ONE of the earlier job's two queries files
    files, edits1 = edit_queries(p, first + "queries.star", which=[0], seed=100)
    assert len(files) == 2 and len(edits1) == 1
    job = p.add_job("relion.external", external_options(p.mics, in_coords=first + "queries.star"))
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    assert ran(p, job)[:7] == [str(K.SCRIPT), "--o", job, "--in_mics", p.mics, "--in_coords", first + "queries.star"]
    assert f"continuing the session of {first.rstrip('/')}" in p.text(job, "run.out")
    problem = K.same_labels(K.labels_of(p.root / job), base + expected_labels(edits1))
    assert problem is None, f"first run: {problem}"
    # ... then the new job's own queries file of the SAME micrograph, and Continue!  The other
    # micrograph's files (the earlier job's and the new job's) stay unopened throughout.
    _, edits2 = edit_queries(p, job + "queries.star", which=[0], seed=200)
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    want = base + expected_labels(edits1) + expected_labels(edits2)
    got = K.labels_of(p.root / job)
    print(f"\nRELION {p.major}: continued session {time.perf_counter() - t0:.1f} s")
    problem = K.same_labels(got, want)
    assert problem is None, f"second run: {problem}"


def expert_picks(names: list[str]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The expert picks inside the micrographs as written (the crops' own, or the shared data's)."""
    import pandas as pd

    data = os.environ.get("CRYOAL_TEST_DATA")
    if FULL:
        f, suffix = (Path(data) if data else K.REPO.parent / "shared" / "data") / "empiar10028" / "particles.txt", ""
    else:
        f, suffix = K.REPO / "cryoal_ext" / "example_data" / "empiar10028_small" / "particles.txt", "_crop"
    t = pd.read_csv(f, sep=r"\s+", dtype={"image_name": str})
    out = {}
    for n in names:
        g = t[(t["image_name"] == n + suffix) & (t["x_coord"] < SIZE) & (t["y_coord"] < SIZE)]
        out[n] = (g["x_coord"].to_numpy(float), g["y_coord"].to_numpy(float))
    return out


def test_past_fifty_answers_audits_and_calibration(project):
    """Rounds of careful reviews (false queries deleted, true ones kept) past the 50 answers where the
    default's audits start, until the probabilities are calibrated on audited picks; then the final
    picks.  The audits reach the picker as ordinary queries, every review becomes labels exactly
    once, and the log says what the probabilities rest on."""
    from cryoal_ext.calibration import of
    from cryoal_ext.model import BLR
    from cryoal_ext.session import Session

    p = project
    t0 = time.perf_counter()
    job = p.add_job("relion.external", external_options(p.mics, batch=12))
    truth = expert_picks(MICROGRAPHS)
    want, cal, audits_seen = [], None, 0
    for rnd in range(12):
        assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
        problem = K.same_labels(K.labels_of(p.root / job), want)
        assert problem is None, f"round {rnd}: {problem}"
        session = Session(p.root / job)
        props = session.load_proposals(rnd)
        audits = [q for q in props if q.kind == "audit"]
        assert len(audits) == (3 if len(want) >= 50 else 0), f"round {rnd}: {len(want)} answers, {len(audits)} audits"
        audits_seen += len(audits)
        queries = p.coordinate_list(job + "queries.star")
        written = {Path(m).stem: K.read_table(f)[["rlnCoordinateX", "rlnCoordinateY"]].astype(float).to_numpy()
                   for m, f in queries.items()}
        for q in audits:  # asked in the picker, as any query (the STAR file holds 2 decimals)
            assert np.hypot(*(written[q.micrograph] - [q.x, q.y]).T).min() < 0.01, q
        cal = of(BLR.load(p.root / job / "model.npz"))
        if cal.audits >= 5:
            break
        want += expected_labels([K.truthful_edit(p, mic, f, truth[Path(mic).stem], RADIUS)
                                 for mic, f in sorted(queries.items())])
    assert cal.audits >= 5 and cal.n >= 60, f"never calibrated on audits: {cal}"
    out = p.text(job, "run.out")
    assert "are the model's own picks (audits)" in out
    assert f"probabilities calibrated on {cal.n} answers held out by rounds and {cal.audits} audited picks" in out

    p.edit_job(job, PREDICT_PARAM, "true")
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    assert K.same_labels(K.labels_of(p.root / job), want) is None  # the final run adds no label
    final = of(BLR.load(p.root / job / "model.npz"))  # the final refit is calibrated as the rounds' fits are
    assert final.n == len(want) and final.audits >= cal.audits and any(final.cov), final
    summary = json.loads(p.text(job, "threshold.json"))
    out = p.text(job, "run.out")
    said = out.rsplit("expected particles: ", 1)[1]
    assert "% range " in said.splitlines()[0], said.splitlines()[0]
    expected = float(said.split()[0])
    n_true = sum(v[0].size for v in truth.values())
    kept = sum(len(K.read_table(f)) for f in p.coordinate_list(job + "autopick.star").values())
    print(f"\nRELION {p.major}: {rnd + 1} rounds of careful review, {len(want)} answers "
          f"({sum(w[3] for w in want)} positive), {audits_seen} audits asked, calibration a={cal.a:.3f} "
          f"b={cal.b:.3f} on {cal.n} answers and {cal.audits} audits; final picks: {kept} at the suggested "
          f"threshold {summary['suggested_threshold']:.3f}, expected particles {said.split(' (the sum')[0]}, expert picks "
          f"{n_true}; {time.perf_counter() - t0:.1f} s")


# --- opt-in: the real picker, driven with mouse and keys -----------------------------------------
@pytest.mark.skipif(not os.environ.get("CRYOAL_RELION_GUI_TEST"), reason="set CRYOAL_RELION_GUI_TEST=1 (drives "
                    "relion_manualpick under Xvfb with xdotool; timing-sensitive, so not in CI)")
def test_picker_gui(project):
    import relion_gui as G

    if shutil.which("xdotool") is None:
        pytest.skip("xdotool not found (apt-get install xdotool)")
    p = project
    job = p.add_job("relion.external", external_options(p.mics))
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    result = G.review_in_picker(p, job, PIXEL, DIAMETER)
    print(f"\nRELION {p.major} picker: {result.report}")
    assert p.run_job(job) == "Succeeded", p.text(job, "run.err")
    problem = K.same_labels(K.labels_of(p.root / job), result.expected)
    print(f"labels after Continue!: {K.labels_of(p.root / job)}")
    assert problem is None, problem
