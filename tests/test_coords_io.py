"""Coordinate frames, micrograph reading, Fourier cropping, normalisation and atomic writes."""
from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import mrcfile
import numpy as np
import pytest

from cryoal_ext.atomic import LockedError, atomic_path, folder_lock, write_json, write_text
from cryoal_ext.coords import Frame, from_fraction, inside_border, to_fraction, working_shape
from cryoal_ext.io import (
    MicrographError,
    fourier_crop,
    list_micrographs,
    load_micrograph,
    micrograph_name,
    normalise,
    read_mrc,
)

sys.path.insert(0, os.path.dirname(__file__))  # conftest helpers, under any pytest import mode
from conftest import blob_image, write_mrc  # noqa: E402


# --- coords --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape, ps, wps", [((1023, 777), 1.1, 8.0), ((4096, 4096), 1.0, 8.0),
                                            ((511, 1025), 5.36, 8.0), ((333, 211), 2.0, 7.3)])
def test_frame_round_trip_non_square_odd(shape, ps, wps):
    ws = working_shape(shape, ps, wps)
    assert ws[0] < shape[0] and ws[1] < shape[1]
    f = Frame(original_shape=shape, working_shape=ws, pixel_size=ps)
    rng = np.random.default_rng(0)
    x = rng.uniform(0, shape[1], 500)
    y = rng.uniform(0, shape[0], 500)
    wx, wy = f.to_working(x, y)
    # pure per-axis scale n_work / n_orig
    np.testing.assert_allclose(wx, x * ws[1] / shape[1], rtol=0, atol=1e-9)
    np.testing.assert_allclose(wy, y * ws[0] / shape[0], rtol=0, atol=1e-9)
    bx, by = f.to_original(wx, wy)
    assert np.max(np.abs(bx - x)) < 1e-9 and np.max(np.abs(by - y)) < 1e-9
    # and the other way round
    gx, gy = rng.uniform(0, ws[1], 100), rng.uniform(0, ws[0], 100)
    ox, oy = f.to_original(gx, gy)
    rx, ry = f.to_working(ox, oy)
    assert np.max(np.abs(rx - gx)) < 1e-9 and np.max(np.abs(ry - gy)) < 1e-9


def test_working_shape_and_frame_scales():
    assert working_shape((1024, 1024), 5.36, 8.0) == (686, 686)  # 1024 * 5.36 / 8 = 686.08
    assert working_shape((100, 60), 4.0, 8.0) == (50, 30)
    # never upsamples: a coarser micrograph is used as is
    assert working_shape((100, 60), 10.0, 8.0) == (100, 60)
    f = Frame((100, 60), (50, 20), 4.0)
    assert f.scale_y == 2.0 and f.scale_x == 3.0
    assert f.working_pixel_size == pytest.approx(4.0 * 2.5)
    assert f.radius_to_working(25.0) == pytest.approx(10.0)
    ix, iy = f.to_working_index([-10.0, 4.4, 4.6, 1000.0], [-10.0, 3.0, 5.0, 1000.0])
    assert ix.tolist() == [0, 1, 2, 19] and iy.tolist() == [0, 2, 2, 49]


def test_fourier_crop_moves_a_blob_exactly_as_the_frame_says():
    """A blob at (x, y) of the file appears at Frame.to_working(x, y) after cropping (sample 0 stays put)."""
    shape = (301, 257)
    centres = [(40.3, 60.7), (200.0, 250.5), (128.9, 150.2)]
    sigma, amp = 6.0, 10.0
    img = blob_image(shape, centres, sigma=sigma, amplitude=amp, noise=0.0)
    ws = working_shape(shape, 1.0, 2.6)
    f = Frame(shape, ws, 1.0)
    small = fourier_crop(img, ws).astype(np.float64)
    # the band-limited blob resampled on the coarse grid: same height, centre and width scaled per axis
    yy, xx = np.mgrid[0 : ws[0], 0 : ws[1]]
    expected = np.zeros(ws)
    for x, y in centres:
        ex, ey = f.to_working(x, y)
        expected += amp * np.exp(-((xx - ex) * f.scale_x) ** 2 / (2 * sigma ** 2) - ((yy - ey) * f.scale_y) ** 2 / (2 * sigma ** 2))
    np.testing.assert_allclose(small, expected, atol=1e-3 * amp)
    # half a pixel off (a centre-of-pixel convention) would be far outside that tolerance
    shifted = np.zeros(ws)
    for x, y in centres:
        ex, ey = f.to_working(x + 0.5, y)
        shifted += amp * np.exp(-((xx - ex) * f.scale_x) ** 2 / (2 * sigma ** 2) - ((yy - ey) * f.scale_y) ** 2 / (2 * sigma ** 2))
    assert np.abs(small - shifted).max() > 0.1


