"""Our CCP-EM pipeliner job types, run by the real pipeliner (no mocks) on the bundled micrographs.

A project made with the pipeliner's API; round 0 of the active-learning job; its queries reviewed
through Doppio's own pick-editing job; the job continued (round 1) with the edited picks; the
predict job with the saved model; RELION's Extract (the pipeliner's relion.extract with the kit in
../shared/relion) on the picks.  Skipped when ccpem-pipeliner (the 'pipeliner' extra) is absent;
the Extract part also when the RELION kit or its libraries are.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("pipeliner.api.manage_project", reason="ccpem-pipeliner not installed (the 'pipeliner' extra)")

from pipeliner.api.manage_project import PipelinerProject  # noqa: E402
from pipeliner.job_factory import get_job_types, new_job_of_type  # noqa: E402
from pipeliner.project_graph import ProjectGraph  # noqa: E402
from pipeliner.starfile_handler import StarFile  # noqa: E402

from conftest import REPO_ROOT, relion_project_of  # noqa: E402
from cryoal_ext.files import write_star  # noqa: E402
from cryoal_ext.relion.coordinates import read_coordinate_list, read_mic_coordinates  # noqa: E402
from cryoal_ext.relion.star import read_star  # noqa: E402

AL = "cryoal.autopick.active_learning"
PREDICT = "cryoal.autopick.predict"
RADIUS_PX = 28.0  # the bundled crops: 300 A at 5.36 A/px

if not any(j.PROCESS_NAME == AL for j in get_job_types("cryoal")):
    pytest.skip("our job types are not registered: reinstall with pip install -e '.[pipeliner]'",
                allow_module_level=True)


def relion_kit() -> Path | None:
    """The RELION 5 kit's bin/ when its relion_preprocess runs here (libraries present), else None."""
    kit = Path(os.environ.get("CRYOAL_RELION_BIN", REPO_ROOT.parent / "shared" / "relion" / "relion5" / "bin"))
    exe = kit / "relion_preprocess"
    if not exe.exists():
        return None
    try:
        ok = subprocess.run([str(exe), "--version"], capture_output=True, timeout=60).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        ok = False
    return kit if ok else None


def output_types(job_dir: str) -> dict[str, str]:
    with ProjectGraph(read_only=True) as pipeline:
        proc = pipeline.find_process(job_dir)
        return {n.name: n.type for n in proc.output_nodes}


def input_names(job_dir: str) -> set[str]:
    with ProjectGraph(read_only=True) as pipeline:
        return {n.name for n in pipeline.find_process(job_dir).input_nodes}


def run(project: PipelinerProject, params: dict) -> str:
    job = project.run_job(params, run_in_foreground=True)
    status = project.wait_for_job_to_finish(job)
    assert status == "Succeeded", (Path(job.output_dir, "run.err").read_text())
    return job.output_dir


def coords_of(coordinate_list: str) -> dict[str, np.ndarray]:
    out = {}
    for mic, f in read_coordinate_list(coordinate_list).items():
        c = read_mic_coordinates(f)
        out[mic] = np.column_stack([c.x, c.y])
    return out


def by_type(rdos) -> dict[str, list]:
    out: dict[str, list] = {}
    for r in rdos:
        out.setdefault(r.dobj_type, []).append(r)
    return out


def test_listed_by_the_pipeliners_own_command(tmp_path):
    exe = Path(sys.executable).with_name("pipeliner")
    if not exe.exists():
        pytest.skip("the pipeliner command is not beside this python")
    out = subprocess.run([str(exe), "--available_jobs", "cryoal"], capture_output=True, text=True, cwd=tmp_path,
                         timeout=300).stdout
    assert AL in out and PREDICT in out
    assert "Unavailable" not in out


