"""RELION file conventions (the cryoal_ext.relion file modules) and the job's argument parsing: fast, no features."""
from __future__ import annotations

import argparse
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
import starfile

from cryoal_ext.relion import coordinates as C, markers as M, micrographs as MG, star as S
from cryoal_ext.relion.cli import build_parser
from cryoal_ext.relion.settings import settings_from_args
from cryoal_ext.extract import Picks


def star_text(path: Path, blocks: dict[str, pd.DataFrame], version: int | None) -> Path:
    """Write a STAR file the way RELION lays it out (version line first), independently of the code under test."""
    path.parent.mkdir(parents=True, exist_ok=True)
    starfile.write(blocks, path, overwrite=True)
    if version:
        path.write_text(f"\n# version {version}\n\n" + path.read_text())
    return path


def tiny_mrc(path: Path, pixel_size: float | None = 5.36, shape=(64, 64)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.random.default_rng(0).normal(size=shape).astype(np.float32))
        if pixel_size:
            m.voxel_size = pixel_size
    return path


# --- names and paths -------------------------------------------------------------------------
@pytest.mark.parametrize("name, post", [
    ("MotionCorr/job002/Movies/mic001.mrc", "Movies/mic001.mrc"),
    ("CtfFind/job003/a/b/mic.mrc", "a/b/mic.mrc"),
    ("Import/job001/mic.mrc", "mic.mrc"),
    ("Movies/mic001.mrc", "Movies/mic001.mrc"),  # not a pipeline name: whole name
    ("data/jobless/mic.mrc", "data/jobless/mic.mrc"),
])
def test_decompose_pipeline_name(name, post):
    assert S.decompose_pipeline_name(name)[2] == post


def test_output_path_rule():
    assert S.coordinates_path("External/job005", "MotionCorr/job002/Movies/mic001.mrc", "autopick") == \
        "External/job005/Movies/mic001_autopick.star"
    assert S.coordinates_path("External/job005/", "/abs/data/mic.mrc", "queries") == \
        "External/job005/abs/data/mic_queries.star"
    assert S.coordinates_path("External/job005/", "../outside/mic.mrc", "queries") == \
        "External/job005/outside/mic_queries.star"
    with pytest.raises(S.RelionError):
        S.job_dir("  ")


# --- versions --------------------------------------------------------------------------------
def test_version_detection(tmp_path):
    s5 = star_text(tmp_path / "a.star", {"x": pd.DataFrame({"rlnMicrographName": ["m.mrc"]})}, 50001)
    s4 = star_text(tmp_path / "b.star", {"x": pd.DataFrame({"rlnMicrographName": ["m.mrc"]})}, 30001)
    s0 = star_text(tmp_path / "c.star", {"x": pd.DataFrame({"rlnMicrographName": ["m.mrc"]})}, None)
    assert S.detect_relion_version(s5)[0] == 5
    assert S.detect_relion_version(s4)[0] == 4
    assert S.detect_relion_version(s5, "4")[0] == 4
    assert S.detect_relion_version(s4, "relion5")[0] == 5
    assert S.detect_relion_version(s0, None, tmp_path)[0] == 5  # no hint anywhere: current release
    (tmp_path / "default_pipeline.star").write_text("\n# version 30001\n\ndata_pipeline_general\n")
    major, how = S.detect_relion_version(s0, None, tmp_path)
    assert major == 4 and "default_pipeline.star" in how
    with pytest.raises(S.RelionError):
        S.detect_relion_version(s5, "7")