@pytest.mark.parametrize("flip_y", [False, True])
def test_fraction_round_trip(flip_y):
    shape = (300, 500)  # ny, nx
    x = np.array([0.0, 125.0, 499.5, 250.0])
    y = np.array([0.0, 75.0, 299.0, 150.0])
    fx, fy = to_fraction(x, y, shape, flip_y=flip_y)
    np.testing.assert_allclose(fx, [0.0, 0.25, 0.999, 0.5])
    expected_fy = np.array([0.0, 0.25, 299.0 / 300.0, 0.5])
    np.testing.assert_allclose(fy, 1.0 - expected_fy if flip_y else expected_fy)
    bx, by = from_fraction(fx, fy, shape, flip_y=flip_y)
    assert np.max(np.abs(bx - x)) < 1e-9 and np.max(np.abs(by - y)) < 1e-9
    # the flag matters: reading flipped fractions without the flag mirrors y
    if flip_y:
        _, wrong = from_fraction(fx, fy, shape, flip_y=False)
        np.testing.assert_allclose(wrong, 300.0 - y)


def test_inside_border():
    shape = (100, 200)  # ny, nx
    x = np.array([20.0, 19.9, 179.9, 180.0, 100.0, 100.0, 100.0, 100.0])
    y = np.array([50.0, 50.0, 50.0, 50.0, 20.0, 19.9, 79.9, 80.0])
    assert inside_border(x, y, shape, 20).tolist() == [True, False, True, False, True, False, True, False]
    assert inside_border(x, y, shape, 0).all()
    # x is tested against nx and y against ny, not the other way round
    assert inside_border([150.0], [50.0], shape, 20).tolist() == [True]
    assert inside_border([50.0], [150.0], shape, 20).tolist() == [False]


# --- reading MRC files ---------------------------------------------------------------------------
@pytest.mark.parametrize("dtype, mode", [(np.float32, 2), (np.float16, 12), (np.int8, 0), (np.int16, 1), (np.uint16, 6)])
def test_read_mrc_modes(tmp_path, dtype, mode):
    rng = np.random.default_rng(3)
    data = rng.normal(size=(40, 56)) * 20 + (200 if dtype == np.uint16 else 0)
    data = data.astype(dtype)
    path = write_mrc(tmp_path / f"m_{np.dtype(dtype).name}.mrc", data, voxel_size=1.37)
    with mrcfile.open(path) as m:
        assert int(m.header.mode) == mode
    img, ps = read_mrc(path)
    assert img.dtype == np.float32 and img.shape == (40, 56)
    np.testing.assert_array_equal(img, data.astype(np.float32))
    assert ps == pytest.approx(1.37, abs=1e-5)


def test_read_mrc_single_section_stack_and_no_pixel_size(tmp_path):
    data = np.random.default_rng(0).normal(size=(1, 30, 40)).astype(np.float32)
    img, ps = read_mrc(write_mrc(tmp_path / "one.mrc", data, voxel_size=None))
    assert img.shape == (30, 40)
    np.testing.assert_array_equal(img, data[0])
    assert ps is None