def test_options_become_the_relion_jobs_arguments():
    job = new_job_of_type(AL)
    job.output_dir = "AutoPick/job007/"
    job.joboptions["input_mics"].value = "CtfFind/job003/micrographs_ctf.star"
    job.joboptions["diameter"].value = "300"
    job.joboptions["device"].value = "cpu"
    (cmd,) = job.get_commands()
    args = [str(a) for a in cmd.cmd]
    assert args[:3] == ["python3", "-m", "cryoal_ext.relion"]
    pairs = dict(zip(args[3::2], args[4::2]))
    assert pairs["--o"] == "AutoPick/job007/" and pairs["--in_mics"] == "CtfFind/job003/micrographs_ctf.star"
    assert pairs["--diameter"] == "300" and pairs["--batch"] == "10" and pairs["--device"] == "cpu"
    assert pairs["--feature_model"] == "resnet16_u32+views8"
    assert "--predict" not in pairs and "--threshold" not in pairs and "--in_coords" not in pairs
    job.create_output_nodes()
    assert {os.path.basename(n.name) for n in job.output_nodes} == {"queries.star", "autopick.star", "logfile.pdf"}
    # a threshold makes the run final: picks for every micrograph, no queries
    job.joboptions["threshold"].value = "0.4"
    job.output_nodes = []
    job.create_output_nodes()
    assert {os.path.basename(n.name) for n in job.output_nodes} == {"autopick.star", "candidates.star",
                                                                     "model.npz", "logfile.pdf"}
    assert "0.4" in [str(a) for a in job.get_commands()[0].cmd]
    # bad values are refused by the pipeliner's own validation, naming the option
    job.joboptions["threshold"].value = "1.5"
    errors = [str(e) for e in job.validate_joboptions() if e.type == "error"]
    assert errors and any("threshold" in e.lower() for e in errors)