def test_output_nodes_labels_per_version(tmp_path):
    nodes = [("External/job005/autopick.star", "coords"), ("External/job005/logfile.pdf", "logfile")]
    for major, coords in ((4, "MicrographsCoords.star.relion.autopick"),
                          (5, "MicrographCoordsGroup.star.relion.autopick")):
        out = tmp_path / f"r{major}" / "External" / "job005"
        out.mkdir(parents=True)
        path = M.write_output_nodes("External/job005/", nodes, major, tmp_path / f"r{major}")
        full = tmp_path / f"r{major}" / path
        text = full.read_text()
        assert f"# version {S.VERSION_TAG[major]}" in text
        df = starfile.read(full, always_dict=True)["output_nodes"]
        assert list(df["rlnPipeLineNodeName"]) == [n for n, _ in nodes]
        assert list(df["rlnPipeLineNodeTypeLabel"]) == [coords, "LogFile.pdf.relion"]
        assert "rlnPipeLineNodeType" not in df.columns  # the RELION 3.1 integer column is not read by 4/5
        assert ("rlnPipeLineNodeTypeLabelDepth" in df.columns) == (major == 5)


# --- micrographs STAR ------------------------------------------------------------------------
def test_pixel_size_chain(tmp_path):
    mics = pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/Movies/a.mrc", "MotionCorr/job002/Movies/b.mrc"],
                         "rlnOpticsGroup": [1, 2]})
    optics = pd.DataFrame({"rlnOpticsGroupName": ["g1", "g2"], "rlnOpticsGroup": [1, 2],
                           "rlnMicrographOriginalPixelSize": [1.34, 1.0], "rlnMicrographBinning": [4.0, 2.0],
                           "rlnImagePixelSize": [3.0, np.nan]})
    star = star_text(tmp_path / "m.star", {"optics": optics, "micrographs": mics}, 30001)
    t = MG.read_micrographs_star(star, tmp_path)
    # rlnImagePixelSize wins over original x binning (RELION copies it), with a warning
    assert t.entries[0].pixel_size == pytest.approx(3.0) and t.entries[0].pixel_size_source == "rlnImagePixelSize"
    assert any("rlnImagePixelSize" in n for n in t.notes)
    assert t.entries[1].pixel_size == pytest.approx(2.0)
    assert t.entries[0].path == tmp_path / "MotionCorr/job002/Movies/a.mrc"
    assert [e.key for e in t.entries] == ["a", "b"]
    optics["rlnMicrographPixelSize"] = [5.36, 2.5]
    star = star_text(tmp_path / "m2.star", {"optics": optics, "micrographs": mics}, 50001)
    t = MG.read_micrographs_star(star, tmp_path)
    assert [e.pixel_size for e in t.entries] == [5.36, 2.5] and not t.notes
    assert t.version == 50001


def test_relion30_single_table_uses_header(tmp_path):
    tiny_mrc(tmp_path / "Micrographs" / "m1.mrc", 7.08)
    star = star_text(tmp_path / "mics.star", {"": pd.DataFrame({"rlnMicrographName": ["Micrographs/m1.mrc"]})}, None)
    t = MG.read_micrographs_star(star, tmp_path)
    e = t.entries[0]
    assert e.pixel_size is None and t.version is None
    assert MG.check_pixel_size(e, MG.read_header(e.path)) is None
    assert e.pixel_size == pytest.approx(7.08) and e.pixel_size_source == "MRC header"
    # 3.0 magnification/detector columns on the micrograph row
    df = pd.DataFrame({"rlnMicrographName": ["Micrographs/m1.mrc"], "rlnDetectorPixelSize": [14.0],
                       "rlnMagnification": [20000.0]})
    t = MG.read_micrographs_star(star_text(tmp_path / "m30.star", {"": df}, None), tmp_path)
    assert t.entries[0].pixel_size == pytest.approx(7.0)


def test_missing_column_and_optics_group(tmp_path):
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnMicrographPixelSize": [1.0]})
    bad = star_text(tmp_path / "bad.star",
                    {"optics": optics, "micrographs": pd.DataFrame({"rlnCtfImage": ["x.ctf"], "rlnOpticsGroup": [1]})},
                    50001)
    with pytest.raises(S.RelionError, match=r"bad\.star.*rlnMicrographName"):
        MG.read_micrographs_star(bad)
    grp = star_text(tmp_path / "grp.star",
                    {"optics": optics,
                     "micrographs": pd.DataFrame({"rlnMicrographName": ["a.mrc"], "rlnOpticsGroup": [3]})},
                    50001)
    with pytest.raises(S.RelionError, match="optics group 3"):
        MG.read_micrographs_star(grp)
    with pytest.raises(S.RelionError, match="not found"):
        MG.read_micrographs_star(tmp_path / "nope.star")


