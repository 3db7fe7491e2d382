"""cryoSPARC data layer on real .cs files written and read by cryosparc-tools' Dataset (no features, fast)."""
from __future__ import annotations

import os
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest

pytest.importorskip("cryosparc.dataset")
from cryosparc.dataset import Dataset  # noqa: E402

from cryoal_ext.cryosparc import data as csd  # noqa: E402
from cryoal_ext.acquisition import Proposal  # noqa: E402
from cryoal_ext.cryosparc.job import LabelInput, Reporter, RoundSettings, import_labels  # noqa: E402
from cryoal_ext.session import Session  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "cryoal_ext" / "example_data" / "empiar10028_small"


def shared_data() -> Path | None:
    p = Path(os.environ.get("CRYOAL_TEST_DATA", REPO.parent / "shared" / "data"))
    return p if (p / "empiar10028" / "particles.txt").exists() else None


def truth(folder: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    t = pd.read_csv(folder / "particles.txt", sep="\t", dtype={"image_name": str})
    return {n: (g["x_coord"].to_numpy(float), g["y_coord"].to_numpy(float)) for n, g in t.groupby("image_name")}


def make_project(tmp: Path, micrographs: list[Path], job: str = "J2") -> tuple[Path, Path]:
    """A cryoSPARC-like project folder: <proj>/J2/motioncorrected/*.mrc and <proj>/J2/exposures.cs."""
    proj = tmp / "proj"
    d = proj / job / "motioncorrected"
    d.mkdir(parents=True, exist_ok=True)
    for m in micrographs:
        target = d / m.name
        if not target.exists():
            os.symlink(m, target)
    dset = csd.exposures_from_files(sorted(d.glob("*.mrc")), proj)
    cs = proj / job / "exposures.cs"
    csd.save_dataset(cs, dset)
    return proj, cs


def non_square_crop(src: Path, dst: Path, y0: int, x0: int, ny: int, nx: int) -> None:
    """A real micrograph cropped to ny != nx, so [ny, nx] mistakes cannot hide."""
    with mrcfile.open(src, permissive=True) as m:
        data = np.asarray(m.data)[y0 : y0 + ny, x0 : x0 + nx].astype(np.float32)
        vs = float(m.voxel_size.x)
    with mrcfile.new(dst, overwrite=True) as m:
        m.set_data(data)
        m.voxel_size = vs


# --- files ---------------------------------------------------------------------------------------
def test_exposures_cs_round_trip_plain_numpy(tmp_path):
    proj, cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    raw = np.load(cs, allow_pickle=False)  # NUMPY format: a plain structured array, no pickle
    assert "micrograph_blob/path" in raw.dtype.names
    assert not [p for p in cs.parent.iterdir() if p.name.startswith(".")]  # atomic write left no temp file
    specs = csd.exposures_to_specs(csd.load_dataset(cs), proj, "exposures.cs")
    assert [s.name for s in specs] == ["061_10028_crop", "311_10028_crop", "312_10028_crop"]
    for s in specs:
        assert s.extra["shape"] == (512, 512)
        assert s.pixel_size == pytest.approx(5.36, abs=1e-3)
        assert s.extra["cs_path"].startswith("J2/motioncorrected/")
        assert Path(s.path).exists() and s.extra["exp_group_id"] == 1
    ds = csd.load_dataset(cs)
    assert {s.extra["uid"] for s in specs} == set(int(u) for u in ds["uid"])


def test_clear_errors(tmp_path):
    proj, cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    ds = csd.load_dataset(cs)
    with pytest.raises(csd.CryoSPARCDataError, match=r"exposure file not found: .*elsewhere.*uid"):
        csd.exposures_to_specs(ds, tmp_path / "elsewhere", "exposures.cs")
    no_ps = Dataset({f: ds[f] for f in ds.fields() if f != "micrograph_blob/psize_A"})
    with pytest.raises(csd.CryoSPARCDataError, match="pixel size missing"):
        csd.exposures_to_specs(no_ps, proj, "x.cs")
    assert csd.exposures_to_specs(no_ps, proj, "x.cs", pixel_size=5.0)[0].pixel_size == 5.0
    zero = ds.copy()
    zero["micrograph_blob/psize_A"] = 0
    with pytest.raises(csd.CryoSPARCDataError, match="pixel size missing.*psize_A = 0"):
        csd.exposures_to_specs(zero, proj, "x.cs")
    no_shape = Dataset({f: ds[f] for f in ds.fields() if f != "micrograph_blob/shape"})
    with pytest.raises(csd.CryoSPARCDataError, match=r"x.cs: exposures lack field\(s\) micrograph_blob/shape"):
        csd.exposures_to_specs(no_shape, proj, "x.cs")
    with pytest.raises(csd.CryoSPARCDataError, match="file not found"):
        csd.load_dataset(tmp_path / "nope.cs", "exposures")
    bad = tmp_path / "bad.cs"
    bad.write_text("not a dataset")
    with pytest.raises(csd.CryoSPARCDataError, match="bad.cs: not a readable"):
        csd.load_dataset(bad)
    parts = csd.picks_to_dataset([], 10.0)
    assert len(parts) == 0 and "pick_stats/ncc_score" in parts.fields()
    with pytest.raises(csd.CryoSPARCDataError, match="lack field"):
        csd.particles_to_coordinates(Dataset({"uid": np.arange(3, dtype=np.uint64)}), [], "p.cs")


# --- coordinates ---------------------------------------------------------------------------------
def _roundtrip(tmp_path, mics: list[Path], tr: dict, flip_y: bool = False):
    proj, cs = make_project(tmp_path, mics)
    specs = csd.exposures_to_specs(csd.load_dataset(cs), proj)
    rows = [csd.PickRows(s, *tr[s.name], np.linspace(1, 0, tr[s.name][0].size)) for s in specs if s.name in tr]
    out = tmp_path / "particles.cs"
    csd.save_dataset(out, csd.picks_to_dataset(rows, 28.0, flip_y=flip_y, with_psize=True))
    back = csd.load_dataset(out)
    pc = csd.particles_to_coordinates(back, specs, flip_y=flip_y)
    return specs, rows, back, pc


@pytest.mark.parametrize("flip_y", [False, True])
def test_fraction_round_trip_non_square_real_micrograph(tmp_path, flip_y):
    src = sorted((EXAMPLE / "micrographs").glob("*.mrc"))[0]
    crop = tmp_path / "mics" / "061_rect.mrc"
    crop.parent.mkdir()
    y0, x0, ny, nx = 40, 0, 300, 512
    non_square_crop(src, crop, y0, x0, ny, nx)
    tx, ty = truth(EXAMPLE)["061_10028_crop"]
    keep = (ty >= y0) & (ty < y0 + ny) & (tx >= x0) & (tx < x0 + nx)
    tx, ty = tx[keep] - x0, ty[keep] - y0
    specs, rows, back, pc = _roundtrip(tmp_path, [crop], {"061_rect": (tx, ty)}, flip_y)
    assert specs[0].extra["shape"] == (300, 512)  # micrograph_blob/shape is [ny, nx]
    assert np.all(back["location/micrograph_shape"] == [300, 512])
    fx, fy = back["location/center_x_frac"], back["location/center_y_frac"]
    np.testing.assert_allclose(fx, tx / 512, atol=1e-6)
    np.testing.assert_allclose(fy, (1 - ty / 300) if flip_y else ty / 300, atol=1e-6)
    x, y = pc.by_name["061_rect"]
    assert np.max(np.abs(x - tx)) < 0.5 and np.max(np.abs(y - ty)) < 0.5
    # the fractions index the dark particle centres of the very array cryoSPARC points at
    with mrcfile.open(crop) as m:
        img = np.asarray(m.data, dtype=np.float32)
    cx = np.clip(np.rint(fx * 512).astype(int), 0, 511)
    cy = np.clip(np.rint(((1 - fy) if flip_y else fy) * 300).astype(int), 0, 299)
    assert img[cy, cx].mean() < img.mean()  # particles are dark in EMPIAR-10028


@pytest.mark.realdata
def test_fraction_round_trip_shared_data_both_sets(tmp_path):
    data = shared_data()
    if data is None:
        pytest.skip("shared data not found (set CRYOAL_TEST_DATA)")
    worst = 0.0
    for ds_name, psize in (("empiar10028", 5.36), ("empiar10017", 7.08)):
        mics = sorted((data / ds_name / "micrographs").glob("*.mrc"))
        tr = truth(data / ds_name)
        specs, rows, back, pc = _roundtrip(tmp_path / ds_name, mics, tr)
        assert len(back) == sum(v[0].size for v in tr.values())
        assert back["location/micrograph_psize_A"][0] == pytest.approx(psize, abs=1e-3)
        assert back["location/min_dist_A"][0] == pytest.approx(28 * psize, rel=1e-4)
        np.testing.assert_array_equal(back["pick_stats/ncc_score"], back["pick_stats/power"])
        for s in specs:
            x, y = pc.by_name[s.name]
            worst = max(worst, np.max(np.abs(x - tr[s.name][0])), np.max(np.abs(y - tr[s.name][1])))
            # uid linkage: every row on this micrograph carries its uid and path
            sel = back["location/micrograph_uid"] == s.extra["uid"]
            assert set(back["location/micrograph_path"][sel]) == {s.extra["cs_path"]}
    assert worst < 0.5


def test_uid_linkage_shuffled_and_foreign_particles(tmp_path):
    proj, cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    specs = csd.exposures_to_specs(csd.load_dataset(cs), proj)
    tr = truth(EXAMPLE)
    rows = [csd.PickRows(s, *tr[s.name], np.full(tr[s.name][0].size, 0.5)) for s in specs]
    dset = csd.picks_to_dataset(rows, 28.0)
    order = np.random.default_rng(0).permutation(len(dset))
    shuffled = dset.take(order)
    foreign = csd.picks_to_dataset([csd.PickRows(specs[0], np.array([10.0]), np.array([20.0]), np.array([0.9]))], 28.0)
    foreign["location/micrograph_uid"] = 12345  # a micrograph not among the exposures
    mixed = Dataset.append(shuffled, foreign)
    csd.save_dataset(tmp_path / "mixed.cs", mixed)
    pc = csd.particles_to_coordinates(csd.load_dataset(tmp_path / "mixed.cs"), specs)
    assert pc.unmatched == 1 and pc.count == len(dset)
    for s in specs:
        x, y = pc.by_name[s.name]
        got = sorted(zip(np.round(x, 1), np.round(y, 1)))
        assert got == sorted(zip(np.round(tr[s.name][0], 1), np.round(tr[s.name][1], 1)))
    with pytest.raises(csd.CryoSPARCDataError, match="none of its 1 particles lie on the given exposures"):
        csd.particles_to_coordinates(foreign, specs, "foreign.cs")
    labels, unmatched = csd.particles_to_labels(mixed, specs, 0, 3, "neg")
    assert unmatched == 1 and len(labels) == len(dset) and all(l.label == 0 and l.round == 3 for l in labels)


def test_copy_into_server_allocated_output():
    spec = csd.MicrographSpec("a.mrc", "a", 1.0, {"uid": 7, "cs_path": "J1/a.mrc", "shape": (100, 200),
                                                 "psize_A": 1.5, "exp_group_id": 2})
    src = csd.picks_to_dataset([csd.PickRows(spec, np.array([50.0, 20.0]), np.array([10.0, 90.0]),
                                             np.array([0.25, 1.0]))], 10.0)
    fields = [f for f in csd.particle_fields() if f[0] != "location/min_dist_A"]  # an older server
    target = Dataset({"uid": src["uid"]}).add_fields(fields)
    skipped = csd.copy_into(target, src)
    assert skipped == ["location/min_dist_A"]
    np.testing.assert_allclose(target["location/center_x_frac"], [0.25, 0.1])
    np.testing.assert_allclose(target["location/center_y_frac"], [0.1, 0.9])
    assert list(target["location/exp_group_id"]) == [2, 2] and list(target["uid"]) == list(src["uid"])


# --- reviewed queries -> labels ------------------------------------------------------------------
def manual_picker_edit(queries, specs, keep_mask, added: dict[str, list[tuple[float, float]]]):
    """What Manual Picker hands back: the kept rows (same uids) plus new rows with new uids."""
    kept = queries.mask(np.asarray(keep_mask, bool))
    by_name = {s.name: s for s in specs}
    rows = [csd.PickRows(by_name[n], np.array([p[0] for p in pts]), np.array([p[1] for p in pts]),
                         np.zeros(len(pts))) for n, pts in added.items()]
    new = csd.picks_to_dataset(rows, 28.0)
    return Dataset.append(kept, new)


def test_reviewed_queries_become_labels_with_uid_check(tmp_path):
    proj, cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    specs = csd.exposures_to_specs(csd.load_dataset(cs), proj)
    names = [s.name for s in specs]
    sess = Session(tmp_path / "session")
    props = [Proposal(names[0], 100.0, 100.0, 0.5, "uncertain"), Proposal(names[0], 300.0, 200.0, 0.4, "uncertain"),
             Proposal(names[1], 50.0, 400.0, 0.6, "uncertain"), Proposal(names[1], 450.0, 60.0, 0.3, "uncertain")]
    sess.save_proposals(0, props)
    queries = csd.picks_to_dataset(csd.proposals_to_rows(props, specs), 28.0)
    csd.save_dataset(sess.folder / "cryosparc" / "round_000" / "queries.cs", queries)
    sess.save_state(round=1)
    # drop the second proposal on each micrograph, move none, add one new pick on names[1]
    edited = manual_picker_edit(queries, specs, [True, False, True, False], {names[1]: [(250.0, 250.0)]})
    csd.save_dataset(tmp_path / "edited.cs", edited)
    ed = csd.load_dataset(tmp_path / "edited.cs")
    assert len(set(ed["uid"]) & set(queries["uid"])) == 2  # kept rows keep their uids
    s = RoundSettings(radius_px=28.0)
    added, counts = import_labels(sess, specs, [LabelInput(ed, "edited.cs", "reviewed")], s, Reporter())
    labs = {(l.micrograph, round(l.x), round(l.y)): l.label for l in sess.labels.labels}
    assert added == 5
    assert labs == {(names[0], 100, 100): 1, (names[0], 300, 200): 0, (names[1], 50, 400): 1,
                    (names[1], 450, 60): 0, (names[1], 250, 250): 1}
    assert counts["edited.cs"]["uids_shared"] == 2
    # importing the same review again adds nothing (labels are append-only, duplicates skipped)
    assert import_labels(sess, specs, [LabelInput(ed, "edited.cs", "reviewed")], s, Reporter())[0] == 0
    # a review of round 0's queries offered when the session is at round 2 is refused
    sess.save_proposals(1, props[:1])
    csd.save_dataset(sess.folder / "cryosparc" / "round_001" / "queries.cs", csd.picks_to_dataset(
        csd.proposals_to_rows(props[:1], specs), 28.0))
    sess.save_state(round=2)
    with pytest.raises(ValueError, match="queries of round 0.*round 1"):
        import_labels(sess, specs, [LabelInput(ed, "edited.cs", "reviewed")], s, Reporter())
    assert len(sess.labels) == 5  # nothing lost, nothing added


def test_reviewed_before_any_round_is_an_error(tmp_path):
    proj, cs = make_project(tmp_path, sorted((EXAMPLE / "micrographs").glob("*.mrc")))
    specs = csd.exposures_to_specs(csd.load_dataset(cs), proj)
    with pytest.raises(ValueError, match="has not shown any queries"):
        import_labels(Session(tmp_path / "s"), specs, [LabelInput(csd.picks_to_dataset([], 1.0), "r.cs", "reviewed")],
                      RoundSettings(radius_px=28.0), Reporter())