@pytest.mark.slow
def test_rounds_review_predict_extract(tmp_path, monkeypatch, example_data, feature_cache):
    _, star = relion_project_of(example_data / "micrographs", tmp_path)
    tables = read_star(star)  # Extract also needs the optics group's voltage and Cs
    tables["optics"] = tables["optics"].assign(rlnVoltage=300.0, rlnSphericalAberration=2.7, rlnAmplitudeContrast=0.1)
    write_star(star, tables, version=50001)
    monkeypatch.chdir(tmp_path)
    mics = "CtfFind/job003/micrographs_ctf.star"
    project = PipelinerProject(make_new_project=True)
    common = {"diameter": 300, "batch": 4, "feature_model": "resnet16_u32", "device": "cpu", "nr_threads": 2,
              "cache_dir": feature_cache, "overlays": 2}

    # round 0: queries to review, picks on the two labelled micrographs
    picker = run(project, {"_rlnJobTypeLabel": AL, "input_mics": mics, **common})
    types = output_types(picker)
    assert types[picker + "queries.star"] == "MicrographCoordsGroup.star.relion.cryoal.queries"
    assert types[picker + "autopick.star"] == "MicrographCoordsGroup.star.relion.cryoal.autopick"
    assert types[picker + "logfile.pdf"] == "LogFile.pdf.cryoal"
    assert mics in input_names(picker)
    queries = coords_of(picker + "queries.star")
    assert len(queries) == 2 and sum(len(q) for q in queries.values()) == 4
    rdos = by_type(project.get_job(picker).save_results_display_files())
    assert "pending" not in rdos
    overlays = [r for r in rdos["image"] if "overlay_" in r.image_path]
    assert len(overlays) == 2 and all(Path(r.image_path).is_file() for r in overlays)
    assert any(r.image_path.endswith("round_000/scores.png") for r in rdos["image"])
    assert rdos["histogram"][0].bins and sum(rdos["histogram"][0].bins) > 0
    assert [row[:6] for row in rdos["table"][0].table_data] == [["1", "0", "round", "0", "0", "0"]]
    assert len(list(Path(picker).glob(".results_display*.json"))) == sum(len(v) for v in rdos.values())

    # the review, in Doppio's pick editor (its own job): on the first micrograph keep one proposal,
    # delete the rest and add one pick far from them; the second micrograph is left unopened
    first = max(sorted(queries), key=lambda m: len(queries[m]))
    q = queries[first]
    grid = np.array([(x, y) for x in range(64, 512, 64) for y in range(64, 512, 64)], float)
    added = grid[np.argmax([np.hypot(*(q - g).T).min() for g in grid])]  # far from every proposal
    edits = {"images": [{"name": first, "coords": [{"x": float(q[0, 0]), "y": float(q[0, 1])},
                                                   {"x": float(added[0]), "y": float(added[1])}]}]}
    Path("DoppioUploads").mkdir()
    Path("DoppioUploads/edits.json").write_text(json.dumps(edits))
    edited = run(project, {"_rlnJobTypeLabel": "doppio.manualpick.edit", "coords_file": "DoppioUploads/edits.json",
                           "autopick_file": picker + "queries.star"})
    assert edited + "picked_particles.star" in output_types(edited)

    # round 1: continue the job with the edited picks, as Doppio's Continue form does
    job = project.get_continuation_job(picker)
    job.joboptions["input_coords"].value = edited + "picked_particles.star"
    job.write_jobstar(job.output_dir, "continue_job.star", is_continue=True)
    project.continue_job(picker, run_in_foreground=True)
    assert project.wait_for_job_to_finish(picker) == "Succeeded"
    state = json.loads(Path(picker, "session.json").read_text())
    fitted = state["history"][-1]
    # kept = positive, deleted = negative, added = positive; the unopened micrograph gave nothing
    assert (fitted["round"], fitted["labels"], fitted["positives"]) == (1, len(q) + 1, 2)
    assert edited + "picked_particles.star" in input_names(picker)
    types = output_types(picker)
    assert types[picker + "model.npz"] == "ParamsData.npz.cryoal.model"
    rdos = by_type(project.get_job(picker).save_results_display_files())
    assert [row[3:6] for row in rdos["table"][0].table_data] == [["0", "0", "0"], [str(len(q) + 1), "2", str(len(q) - 1)]]
    assert rdos["graph"][0].yvalues == [[0, 2], [0, len(q) - 1]]
    assert any(r.image_path.endswith("round_001/scores.png") for r in rdos["image"])

    # the predict job: the saved model on every micrograph, no labels
    predicted = run(project, {"_rlnJobTypeLabel": PREDICT, "input_mics": mics, "input_model": picker + "model.npz",
                              "threshold": 0.5, "device": "cpu", "nr_threads": 2, "cache_dir": feature_cache,
                              "overlays": 1})
    assert picker + "model.npz" in input_names(predicted)
    types = output_types(predicted)
    assert types[predicted + "candidates.star"] == "MicrographCoordsGroup.star.relion.cryoal.candidates"
    picks = coords_of(predicted + "autopick.star")
    n_picks = sum(len(p) for p in picks.values())
    summary = json.loads(Path(predicted, "summary.json").read_text())
    assert len(picks) == 3 and n_picks == summary["picks"] > 0 and summary["threshold"] == 0.5
    rdos = by_type(project.get_job(predicted).save_results_display_files())
    assert rdos["histogram"][0].title.endswith("in candidates.star")
    assert sum(rdos["histogram"][0].bins) == summary["candidates"]
    expected = summary["expected_particles"]["expected"]
    assert rdos["text"][0].title == "Particles expected" and f"{expected:.0f} particles expected" in \
        rdos["text"][0].display_data

    # RELION's Extract, run by the pipeliner, on our picks
    kit = relion_kit()
    if kit is None:
        pytest.skip("RELION kit (../shared/relion/relion5/bin) or its libraries absent: Extract not run")
    monkeypatch.setenv("PATH", f"{kit}{os.pathsep}{os.environ['PATH']}")
    assert shutil.which("relion_preprocess") == str(kit / "relion_preprocess")
    extracted = run(project, {"_rlnJobTypeLabel": "relion.extract", "star_mics": mics,
                              "coords_suffix": predicted + "autopick.star", "extract_size": 64, "bg_diameter": 56,
                              "nr_mpi": 1})
    assert StarFile(extracted + "particles.star").count_block("particles") == n_picks
    parts = read_star(extracted + "particles.star")["particles"]
    got = {m: np.sort(np.column_stack([g["rlnCoordinateX"].astype(float), g["rlnCoordinateY"].astype(float)]), 0)
           for m, g in parts.groupby("rlnMicrographName")}
    assert set(got) == {m for m, p in picks.items() if len(p)}
    for m, g in got.items():
        np.testing.assert_allclose(g, np.sort(picks[m], 0), atol=0.01)
    assert len(list(Path(extracted).rglob("*.mrcs"))) == len(got)