def test_pixel_size_override_and_missing(tmp_path):
    img = blob_image((120, 90), [(45, 60)], seed=2).astype(np.float32)
    with_header = write_mrc(tmp_path / "hdr.mrc", img, voxel_size=2.0)
    mic = load_micrograph(with_header, working_pixel_size=8.0)
    assert mic.frame.pixel_size == pytest.approx(2.0)
    assert mic.frame.working_shape == (30, 22)  # round(120 / 4), round(90 / 4)
    assert mic.name == "hdr" and mic.image.dtype == np.float32
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        mic = load_micrograph(with_header, working_pixel_size=8.0, pixel_size=4.0)
    assert mic.frame.pixel_size == 4.0 and mic.frame.working_shape == (60, 45)
    assert any("hdr.mrc" in str(w.message) and "differs" in str(w.message) for w in caught)
    with warnings.catch_warnings(record=True) as caught:  # within 2 %: no warning
        warnings.simplefilter("always")
        load_micrograph(with_header, working_pixel_size=8.0, pixel_size=2.01)
    assert not any("differs" in str(w.message) for w in caught)

    no_header = write_mrc(tmp_path / "nohdr.mrc", img, voxel_size=None)
    with pytest.raises(MicrographError, match="nohdr.mrc"):
        load_micrograph(no_header)
    assert load_micrograph(no_header, pixel_size=2.0).frame.working_shape == (30, 22)


def _bad_file(tmp_path: Path, kind: str) -> Path:
    """One unusable micrograph of the given kind."""
    rng = np.random.default_rng(0)
    path = tmp_path / f"{kind}_mic.mrc"
    if kind in ("truncated", "corrupt", "empty"):
        good = write_mrc(tmp_path / "good.mrc", rng.normal(size=(64, 64)).astype(np.float32), 1.0)
        raw = good.read_bytes()
        path.write_bytes({"truncated": raw[: 1024 + 500], "corrupt": rng.bytes(6000), "empty": b""}[kind])
    elif kind == "stack":
        write_mrc(path, rng.normal(size=(3, 32, 32)).astype(np.float32), 1.0)
    elif kind == "constant":
        write_mrc(path, np.full((32, 32), 7.0, np.float32), 1.0)
    elif kind == "nan":
        data = rng.normal(size=(32, 32)).astype(np.float32)
        data[3, 4] = np.nan
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # mrcfile warns about the NaN while writing
            write_mrc(path, data, 1.0)
    elif kind == "tiny":
        write_mrc(path, rng.normal(size=(4, 40)).astype(np.float32), 1.0)
    elif kind == "header_only":
        with mrcfile.new(path, overwrite=True):
            pass
    assert kind == "missing" or path.exists()
    return path


@pytest.mark.parametrize("kind", ["truncated", "corrupt", "empty", "header_only", "stack", "constant", "nan", "tiny",
                                  "missing"])
def test_unusable_micrograph_errors_name_the_file(tmp_path, kind):
    path = _bad_file(tmp_path, kind)
    with pytest.raises(MicrographError) as exc:
        read_mrc(path)
    assert path.name in str(exc.value)
    assert isinstance(exc.value, ValueError)  # the CLI turns ValueErrors into one-line messages
    with pytest.raises(MicrographError, match=path.name):
        load_micrograph(path, pixel_size=1.0)


