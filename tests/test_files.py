"""Coordinate files: Topaz txt and RELION STAR written by us and read back; clear errors on bad files."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryoal_ext.extract import Picks
from cryoal_ext.files import (
    CoordinateFileError,
    by_micrograph,
    picks_frame,
    read_coordinates,
    write_picks_star,
    write_star,
    write_topaz,
)


def _picks():
    rng = np.random.default_rng(0)
    a = Picks("mic_a", rng.uniform(0, 1000, 7).round(1), rng.uniform(0, 700, 7).round(1), rng.uniform(0, 1, 7))
    b = Picks("0042", np.array([5.0, 900.25]), np.array([6.0, 10.75]), np.array([0.1, 0.95]))
    return [a, b]


def test_topaz_txt_round_trip(tmp_path):
    picks = _picks()
    path = tmp_path / "picks.txt"
    write_topaz(path, picks)
    assert path.read_text().splitlines()[0] == "image_name\tx_coord\ty_coord\tscore"
    t = read_coordinates(path)
    assert list(t.columns) == ["image_name", "x", "y", "score"]
    assert len(t) == 9
    assert t["image_name"].tolist().count("0042") == 2  # a numeric-looking name stays a string
    for p in picks:
        rows = t[t["image_name"] == p.name]
        order = np.argsort(-p.score, kind="stable")
        assert np.all(np.diff(rows["score"].to_numpy()) <= 0)  # written best first
        np.testing.assert_allclose(rows["x"], p.x[order], atol=0.05 + 1e-9)  # one decimal
        np.testing.assert_allclose(rows["y"], p.y[order], atol=0.05 + 1e-9)
        np.testing.assert_allclose(rows["score"], p.score[order], atol=5e-7)
    g = by_micrograph(t)
    assert set(g) == {"mic_a", "0042"}
    assert sorted(g["0042"][0].tolist()) == pytest.approx([5.0, 900.2], abs=0.06)
    assert [p.name for p in tmp_path.iterdir()] == ["picks.txt"]


def test_topaz_txt_without_score_and_space_separated(tmp_path):
    path = tmp_path / "truth.txt"
    path.write_text("image_name x_coord y_coord\nm1 10 20\nm1  30.5   40\nm2\t1\t2\n")
    t = read_coordinates(path)
    assert "score" not in t.columns
    assert t.values.tolist() == [["m1", 10.0, 20.0], ["m1", 30.5, 40.0], ["m2", 1.0, 2.0]]


def test_star_round_trip_with_micrograph_names(tmp_path):
    picks = _picks()
    frames = []
    for p in picks:
        f = picks_frame(p)
        f.insert(0, "rlnMicrographName", f"MotionCorr/job002/Movies/{p.name}.mrc")
        frames.append(f)
    path = tmp_path / "coords.star"
    write_star(path, {"particles": pd.concat(frames, ignore_index=True)})
    text = path.read_text()
    assert "# version 30001" in text and "data_particles" in text and "_rlnCoordinateX" in text
    t = read_coordinates(path)
    assert list(t.columns) == ["image_name", "x", "y", "score"]
    assert t["image_name"].tolist() == ["mic_a"] * 7 + ["0042"] * 2  # paths reduced to file stems
    np.testing.assert_allclose(t["x"], np.concatenate([p.x for p in picks]), atol=0.005)
    np.testing.assert_allclose(t["y"], np.concatenate([p.y for p in picks]), atol=0.005)
    np.testing.assert_allclose(t["score"], np.concatenate([p.score for p in picks]), atol=5e-7)


def test_per_micrograph_star_and_version_line(tmp_path):
    p = _picks()[1]
    path = tmp_path / "0042_autopick.star"
    write_picks_star(path, p)
    text = path.read_text()
    assert text.lstrip().startswith("# version 30001")
    assert "_rlnAutopickFigureOfMerit" in text and "_rlnCoordinateY" in text
    import starfile

    df = starfile.read(path, always_dict=True)
    table = next(iter(df.values()))
    np.testing.assert_allclose(table["rlnCoordinateX"], p.x)
    np.testing.assert_allclose(table["rlnCoordinateY"], p.y)
    np.testing.assert_allclose(table["rlnAutopickFigureOfMerit"], p.score)
    write_picks_star(tmp_path / "noversion.star", p, version=None)
    assert "# version" not in (tmp_path / "noversion.star").read_text()
    # a per-micrograph file has no micrograph names: read_coordinates says so instead of guessing
    with pytest.raises(CoordinateFileError, match="0042_autopick.star.*rlnMicrographName"):
        read_coordinates(path)


@pytest.mark.parametrize("kind", ["missing", "empty", "no_columns", "garbage_star", "star_no_coordinates", "binary"])
def test_bad_coordinate_files_name_the_file(tmp_path, kind):
    suffix = ".star" if "star" in kind else ".txt"
    path = tmp_path / f"bad_{kind}{suffix}"
    if kind == "empty":
        path.write_text("")
    elif kind == "no_columns":
        path.write_text("name x y\nm 1 2\n")
    elif kind == "garbage_star":
        path.write_text("data_\nloop_\n_rlnCoordinateX #1\n_rlnCoordinateY #2\n1.0\n")
    elif kind == "star_no_coordinates":
        path.write_text("data_\nloop_\n_rlnMicrographName #1\n_rlnDefocusU #2\nm.mrc 10000\n")
    elif kind == "binary":
        path.write_bytes(np.random.default_rng(0).bytes(3000))
    with pytest.raises(CoordinateFileError) as exc:
        read_coordinates(path)
    assert path.name in str(exc.value)
    assert isinstance(exc.value, ValueError)  # the CLI prints ValueErrors as one-line messages
    if kind == "no_columns":
        assert "x_coord" in str(exc.value)


@pytest.mark.parametrize("body, column", [("m1 abc 20\n", "x_coord"), ("m1 10\n", "y_coord"),
                                          ("m1 10 20 high\n", "score")])
def test_non_numeric_or_missing_values_name_the_file(tmp_path, body, column):
    header = "image_name x_coord y_coord score\n" if column == "score" else "image_name x_coord y_coord\n"
    path = tmp_path / "holes.txt"
    path.write_text(header + "m0 1 2" + (" 0.5" if column == "score" else "") + "\n" + body)
    with pytest.raises(CoordinateFileError, match=f"holes.txt: {column} of data row 2"):
        read_coordinates(path)
    star = tmp_path / "holes.star"
    star.write_text("data_\nloop_\n_rlnMicrographName #1\n_rlnCoordinateX #2\n_rlnCoordinateY #3\n"
                    "a.mrc 1.0 2.0\nb.mrc 3.0 nope\n")
    with pytest.raises(CoordinateFileError, match="holes.star: rlnCoordinateY of data row 2"):
        read_coordinates(star)
