"""Bad input (issue 12): each case gets a one-line error naming the option or file, exit 1, and changes nothing.

Every CLI case runs in-process through ``cryoal_ext.cli.main`` and checks the message, the exit code,
and that the session / output folders are byte-identical afterwards (or were never created).
"""
from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import pytest

from cryoal_ext.cli import main
from conftest import blob_image, write_mrc

pytestmark = pytest.mark.usefixtures("single_torch_thread")

RADIUS = 12.0
FAST = ["--feature-model", "resnet16_u32", "--device", "cpu", "--threads", "1"]
CENTRES = [(60, 60), (190, 70), (70, 190), (180, 180), (128, 128)]
UNICODE_NAME = "mic é 1"  # a space and a non-ASCII letter


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one ``cryoal`` call; argparse's exit counts as the code."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as exc:
        rc = exc.code
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (empty when ``root`` does not exist)."""
    root = Path(root)
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()} \
        if root.exists() else {}


def refused(argv, capsys, *needles: str, unchanged: tuple[Path, ...] = (), absent: tuple[Path, ...] = ()) -> str:
    """Run ``argv``; assert exit 1, one error naming every needle, no traceback, nothing changed or created."""
    before = {p: snapshot(p) for p in unchanged}
    rc, out, err = run(argv, capsys)
    assert rc == 1, (rc, out, err)
    assert "error:" in err and "Traceback" not in err, err
    for n in needles:
        assert n in err, (n, err)
    for p in unchanged:
        assert snapshot(p) == before[p], f"{p} changed"
    for p in absent:
        assert not Path(p).exists(), f"{p} was created"
    return err


@pytest.fixture(scope="module")
def mics(tmp_path_factory) -> Path:
    """Two 256 x 256 micrographs at 4 A/px (working image 128 x 128), one with a space and unicode in its name."""
    folder = tmp_path_factory.mktemp("mics")
    for i, name in enumerate(["plain_a", UNICODE_NAME]):
        img = blob_image((256, 256), CENTRES, sigma=4.0, amplitude=5.0, noise=0.5, seed=i).astype(np.float32)
        write_mrc(folder / f"{name}.mrc", img, voxel_size=4.0)
    return folder


@pytest.fixture(scope="module")
def session(tmp_path_factory, mics, feature_cache) -> Path:
    """A session after round 0 with labels on both micrographs (features cached for every later test)."""
    root = tmp_path_factory.mktemp("sess")
    pos, neg = root / "pos.txt", root / "neg.txt"
    pos.write_text("image_name\tx_coord\ty_coord\n" + "".join(
        f"{n}\t{x}\t{y}\n" for n in ("plain_a", UNICODE_NAME) for x, y in CENTRES[:3]), encoding="utf-8")
    neg.write_text(f"image_name\tx_coord\ty_coord\nplain_a\t20\t230\n{UNICODE_NAME}\t230\t20\n", encoding="utf-8")
    s = root / "S"
    rc = main([str(a) for a in ["round", *sorted(mics.glob("*.mrc")), "--session", s, "--radius-px", RADIUS,
                                "--positives", pos, "--negatives", neg, "--batch", "4", "--cache-dir", feature_cache,
                                *FAST]])
    assert rc == 0
    assert (s / "labels.tsv").exists() and (s / "round_000" / "queries.txt").exists()
    return s


def round_args(mics: Path, session: Path, cache: str, *extra) -> list:
    return ["round", *sorted(mics.glob("*.mrc")), "--session", session, "--cache-dir", cache, "--batch", "4",
            *FAST, *extra]


# --- option values: one validator, every command ---------------------------------------------------
@pytest.mark.parametrize("option, value, say", [
    ("--diameter-A", "inf", "expected a finite number > 0, got 'inf'"),
    ("--diameter-A", "nan", "expected a finite number > 0, got 'nan'"),
    ("--diameter-A", "-300", "expected a finite number > 0, got '-300'"),
    ("--radius-px", "-5", "expected a finite number > 0, got '-5'"),
    ("--pixel-size", "nan", "expected a finite number > 0, got 'nan'"),
    ("--pixel-size", "0", "expected a finite number > 0, got '0'"),
    ("--pixel-size", "-1", "expected a finite number > 0, got '-1'"),
    ("--pixel-size", "1e6", "'1e6' A/px is not a plausible pixel size (expected 0.1 to 50 A/px)"),
    ("--working-pixel-size", "inf", "expected a finite number > 0, got 'inf'"),
])
def test_round_refuses_bad_numbers(option, value, say, mics, session, feature_cache, capsys):
    size = [] if option in ("--diameter-A", "--radius-px") else ["--radius-px", RADIUS]
    refused(round_args(mics, session, feature_cache, *size, option, value), capsys, f"argument {option}: {say}",
            unchanged=(session,))


@pytest.mark.parametrize("argv, option", [
    (["predict", "m.mrc", "--out-dir", "{out}", "--diameter-A", "inf"], "--diameter-A"),
    (["predict", "m.mrc", "--out-dir", "{out}", "--radius-px", "28", "--pixel-size", "0"], "--pixel-size"),
    (["predict", "m.mrc", "--out-dir", "{out}", "--radius-px", "28", "--threshold", "nan"], "--threshold"),
    (["benchmark", "--micrographs", "m", "--truth", "t", "--json", "{out}/b.json", "--radius-px", "-5"], "--radius-px"),
    (["evaluate", "--picks", "p", "--truth", "t", "--radius-px", "-5"], "--radius-px"),
    (["evaluate", "--picks", "p", "--truth", "t", "--radius-px", "5", "--border-px", "-1"], "--border-px"),
    (["features", "m.mrc", "--pixel-size", "nan"], "--pixel-size"),
    (["example", "--out", "{out}", "--working-pixel-size", "-8"], "--working-pixel-size"),
    (["cryosparc", "--exposures", "e.cs", "--session", "{out}/s", "--diameter-A", "nan"], "--diameter-A"),
    (["cryosparc", "--exposures", "e.cs", "--session", "{out}/s", "--radius-px", "0"], "--radius-px"),
])
def test_every_command_refuses_bad_numbers(argv, option, tmp_path, capsys):
    out = tmp_path / "out"
    refused([a.replace("{out}", str(out)) for a in argv], capsys, f"argument {option}:", absent=(out,))


@pytest.mark.parametrize("name, value", [("diameter", "inf"), ("diameter", "nan"), ("radius_px", "-inf"),
                                         ("pixel_size", "nan"), ("batch", "inf"), ("threshold", "nan")])
def test_relion_job_numbers_must_be_finite(name, value, tmp_path):
    """The RELION job's parameters (its own parser: --diameter, --radius_px, ...) refuse inf and nan by name."""
    from cryoal_ext.relion.settings import settings_from_args
    from cryoal_ext.relion.star import RelionError

    with pytest.raises(RelionError, match=f"--{name} '{value}': expected a finite number"):
        settings_from_args(argparse.Namespace(o=str(tmp_path / "External" / "job009"), **{name: value}))


