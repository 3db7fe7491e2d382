"""Shared test helpers: where the data lives, a feature cache, and small synthetic MRC micrographs.

Fixture names are chosen not to clash with the fixtures that individual test modules define for
themselves (``cache_dir``, ``mics``, ``data``, ``model``, ...): a module's own fixture would win
anyway, but distinct names keep the two from being confused.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLE_DIR = REPO_ROOT / "cryoal_ext" / "example_data" / "empiar10028_small"


def shared_data_dir() -> Path | None:
    """The real-data folder: $CRYOAL_TEST_DATA, else ../shared/data beside the repository; None when absent."""
    env = os.environ.get("CRYOAL_TEST_DATA")
    p = Path(env) if env else REPO_ROOT.parent / "shared" / "data"
    if not p.is_dir():
        return None
    if not any((p / d / "particles.txt").exists() for d in ("empiar10028", "empiar10017")):
        return None
    return p


def blob_image(shape: tuple[int, int], centres, sigma: float = 3.0, amplitude: float = 4.0,
               noise: float = 1.0, seed: int = 0, offset: float = 0.0) -> np.ndarray:
    """Gaussian blobs at ``centres`` ((x, y) = (column, row) pixel centres) on Gaussian noise, float64."""
    ny, nx = shape
    rng = np.random.default_rng(seed)
    img = offset + noise * rng.standard_normal((ny, nx))
    yy, xx = np.mgrid[0:ny, 0:nx]
    for x, y in centres:
        img += amplitude * np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2.0 * sigma ** 2))
    return img


def write_mrc(path: str | os.PathLike, data: np.ndarray, voxel_size: float | None = None) -> Path:
    """Write ``data`` as an MRC file (dtype decides the mode); ``voxel_size`` None leaves the header at 0."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with mrcfile.new(path, overwrite=True) as m:
        m.set_data(np.ascontiguousarray(data))
        if voxel_size is not None:
            m.voxel_size = voxel_size
    return path


def relion_project_of(micrographs: Path, root: Path, pixel_size: float = 5.36) -> tuple[Path, Path]:
    """A RELION project at ``root``: the MRCs of ``micrographs`` linked under MotionCorr/job002/Movies and
    a CtfFind/job003/micrographs_ctf.star naming them project-relative.  Returns (project, star)."""
    import pandas as pd

    from cryoal_ext.files import write_star

    mics = sorted(Path(micrographs).glob("*.mrc"))
    movies = root / "MotionCorr" / "job002" / "Movies"
    movies.mkdir(parents=True)
    for m in mics:
        os.symlink(m, movies / m.name)
    star = root / "CtfFind" / "job003" / "micrographs_ctf.star"
    star.parent.mkdir(parents=True)
    optics = pd.DataFrame({"rlnOpticsGroup": [1], "rlnOpticsGroupName": ["opticsGroup1"],
                           "rlnMicrographPixelSize": [pixel_size]})
    table = pd.DataFrame({"rlnMicrographName": [f"MotionCorr/job002/Movies/{m.name}" for m in mics],
                          "rlnOpticsGroup": [1] * len(mics)})
    write_star(star, {"optics": optics, "micrographs": table}, version=50001)
    return root, star


def cryosparc_project_of(micrographs: Path, root: Path) -> tuple[Path, Path]:
    """A cryoSPARC project at ``root``: the MRCs of ``micrographs`` linked under J2/imported and a
    J2/exposures.cs naming them project-relative (cryosparc-tools' Dataset).  Returns (project, cs)."""
    from cryoal_ext.cryosparc.data import exposures_from_files, save_dataset

    imported = root / "J2" / "imported"
    imported.mkdir(parents=True)
    for m in sorted(Path(micrographs).glob("*.mrc")):
        os.symlink(m, imported / m.name)
    cs = save_dataset(root / "J2" / "exposures.cs", exposures_from_files(sorted(imported.glob("*.mrc")), root))
    return root, cs


@dataclass
class SyntheticMicrograph:
    path: Path
    shape: tuple[int, int]  # (ny, nx)
    centres: np.ndarray  # (n, 2) x, y in pixels of the file
    pixel_size: float
    sigma: float


@pytest.fixture(scope="session")
def perturbed_head():
    """A BLR a little off Topaz's own head: prediction tests that must not depend on the head being Topaz's."""
    from cryoal_ext.features import head_of
    from cryoal_ext.model import BLR

    m = BLR()
    w0, b0 = head_of("resnet16_u32")
    m.coef_, m.intercept_ = w0 + 0.05 * np.random.default_rng(0).standard_normal(w0.size), b0 - 0.3
    return m


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real-data folder; the test is skipped when it is not there."""
    p = shared_data_dir()
    if p is None:
        pytest.skip("real data not found (set CRYOAL_TEST_DATA or provide ../shared/data)")
    return p


@pytest.fixture(scope="session")
def example_data() -> Path:
    """The bundled example (three 512 x 512 EMPIAR-10028 crops, float16, 5.36 A/px)."""
    return EXAMPLE_DIR


@pytest.fixture(scope="session")
def feature_cache(tmp_path_factory) -> str:
    """A feature cache reused across tests: $CRYOAL_TEST_CACHE or $CRYOAL_CACHE when set, else a session tmp folder."""
    env = os.environ.get("CRYOAL_TEST_CACHE") or os.environ.get("CRYOAL_CACHE")
    return env or str(tmp_path_factory.mktemp("feature_cache"))


@pytest.fixture
def make_mrc(tmp_path):
    """Factory: ``make_mrc(name, data, voxel_size=...)`` writes an MRC under tmp_path and returns its path."""

    def make(name: str, data: np.ndarray, voxel_size: float | None = 1.0) -> Path:
        return write_mrc(tmp_path / name, data, voxel_size)

    return make


@pytest.fixture
def synthetic_micrograph(tmp_path) -> SyntheticMicrograph:
    """A non-square float32 micrograph (ny=150, nx=210, 2 A/px) with 6 bright Gaussian blobs at known centres."""
    shape = (150, 210)
    centres = np.array([[30.0, 30.0], [100.0, 40.0], [170.0, 35.0], [50.0, 110.0], [120.0, 100.0], [180.0, 120.0]])
    img = blob_image(shape, centres, sigma=3.0, amplitude=5.0, noise=0.5, seed=1).astype(np.float32)
    path = write_mrc(tmp_path / "synthetic_mic.mrc", img, voxel_size=2.0)
    return SyntheticMicrograph(path, shape, centres, 2.0, 3.0)


@pytest.fixture
def single_torch_thread():
    """The test box has 2 shared cores; torch's default thread pool oversubscribes them badly."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