def test_pixel_size_mismatch(tmp_path):
    mrc = tiny_mrc(tmp_path / "m.mrc", 5.0)
    h = MG.read_header(mrc)
    e = MG.MicrographEntry("m.mrc", mrc, "m", 5.36, "rlnMicrographPixelSize")
    assert "differs" in MG.check_pixel_size(e, h)  # 7 %: warn, keep the STAR value
    assert e.pixel_size == 5.36
    e = MG.MicrographEntry("m.mrc", mrc, "m", 1.34, "rlnMicrographPixelSize")
    with pytest.raises(S.RelionError, match="pixel size mismatch.*m.mrc"):
        MG.check_pixel_size(e, h)
    unset = MG.read_header(tiny_mrc(tmp_path / "u.mrc", 1.0))
    assert MG.check_pixel_size(MG.MicrographEntry("u.mrc", mrc, "u", 1.34, "x"), unset) is None


def test_unique_keys_for_same_stems(tmp_path):
    mics = pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/A/mic.mrc", "MotionCorr/job002/B/mic.mrc"]})
    t = MG.read_micrographs_star(star_text(tmp_path / "m.star", {"micrographs": mics}, 50001), tmp_path)
    assert [e.key for e in t.entries] == ["A__mic", "B__mic"]
    find = t.resolver()
    assert find("MotionCorr/job002/B/mic.mrc").key == "B__mic"
    assert find("Other/job009/A/mic.mrc").key == "A__mic"  # same path after the job folder
    assert find("mic") is None  # ambiguous stem


# --- coordinates -----------------------------------------------------------------------------
def test_coordinate_list_and_selection_types(tmp_path):
    per = star_text(tmp_path / "ManualPick/job004/Movies/a_manualpick.star",
                    {"": pd.DataFrame({"rlnCoordinateX": [10.0, 20.0, 30.0], "rlnCoordinateY": [1.0, 2.0, 3.0],
                                       "rlnParticleSelectionType": [2, 1, 3], "rlnAnglePsi": [-999.0] * 3,
                                       "rlnAutopickFigureOfMerit": [0.0] * 3})}, 50001)
    lst = star_text(tmp_path / "ManualPick/job004/manualpick.star",
                    {"coordinate_files": pd.DataFrame({
                        "rlnMicrographName": ["MotionCorr/job002/Movies/a.mrc", "MotionCorr/job002/Movies/b.mrc"],
                        "rlnMicrographCoordinates": ["ManualPick/job004/Movies/a_manualpick.star",
                                                     "ManualPick/job004/Movies/b_manualpick.star"]})}, 50001)
    files = C.read_coordinate_list(lst, tmp_path)
    assert list(files) == ["MotionCorr/job002/Movies/a.mrc"]  # b was never saved: not listed
    c = C.read_mic_coordinates(per)
    assert list(c.label) == [1, 0, 1]
    df = C.read_picks_table(lst, tmp_path)
    assert list(df["label"]) == [1.0, 0.0, 1.0] and set(df["micrograph"]) == {"MotionCorr/job002/Movies/a.mrc"}


def test_all_deleted_file_reads_empty(tmp_path):
    p = tmp_path / "x_queries.star"
    p.write_text("\n# version 50001\n\ndata_\n\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n"
                 "_rlnParticleSelectionType #3\n\n")
    c = C.read_mic_coordinates(p)
    assert c.x.size == 0 and c.label.size == 0
    p.write_text("\ndata_\n\nloop_\n_rlnFoo #1\n1\n")
    with pytest.raises(S.RelionError, match="rlnCoordinateX"):
        C.read_mic_coordinates(p)