def test_relion_job_pixel_size_must_be_plausible(tmp_path):
    from cryoal_ext.relion.settings import settings_from_args
    from cryoal_ext.relion.star import RelionError

    with pytest.raises(RelionError, match="--pixel_size 1e\\+06: not a plausible pixel size"):
        settings_from_args(argparse.Namespace(o=str(tmp_path / "External" / "job009"), pixel_size="1e6"))


# --- sizes: refused up front, with the sizes ----------------------------------------------------------
def test_particle_larger_than_the_micrograph_round_and_predict(example_data, tmp_path, feature_cache, capsys):
    """The 1e5 A particle that was an OOM kill at 23.7 GB: refused at once, no session folder, no output folder."""
    crops = sorted((example_data / "micrographs").glob("*.mrc"))
    s, out = tmp_path / "s", tmp_path / "picks"
    err = refused(["round", *crops, "--session", s, "--diameter-A", "1e5", "--cache-dir", feature_cache, *FAST],
                  capsys, "061_10028_crop.mrc", "the particle diameter is 1.866e+04 px (--diameter-A 100000 at 5.36 A/px)",
                  "larger than the micrograph (512 x 512 px)", absent=(s,))
    assert err.count("\n") == 1  # one line
    refused(["predict", *crops, "--out-dir", out, "--diameter-A", "1e5", "--no-progress", *FAST], capsys,
            "larger than the micrograph (512 x 512 px)", absent=(out,))