def test_list_micrographs_and_names(tmp_path):
    write_mrc(tmp_path / "b.mrc", np.ones((8, 8), np.float32))
    write_mrc(tmp_path / "a.MRC", np.ones((8, 8), np.float32))
    (tmp_path / "notes.txt").write_text("x")
    assert [p.name for p in list_micrographs(tmp_path)] == ["a.MRC", "b.mrc"]
    assert micrograph_name("/x/y/mic_001.mrc") == "mic_001"
    assert micrograph_name("stack.mrcs") == "stack"
    assert micrograph_name("odd.name.MRC") == "odd.name"
    with pytest.raises(MicrographError, match="nowhere"):
        list_micrographs(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(MicrographError, match="empty"):
        list_micrographs(tmp_path / "empty")


# --- Fourier cropping and normalisation ----------------------------------------------------------
@pytest.mark.parametrize("shape, out", [((128, 96), (64, 48)), ((101, 77), (40, 31)), ((64, 64), (33, 17))])
def test_fourier_crop_shape_and_mean(shape, out):
    rng = np.random.default_rng(5)
    img = rng.normal(3.7, 2.0, size=shape).astype(np.float32)
    small = fourier_crop(img, out)
    assert small.shape == out and small.dtype == np.float32
    assert float(small.mean()) == pytest.approx(float(img.astype(np.float64).mean()), abs=1e-5)
    # a constant stays that constant
    np.testing.assert_allclose(fourier_crop(np.full(shape, -2.5, np.float32), out), -2.5, atol=1e-5)


def test_fourier_crop_resamples_band_limited_signal_exactly():
    """A low-frequency cosine is resampled on the coarser grid with sample 0 kept in place."""
    ny, nx, my, mx = 90, 120, 45, 50
    y, x = np.mgrid[0:ny, 0:nx]
    img = 1.5 + np.cos(2 * np.pi * (3 * x / nx + 2 * y / ny) + 0.4)
    small = fourier_crop(img, (my, mx))
    v, u = np.mgrid[0:my, 0:mx]
    expected = 1.5 + np.cos(2 * np.pi * (3 * u / mx + 2 * v / my) + 0.4)
    np.testing.assert_allclose(small, expected, atol=1e-5)


def test_fourier_crop_identity_and_upsampling():
    img = np.random.default_rng(0).normal(size=(20, 30)).astype(np.float32)
    same = fourier_crop(img, (20, 30))
    np.testing.assert_array_equal(same, img)
    same[0, 0] = 99.0
    assert img[0, 0] != 99.0  # a copy, not a view
    with pytest.raises(ValueError):
        fourier_crop(img, (40, 30))


def test_normalise_affine_and_gmm():
    rng = np.random.default_rng(7)
    img = rng.normal(12.0, 3.0, size=(200, 160)).astype(np.float32)
    a = normalise(img, "affine")
    assert a.dtype == np.float32
    assert abs(float(a.mean())) < 1e-4 and float(a.std()) == pytest.approx(1.0, abs=1e-4)
    g = normalise(img, "gmm")
    assert abs(float(g.mean())) < 0.05 and float(g.std()) == pytest.approx(1.0, abs=0.05)
    # deterministic
    np.testing.assert_array_equal(g, normalise(img, "gmm"))
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(img, "median")


def test_load_micrograph_is_normalised_at_working_scale(synthetic_micrograph):
    sm = synthetic_micrograph
    mic = load_micrograph(sm.path, working_pixel_size=4.0)
    assert mic.frame.original_shape == sm.shape
    assert mic.frame.working_shape == (75, 105)
    assert abs(float(mic.image.mean())) < 0.3 and 0.5 < float(mic.image.std()) < 2.0
    # the blobs are where the frame puts them
    for x, y in sm.centres:
        ix, iy = mic.frame.to_working_index(x, y)
        patch = mic.image[iy - 4 : iy + 5, ix - 4 : ix + 5]
        py, px = np.unravel_index(np.argmax(patch), patch.shape)
        assert abs(py - 4) <= 1 and abs(px - 4) <= 1  # noise may move the brightest pixel by one
    assert len(mic.digest) == 40


# --- atomic writes -------------------------------------------------------------------------------
def _temps(folder: Path) -> list[Path]:
    return [p for p in folder.iterdir() if ".tmp" in p.name]


def test_atomic_write_replaces_and_leaves_no_temp(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_json(target, {"a": 1})
    assert target.read_text().startswith("{")
    with open(target) as old:  # a reader of the old file keeps seeing the old content
        write_text(target, "new content\n")
        assert old.read() == '{\n  "a": 1\n}\n'
    assert target.read_text() == "new content\n"
    assert _temps(target.parent) == []


def test_atomic_write_failure_keeps_old_file(tmp_path):
    target = tmp_path / "labels.tsv"
    write_text(target, "old\n")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            assert tmp.parent == target.parent and tmp.suffix == ".tsv" and tmp != target
            tmp.write_text("half a fi")
            raise RuntimeError("crash while writing")
    assert target.read_text() == "old\n"
    assert _temps(tmp_path) == []


def test_folder_lock(tmp_path):
    with folder_lock(tmp_path) as lock:
        assert lock.read_text() == str(os.getpid())
        with pytest.raises(LockedError, match=str(os.getpid())):
            with folder_lock(tmp_path):
                pass
    assert not (tmp_path / ".cryoal.lock").exists()
    # a stale lock left by a dead process is taken over
    dead = 2 ** 22 + 12345
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    (tmp_path / ".cryoal.lock").write_text(str(dead))
    with folder_lock(tmp_path):
        pass
    assert not (tmp_path / ".cryoal.lock").exists()