def test_legacy_coords_suffix(tmp_path):
    tiny_mrc(tmp_path / "MotionCorr/job002/Movies/a.mrc")
    mics = star_text(tmp_path / "CtfFind/job003/micrographs_ctf.star",
                     {"optics": pd.DataFrame({"rlnOpticsGroup": [1], "rlnMicrographPixelSize": [5.36]}),
                      "micrographs": pd.DataFrame({"rlnMicrographName": ["MotionCorr/job002/Movies/a.mrc"],
                                                   "rlnOpticsGroup": [1]})}, 30001)
    star_text(tmp_path / "AutoPick/job006/Movies/a_autopick.star",
              {"": pd.DataFrame({"rlnCoordinateX": [5.0], "rlnCoordinateY": [6.0]})}, 30001)
    suffix = tmp_path / "AutoPick/job006/coords_suffix_autopick.star"
    suffix.write_text("CtfFind/job003/micrographs_ctf.star\n")
    files = C.read_coordinate_list(suffix, tmp_path)
    assert files == {"MotionCorr/job002/Movies/a.mrc": tmp_path / "AutoPick/job006/Movies/a_autopick.star"}
    assert C.is_coordinate_list(suffix) and not C.is_coordinate_list(mics)


def test_particles_origin_correction(tmp_path):
    parts = star_text(tmp_path / "particles.star", {
        "optics": pd.DataFrame({"rlnOpticsGroup": [1], "rlnImagePixelSize": [2.0]}),
        "particles": pd.DataFrame({"rlnMicrographName": ["M/job002/a.mrc"], "rlnCoordinateX": [100.0],
                                   "rlnCoordinateY": [50.0], "rlnOriginXAngst": [10.72], "rlnOriginYAngst": [-5.36],
                                   "rlnImageName": ["1@x.mrcs"]})}, 50001)
    df = C.read_picks_table(parts, tmp_path, pixel_size_of=lambda n: 5.36)
    assert df.loc[0, "x"] == pytest.approx(98.0) and df.loc[0, "y"] == pytest.approx(51.0)
    assert np.isnan(df.loc[0, "label"])


def test_write_coordinates_round_trip(tmp_path):
    picks = {"MotionCorr/job002/Movies/a.mrc": Picks("a", np.array([1.5, 2.5]), np.array([3.0, 4.0]),
                                                     np.array([0.9, 0.2])),
             "MotionCorr/job002/Movies/b.mrc": Picks("b", np.empty(0), np.empty(0), np.empty(0))}
    lst, files = C.write_coordinates("External/job005/", list(picks), picks, "autopick", "autopick.star", 30001,
                                     tmp_path)
    assert lst == "External/job005/autopick.star"
    assert files["MotionCorr/job002/Movies/a.mrc"] == "External/job005/Movies/a_autopick.star"
    t = starfile.read(tmp_path / lst, always_dict=True)["coordinate_files"]
    assert list(t["rlnMicrographName"]) == list(picks)
    assert (tmp_path / lst).read_text().lstrip().startswith("# version 30001")
    a = starfile.read(tmp_path / files["MotionCorr/job002/Movies/a.mrc"])
    assert list(a.columns) == ["rlnCoordinateX", "rlnCoordinateY", "rlnClassNumber", "rlnAutopickFigureOfMerit",
                               "rlnAnglePsi", "rlnParticleSelectionType"]
    assert list(a["rlnParticleSelectionType"]) == [2, 2] and list(a["rlnClassNumber"]) == [0, 0]
    assert C.read_mic_coordinates(tmp_path / files["MotionCorr/job002/Movies/b.mrc"]).x.size == 0


def test_markers(tmp_path):
    out = "External/job007/"
    (tmp_path / out).mkdir(parents=True)
    M.write_marker(out, M.FAILURE, tmp_path)
    M.clear_exit_markers(out, tmp_path)
    assert not (tmp_path / out / M.FAILURE).exists()
    M.check_abort(out, tmp_path)
    (tmp_path / out / M.ABORT_NOW).touch()
    with pytest.raises(M.JobAborted):
        M.check_abort(out, tmp_path)
    M.finish_aborted(out, tmp_path)
    assert (tmp_path / out / M.ABORTED).exists() and not (tmp_path / out / M.ABORT_NOW).exists()
    assert not M.signal_pipeline_changed(tmp_path)  # not a RELION project: nothing written
    assert not (tmp_path / M.PIPELINE_HAS_CHANGED).exists()
    (tmp_path / "default_pipeline.star").write_text("\n# version 50001\n")
    assert M.signal_pipeline_changed(tmp_path) and (tmp_path / M.PIPELINE_HAS_CHANGED).exists()