def test_micrograph_smaller_than_two_particle_diameters(tmp_path, feature_cache, capsys):
    tiny = write_mrc(tmp_path / "tiny.mrc", blob_image((20, 20), [(10, 10)]).astype(np.float32), voxel_size=5.36)
    refused(["round", tiny, "--session", tmp_path / "s", "--radius-px", "28", "--cache-dir", feature_cache, *FAST],
            capsys, "tiny.mrc: the particle diameter is 56 px (--radius-px 28)", "larger than the micrograph (20 x 20 px)",
            absent=(tmp_path / "s",))
    refused(["predict", tiny, "--out-dir", tmp_path / "o", "--radius-px", "6", *FAST], capsys,
            "tiny.mrc: the particle diameter is 12 px (--radius-px 6)",
            "fewer than 2 particle diameters across (20 x 20 px)", absent=(tmp_path / "o",))


def test_working_image_larger_than_memory(mics, session, feature_cache, capsys, monkeypatch):
    from cryoal_ext import validate

    monkeypatch.setattr(validate, "available_memory", lambda: 1 << 20)
    refused(round_args(mics, session, feature_cache, "--radius-px", RADIUS), capsys,
            ".mrc: its working image (128 x 128 px at 8 A/px, from 256 x 256 px at 4 A/px) needs about 0.0 GiB",
            "more than the 0.0 GiB available; raise --working-pixel-size", unchanged=(session,))
    # the estimate: 128 x 128 px x 128 features x 4 bytes x 3 (one view)
    assert validate.feature_bytes((128, 128), 1) == 128 * 128 * 128 * 4 * 3


@pytest.mark.parametrize("voxel, say", [(1e6, "pixel size 1e+06 A/px is outside the plausible 0.1-50 A/px"),
                                        (-5.36, "pixel size is negative (-5.36 A/px)"),
                                        (0.0, "no pixel size")])
def test_header_pixel_size_absurd_negative_or_missing(voxel, say, tmp_path, mics, session, feature_cache, capsys):
    odd = write_mrc(tmp_path / "odd.mrc", blob_image((256, 256), CENTRES).astype(np.float32), voxel_size=voxel)
    refused(["round", odd, "--session", session, "--radius-px", RADIUS, "--cache-dir", feature_cache, *FAST], capsys,
            f"{odd} (MRC header): {say}", "--pixel-size", unchanged=(session,))
    # the reader says the same wherever it is reached from (RELION, cryoSPARC, napari load through it)
    from cryoal_ext.io import MicrographError, load_micrograph

    with pytest.raises(MicrographError, match=say.replace("(", r"\(").replace(")", r"\)").replace("+", r"\+")):
        load_micrograph(odd)


def test_predict_records_a_bad_header_pixel_size_and_picks_the_rest(mics, tmp_path, capsys):
    """Prediction goes on past one bad micrograph (as for an unreadable one): its error file says why, exit 1."""
    import shutil

    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(mics / "plain_a.mrc", d)
    write_mrc(d / "odd.mrc", blob_image((256, 256), CENTRES).astype(np.float32), voxel_size=1e6)
    out = tmp_path / "p"
    rc, _, err = run(["predict", d, "--out-dir", out, "--radius-px", RADIUS, "--no-progress", *FAST], capsys)
    assert rc == 1 and "Traceback" not in err
    assert "odd.mrc (MRC header): pixel size 1e+06 A/px is outside the plausible 0.1-50 A/px" in \
        (out / "micrographs" / "odd_error.txt").read_text()
    assert (out / "micrographs" / "plain_a_picks.txt").exists()


# --- labels outside the micrograph ---------------------------------------------------------------
@pytest.mark.parametrize("option", ["--positives", "--negatives", "--reviewed"])
def test_labels_outside_the_micrograph_are_refused(option, tmp_path, mics, session, feature_cache, capsys):
    bad = tmp_path / "off.txt"
    bad.write_text(f"image_name\tx_coord\ty_coord\nplain_a\t100\t100\n{UNICODE_NAME}\t300\t40\n", encoding="utf-8")
    refused(round_args(mics, session, feature_cache, "--radius-px", RADIUS, option, bad), capsys,
            f"{bad}: data row 2 (line 3) puts a particle at x=300, y=40 outside micrograph {UNICODE_NAME} "
            "(256 x 256 px: 0 <= x <= 256, 0 <= y <= 256)", unchanged=(session,))


def test_labels_outside_in_a_star_file(tmp_path, mics, session, feature_cache, capsys):
    import pandas as pd

    from cryoal_ext.files import write_star

    star = tmp_path / "neg.star"
    write_star(star, {"": pd.DataFrame({"rlnMicrographName": [f"mics/{UNICODE_NAME}.mrc", "mics/plain_a.mrc"],
                                        "rlnCoordinateX": [10.0, -3.0], "rlnCoordinateY": [10.0, 5.0]})})
    refused(round_args(mics, session, feature_cache, "--radius-px", RADIUS, "--negatives", star), capsys,
            f"{star}: data row 2 puts a particle at x=-3, y=5 outside micrograph plain_a (256 x 256 px",
            unchanged=(session,))


@pytest.fixture(scope="module")
def cs_session(tmp_path_factory, mics, feature_cache):
    """An offline cryoSPARC session after round 0, and its exposures .cs."""
    from cryoal_ext.cli import main as cli

    from conftest import cryosparc_project_of

    root = tmp_path_factory.mktemp("cs")
    project, exposures = cryosparc_project_of(mics, root / "P")
    s = root / "S"
    rc = cli([str(a) for a in ["cryosparc", "--exposures", exposures, "--project-dir", project, "--session", s,
                               "--radius-px", RADIUS, "--out", root / "queries.cs", "--cache-dir", feature_cache,
                               "--batch", "4", "--no-plots", *FAST]])
    assert rc == 0
    return project, exposures, s, root / "queries.cs"


def _edited_copy(src: Path, dst: Path, field: str, value: float) -> Path:
    from cryoal_ext.cryosparc.data import load_dataset, save_dataset

    d = load_dataset(src)
    v = np.asarray(d[field]).copy()
    v[1] = value
    d[field] = v
    return save_dataset(dst, d)


@pytest.mark.parametrize("field, value", [("location/center_x_frac", 1.5), ("location/center_y_frac", -0.2)])
def test_cs_labels_outside_the_micrograph(field, value, cs_session, tmp_path, feature_cache, capsys):
    project, exposures, s, queries = cs_session
    bad = _edited_copy(queries, tmp_path / "bad.cs", field, value)
    refused(["cryosparc", "--exposures", exposures, "--project-dir", project, "--session", s, "--radius-px", RADIUS,
             "--out", tmp_path / "q.cs", "--positives", bad, "--cache-dir", feature_cache, "--no-plots", *FAST],
            capsys, f"positive:{bad}: row 1 (particle uid", f"{field.split('/')[1]} {value:g}",
            "outside micrograph",
            "(256 x 256 px; fractions run 0 to 1)", unchanged=(s,), absent=(tmp_path / "q.cs",))


def test_cs_review_with_nan_coordinates(cs_session, tmp_path, feature_cache, capsys):
    project, exposures, s, queries = cs_session
    bad = _edited_copy(queries, tmp_path / "reviewed.cs", "location/center_x_frac", float("nan"))
    refused(["cryosparc", "--exposures", exposures, "--project-dir", project, "--session", s, "--radius-px", RADIUS,
             "--out", tmp_path / "q.cs", "--reviewed", bad, "--cache-dir", feature_cache, "--no-plots", *FAST],
            capsys, f"{bad}: location/center_x_frac is nan (not a number) in row 1", unchanged=(s,))


# --- names with spaces and unicode --------------------------------------------------------------
def test_names_with_spaces_round_trip(mics, session, feature_cache, tmp_path, capsys):
    """queries.txt / picks.txt of round 0 read back with the exact names; round 1 takes queries.txt as the review;
    predict's picks.txt, picks.star and coordinates.star name the micrograph so that starfile reads it back."""
    import starfile

    from cryoal_ext.files import read_coordinates

    for f in ("queries.txt", "picks.txt"):
        names = set(read_coordinates(session / "round_000" / f)["image_name"])
        assert UNICODE_NAME in names and names <= {"plain_a", UNICODE_NAME}, (f, names)
    work = tmp_path / "S"
    import shutil

    shutil.copytree(session, work)
    rc, out, err = run(round_args(mics, work, feature_cache, "--radius-px", RADIUS,
                                  "--reviewed", work / "round_000" / "queries.txt"), capsys)
    assert rc == 0, err
    assert "round 1:" in out
    picks = tmp_path / "picks"
    rc, out, err = run(["predict", *sorted(mics.glob("*.mrc")), "--model", work / "model.npz", "--radius-px", RADIUS,
                        "--out-dir", picks, "--no-progress", *FAST], capsys)
    assert rc == 0, err
    assert set(read_coordinates(picks / "picks.txt")["image_name"]) == {"plain_a", UNICODE_NAME}
    star = starfile.read(picks / "picks.star", always_dict=True)["particles"]
    assert {Path(p).name for p in star["rlnMicrographName"]} == {"plain_a.mrc", f"{UNICODE_NAME}.mrc"}
    assert set(read_coordinates(picks / "picks.star")["image_name"]) == {"plain_a", UNICODE_NAME}
    coords = starfile.read(picks / "coordinates.star", always_dict=True)["coordinate_files"]
    assert f"micrographs/{UNICODE_NAME}_picks.star" in set(coords["rlnMicrographCoordinates"])
    assert starfile.read(picks / "micrographs" / f"{UNICODE_NAME}_picks.star").shape[0] > 0