# --- the threshold RELION's Extract applies ------------------------------------------------------
def test_extract_threshold_reproduces_the_kept_set():
    """Extract keeps FOM > threshold, the threshold read as a float32: the suggested value must be
    below the lowest kept FOM as written (0.459873 -> 0.459, not 0.460), and above the next one."""
    from cryoal_ext.workflow import suggest_threshold

    t = C.extract_threshold([0.459873, 0.2, 0.9], 0.459873)
    assert (t.text, t.value) == ("0.459", 0.459)
    assert C.extract_threshold([0.459, 0.4589, 0.9], 0.459).text == "0.4589"  # 0.459 itself would drop it
    assert C.extract_threshold([0.4590004, 0.4589996], 0.4590004).text == "0.458"  # both written as 0.459000
    assert list(C.extract_keeps([0.459, 0.4590001], np.float32(0.459))) == [True, True]  # float32(0.459) < 0.459
    rng = np.random.default_rng(0)
    for trial in range(300):
        scores = rng.random(int(rng.integers(1, 200)))
        if trial % 3 == 0:
            scores = np.round(scores, int(rng.integers(2, 6)))  # ties at the written precision
        lowest = suggest_threshold(scores)
        t = C.extract_threshold(scores, lowest)
        w = C.written_fom(scores)
        assert (C.extract_keeps(w, float(t.text)) == (w >= C.written_fom(lowest))).all(), (t, lowest)
        kept = C.keep_for_extract(Picks("m", np.arange(w.size), np.arange(w.size), scores), t.value)
        assert len(kept) == int((w >= C.written_fom(lowest)).sum())


# --- the command line RELION builds --------------------------------------------------------------
def parse(argv: list[str]):
    return settings_from_args(build_parser().parse_args(argv))


def test_relion_command_line():
    s = parse(["--o", "External/job012", "--in_mics", "CtfFind/job003/micrographs_ctf.star", "--in_3Dref", "ref.mrc",
               "--diameter", "300", "--threshold", "--denoise", "--predict", "--batch", "20", "--j", "4",
               "--some_other", "x", "--pipeline_control", "External/job012/"])
    assert s.outdir == "External/job012/"
    assert s.diameter == 300 and s.threshold is None and s.predict is True and s.batch == 20
    assert s.threads == 4 and s.ignored_inputs == {"in_3dref": "ref.mrc"}
    assert "--denoise" in s.unknown and "--some_other" in s.unknown
    s = parse(["--in_mics", "m.star", "--o", "External/job001/", "--predict", "false", "--threshold", "0.4",
               "--labels", "a.star,b.star", "--negatives", "c.star", "--gpu", "1"])
    assert s.predict is False and s.threshold == 0.4 and s.final
    assert s.labels == ["a.star", "b.star"] and s.negatives == ["c.star"] and s.device == "cuda:1"
    for bad, msg in ((["--o", "E/job1/", "--threshold", "abc"], "--threshold"),
                     (["--o", "E/job1/", "--threshold", "3"], "probability"),
                     (["--o", "E/job1/", "--batch", "0"], "--batch"),
                     (["--in_mics", "m.star"], "--o")):
        with pytest.raises(S.RelionError, match=msg):
            parse(bad)


def test_subcommand_tolerates_unknown_arguments():
    from cryoal_ext.cli import build_parser

    args = build_parser().parse_args(["relion", "--o", "External/job003/", "--whatever", "1", "--pipeline_control",
                                      "External/job003/"])
    assert args.unknown_args == ["--whatever", "1"] and args.o == "External/job003/"
    assert isinstance(args, argparse.Namespace)