def test_star_values_are_quoted():
    from cryoal_ext.shard import star_value

    assert star_value("a.mrc") == "a.mrc"
    assert star_value("a b.mrc") == '"a b.mrc"' and star_value('say "x" y') == "'say \"x\" y'"
    assert star_value("_x") == '"_x"' and star_value("") == '""' and star_value("data_1") == '"data_1"'


# --- predict: the model's feature model -----------------------------------------------------------
def test_predict_refuses_an_explicit_feature_model_unlike_the_model(mics, session, tmp_path, capsys):
    out = tmp_path / "picks"
    refused(["predict", *sorted(mics.glob("*.mrc")), "--model", session / "model.npz", "--radius-px", RADIUS,
             "--out-dir", out, "--device", "cpu", "--feature-model", "resnet8_u32"], capsys,
            f"--feature-model resnet8_u32 does not match {session / 'model.npz'}, which was trained on resnet16_u32",
            absent=(out,))


# --- evaluate -----------------------------------------------------------------------------------
def test_evaluate_counts_unpicked_micrographs_as_misses(tmp_path, capsys):
    truth = tmp_path / "truth.txt"
    truth.write_text("image_name\tx_coord\ty_coord\nm1\t10\t10\nm1\t50\t50\nm2\t10\t10\nm2\t40\t40\n")
    picks = tmp_path / "picks.txt"
    picks.write_text("image_name\tx_coord\ty_coord\tscore\nm1\t10\t10\t0.9\nm1\t50\t50\t0.8\n")
    rc, out, err = run(["evaluate", "--picks", picks, "--truth", truth, "--radius-px", "5"], capsys)
    assert rc == 0
    assert f"warning: 1 micrograph(s) of {truth} have no picks in {picks} (e.g. m2); their 2 true particle(s) " \
           "count as misses" in err
    res = json.loads(out)
    assert res["n_true"] == 4 and res["recall"] == 0.5 and res["at_threshold"]["fn"] == 2
    rc, out, err = run(["evaluate", "--picks", picks, "--truth", truth, "--radius-px", "5", "--only-picked"], capsys)
    assert rc == 0 and json.loads(out)["recall"] == 1.0 and "warning" not in err


# --- folders we cannot write to -------------------------------------------------------------------
def _lock(folder: Path, on: bool) -> None:
    """Make ``folder`` unwritable (on) or writable again: mode 0555, plus the immutable flag as root
    (root writes into any mode; ``chattr +i`` stops root too, on ext4/xfs/btrfs)."""
    import subprocess

    if on:
        folder.chmod(0o555)
    if os.geteuid() == 0:  # the flag goes on after the mode and comes off before it (it blocks chmod too)
        res = subprocess.run(["chattr", "+i" if on else "-i", str(folder)], capture_output=True, text=True)
        if on and res.returncode != 0:
            pytest.skip(f"running as root and chattr +i is not possible here ({res.stderr.strip()})")
    if not on:
        folder.chmod(0o755)


@pytest.fixture
def read_only(tmp_path):
    """``tmp_path/ro`` (holding ``S``) and ``S`` itself unwritable for this user, even root."""
    ro = tmp_path / "ro"
    (ro / "S").mkdir(parents=True)
    locked = []
    try:
        for f in (ro / "S", ro):
            locked.append(f)
            _lock(f, True)
        yield ro
    finally:
        for f in locked:
            _lock(f, False)


def test_read_only_session_output_and_cache_folders(read_only, tmp_path, mics, feature_cache, capsys):
    """Refused before any micrograph is read or feature computed, naming the folder; no PermissionError."""
    ro = read_only
    mrc = sorted(mics.glob("*.mrc"))[0]
    cache = tmp_path / "cache"
    e1 = refused(["round", mrc, "--session", ro / "S", "--radius-px", RADIUS, "--cache-dir", cache, *FAST], capsys,
                 f"session folder (--session) {ro / 'S'} is not writable", unchanged=(ro,), absent=(cache,))
    e2 = refused(["round", mrc, "--session", ro / "new", "--radius-px", RADIUS, "--cache-dir", cache, *FAST], capsys,
                 f"session folder (--session) {ro / 'new'} is not writable (its parent {ro}", absent=(ro / "new", cache))
    e3 = refused(["predict", mrc, "--out-dir", ro / "picks", "--radius-px", RADIUS, "--no-progress", *FAST], capsys,
                 f"output folder (--out-dir) {ro / 'picks'} is not writable", absent=(ro / "picks",))
    e4 = refused(["features", mrc, "--cache-dir", ro / "S", *FAST], capsys,
                 f"feature cache folder (--cache-dir) {ro / 'S'} is not writable", unchanged=(ro,))
    e5 = refused(["round", mrc, "--session", tmp_path / "S", "--radius-px", RADIUS, "--cache-dir", ro, *FAST], capsys,
                 f"feature cache folder (--cache-dir) {ro} is not writable", absent=(tmp_path / "S",))
    e6 = refused(["benchmark", "--micrographs", mics, "--truth", tmp_path / "t.txt", "--radius-px", RADIUS,
                  "--json", ro / "b.json", "--cache-dir", cache, *FAST], capsys,
                 f"output folder (--json) {ro} is not writable", absent=(ro / "b.json",))
    assert all("permission denied" in e for e in (e1, e2, e3, e4, e5, e6))


def test_feature_cache_checks_its_folder_before_computing(read_only):
    from cryoal_ext.features import FeatureCache
    from cryoal_ext.validate import InputError

    with pytest.raises(InputError, match=f"feature cache folder {read_only} is not writable"):
        FeatureCache(read_only, "resnet16_u32")


# --- merge on damaged per-micrograph files ------------------------------------------------------------
@pytest.fixture
def prediction_folder(tmp_path):
    """A predict output folder (manifest + two micrographs' picks), merged once."""
    from cryoal_ext.extract import Picks
    from cryoal_ext.shard import merge, reconcile_manifest, write_micrograph

    out = tmp_path / "picks"
    reconcile_manifest(out, {"formats": ["star", "txt"]}, [{"name": n, "path": f"/data/{n}.mrc"} for n in ("a", "b")])
    for n in ("a", "b"):
        write_micrograph(out, Picks(n, np.array([10.0, 20.0]), np.array([30.0, 40.0]), np.array([0.9, 0.4])),
                         {"txt", "star"})
    merge(out)
    return out


@pytest.mark.parametrize("damage, say", [
    ("junk", "line 1 is not the header"),
    ("truncated", "line 2 is not 'b<tab>x<tab>y<tab>score' with numbers ('b\\t10.0')"),
    ("no_newline", "truncated (no newline at the end of line 3)"),
    ("binary", "unreadable"),
])
def test_merge_refuses_a_damaged_micrograph_file(damage, say, prediction_folder, capsys):
    f = prediction_folder / "micrographs" / "b_picks.txt"
    text = f.read_text()
    if damage == "junk":
        f.write_text("Lorem ipsum dolor sit amet\nconsectetur 1 2\n")
    elif damage == "truncated":
        f.write_text(text.splitlines()[0] + "\nb\t10.0\n")
    elif damage == "no_newline":
        f.write_text(text.rstrip("\n"))
    else:
        f.write_bytes(b"\xff\xfe\x00junk")
    before = {p: (prediction_folder / p).read_bytes() for p in ("picks.txt", "picks.star", "coordinates.star")}
    refused(["merge", prediction_folder], capsys, f"{f}: {say}", "delete it and run predict again")
    assert {p: (prediction_folder / p).read_bytes() for p in before} == before
