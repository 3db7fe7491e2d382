"""cryoSPARC ``.cs`` data, offline: exposures -> micrographs, particles <-> labels and picks.

Only data transformations live here (no connection to a cryoSPARC instance), so the same code
serves the live external job and the offline mode that reads and writes ``.cs`` files on any
node.  Datasets are ``cryosparc.dataset.Dataset``; ``.cs`` files are written in cryosparc-tools'
NUMPY format (a plain ``.npy`` structured array, loaded without pickle) and atomically.

Conventions (see ``coords.py``): ``micrograph_blob/shape`` and ``location/micrograph_shape``
are ``[ny, nx]``; ``center_x_frac = x / nx``, ``center_y_frac = y / ny`` in the array frame of
the exact file ``micrograph_blob/path`` names, no flip unless ``flip_y`` is asked for.
"""
from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from ..acquisition import Proposal
from ..atomic import atomic_path
from ..coords import from_fraction, outside, to_fraction
from ..io import micrograph_name
from ..labels import Label
from ..session import Edited
from ..validate import PIXEL_SIZE_RANGE
from ..workflow import MicrographSpec

# fields of a particle output, as cryoSPARC's pickers and Extract From Micrographs have them
LOCATION_FIELDS: list[tuple] = [
    ("location/micrograph_uid", "<u8"),
    ("location/exp_group_id", "<u4"),
    ("location/micrograph_path", "O"),
    ("location/micrograph_shape", "<u4", (2,)),
    ("location/center_x_frac", "<f4"),
    ("location/center_y_frac", "<f4"),
    ("location/min_dist_A", "<f4"),
]
PSIZE_FIELD: tuple = ("location/micrograph_psize_A", "<f4")
PICK_STATS_FIELDS: list[tuple] = [
    ("pick_stats/ncc_score", "<f4"),
    ("pick_stats/power", "<f4"),
    ("pick_stats/template_idx", "<u4"),
    ("pick_stats/angle_rad", "<f4"),
]
EXPOSURE_REQUIRED = ("uid", "micrograph_blob/path", "micrograph_blob/shape")
PARTICLE_REQUIRED = ("location/micrograph_uid", "location/center_x_frac", "location/center_y_frac")
EXP_GROUP_FIELDS = ("mscope_params/exp_group_id", "ctf/exp_group_id", "micrograph_blob/exp_group_id")


class CryoSPARCDataError(ValueError):
    """A .cs dataset that cannot be used, with the file (or job output) named in the message."""


def _dataset_class():
    from cryosparc.dataset import Dataset

    return Dataset


# --- files --------------------------------------------------------------------------------------
def load_dataset(path: str | os.PathLike, what: str = "dataset"):
    """Read a ``.cs`` file (NUMPY or CSDAT format); a clear error names the file when it cannot."""
    path = Path(path)
    if not path.exists():
        raise CryoSPARCDataError(f"{what} file not found: {path}")
    try:
        return _dataset_class().load(str(path))
    except Exception as exc:  # cryosparc-tools raises several types for foreign or truncated files
        raise CryoSPARCDataError(f"{path}: not a readable cryoSPARC .cs file ({exc})") from exc


def save_dataset(path: str | os.PathLike, dset) -> Path:
    """Write ``dset`` as a ``.cs`` file atomically, in the plain numpy format (no pickle, readable by np.load)."""
    from cryosparc.dataset import NUMPY_FORMAT

    path = Path(path)
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            dset.save(f, format=NUMPY_FORMAT)
    return path


def uids_of(path: str | os.PathLike) -> np.ndarray:
    """Just the ``uid`` column of a ``.cs`` file (for linking a reviewed output to the queries shown)."""
    try:
        return np.asarray(_dataset_class().load(str(path), fields=["uid"])["uid"], dtype=np.uint64)
    except Exception as exc:
        raise CryoSPARCDataError(f"{path}: cannot read uids ({exc})") from exc


# --- exposures ----------------------------------------------------------------------------------
def _require(dset, fields: Sequence[str], source: str, what: str) -> None:
    have = set(dset.fields())
    missing = [f for f in fields if f not in have]
    if missing:
        slots = sorted({m.split("/")[0] for m in missing if "/" in m})
        hint = f" (slot{'s' if len(slots) > 1 else ''} {', '.join(slots)} missing?)" if slots else ""
        raise CryoSPARCDataError(f"{source}: {what} lack field(s) {', '.join(missing)}{hint}")


def _text(value) -> str:
    return value.decode() if isinstance(value, (bytes, np.bytes_)) else str(value)


def resolve_path(path: str, project_dir: str | os.PathLike | None) -> str:
    """A ``micrograph_blob/path`` (project-relative, as cryoSPARC stores it) as a path on this node."""
    if os.path.isabs(path) or not project_dir:
        return path
    return os.path.join(str(project_dir), path)


def exposures_to_specs(dset, project_dir: str | os.PathLike | None, source: str = "exposures",
                       pixel_size: float | None = None, check_files: bool = True) -> list[MicrographSpec]:
    """One MicrographSpec per exposure, with cryoSPARC's own fields kept in ``extra``.

    ``extra``: ``uid`` (int), ``cs_path`` (``micrograph_blob/path`` as stored), ``shape`` ([ny, nx]
    from ``micrograph_blob/shape``), ``psize_A``, ``exp_group_id``.  The pixel size comes from
    ``micrograph_blob/psize_A``; ``pixel_size`` is only a fallback for datasets without one.
    Names are file stems (stable from round to round); a stem shared by two exposures gets
    the uid appended.
    """
    _require(dset, EXPOSURE_REQUIRED, source, "exposures")
    n = len(dset)
    if n == 0:
        raise CryoSPARCDataError(f"{source}: no exposures")
    fields = set(dset.fields())
    uids = np.asarray(dset["uid"], dtype=np.uint64)
    paths = [_text(p) for p in dset["micrograph_blob/path"]]
    shapes = np.asarray(dset["micrograph_blob/shape"]).reshape(n, -1)
    if "micrograph_blob/psize_A" in fields:
        psizes = np.asarray(dset["micrograph_blob/psize_A"], dtype=float)
    else:
        psizes = np.zeros(n)
    group_field = next((f for f in EXP_GROUP_FIELDS if f in fields), None)
    groups = np.asarray(dset[group_field], dtype=np.uint32) if group_field else np.zeros(n, np.uint32)

    bad_ps = np.flatnonzero(~(psizes > 0))
    if bad_ps.size and not pixel_size:
        i = int(bad_ps[0])
        where = "no field micrograph_blob/psize_A" if "micrograph_blob/psize_A" not in fields else \
            (f"micrograph_blob/psize_A = {psizes[i]:g} for {bad_ps.size} exposure(s), "
             f"e.g. uid {int(uids[i])} ({paths[i]})")
        raise CryoSPARCDataError(f"{source}: pixel size missing ({where}); give --pixel-size to use one for all")
    bad_shape = [i for i in range(n) if shapes[i].size != 2 or min(shapes[i]) <= 0]
    if bad_shape:
        i = bad_shape[0]
        raise CryoSPARCDataError(f"{source}: micrograph_blob/shape {shapes[i].tolist()} is not [ny, nx] "
                                 f"for uid {int(uids[i])} ({paths[i]})")
    lo, hi = PIXEL_SIZE_RANGE
    odd = np.flatnonzero((psizes > 0) & ~((psizes >= lo) & (psizes <= hi)))
    if odd.size:
        i = int(odd[0])
        raise CryoSPARCDataError(f"{source}: micrograph_blob/psize_A = {psizes[i]:g} A/px is outside the plausible "
                                 f"{lo:g}-{hi:g} A/px for {odd.size} exposure(s), e.g. uid {int(uids[i])} ({paths[i]}); "
                                 "import the exposures again with the right pixel size")
    dup = [u for u, c in Counter(uids.tolist()).items() if c > 1]
    if dup:
        raise CryoSPARCDataError(f"{source}: exposure uid {dup[0]} appears more than once")
    if check_files:
        missing = [i for i in range(n) if not os.path.exists(resolve_path(paths[i], project_dir))]
        if missing:
            i = missing[0]
            raise CryoSPARCDataError(
                f"{source}: exposure file not found: {resolve_path(paths[i], project_dir)} "
                f"(micrograph_blob/path {paths[i]!r} of uid {int(uids[i])}, project dir {project_dir or '(none)'}); "
                f"{len(missing)} of {n} missing. Give --project-dir as this node sees the cryoSPARC project.")

    stems = [micrograph_name(p) for p in paths]
    counts = Counter(stems)
    specs = []
    for i in range(n):
        name = stems[i] if counts[stems[i]] == 1 else f"{stems[i]}_{int(uids[i])}"
        ps = float(psizes[i]) if psizes[i] > 0 else float(pixel_size)
        specs.append(MicrographSpec(
            path=resolve_path(paths[i], project_dir), name=name, pixel_size=ps,
            extra={"uid": int(uids[i]), "cs_path": paths[i], "shape": (int(shapes[i][0]), int(shapes[i][1])),
                   "psize_A": ps, "exp_group_id": int(groups[i])}))
    return specs


def exposures_from_files(files: Sequence[str | os.PathLike], project_dir: str | os.PathLike | None = None,
                         pixel_size: float | None = None, exp_group_id: int = 1, uids: Sequence[int] | None = None):
    """An exposures Dataset for plain MRC files, laid out as cryoSPARC's (``micrograph_blob/*``,
    ``mscope_params/exp_group_id``): for running offline on micrographs no cryoSPARC job made,
    and for tests.  Paths are stored relative to ``project_dir`` when inside it; shape and pixel
    size come from each MRC header (``pixel_size`` overrides)."""
    import mrcfile

    Dataset = _dataset_class()
    n = len(files)
    dset = Dataset.allocate(n, [("micrograph_blob/path", "O"), ("micrograph_blob/idx", "<u4"),
                                ("micrograph_blob/shape", "<u4", (2,)), ("micrograph_blob/psize_A", "<f4"),
                                ("micrograph_blob/format", "O"), ("mscope_params/exp_group_id", "<u4")])
    if uids is not None:
        dset["uid"] = np.asarray(uids, dtype=np.uint64)
    paths, shapes, psizes = [], [], []
    for f in files:
        f = Path(f)
        if not f.exists():
            raise CryoSPARCDataError(f"micrograph not found: {f}")
        with mrcfile.open(str(f), mode="r", header_only=True, permissive=True) as mrc:
            h = mrc.header
            shapes.append((int(h.ny), int(h.nx)))
            vs = float(mrc.voxel_size.x)
        ps = pixel_size or vs
        if not ps or ps <= 0:
            raise CryoSPARCDataError(f"{f}: no pixel size in the MRC header; give pixel_size")
        psizes.append(ps)
        rel = os.path.relpath(os.path.abspath(f), os.path.abspath(project_dir)) if project_dir else str(f)
        paths.append(str(f) if rel.startswith("..") else rel)
    dset["micrograph_blob/path"] = np.array(paths, dtype=object)
    dset["micrograph_blob/shape"] = np.array(shapes, dtype=np.uint32).reshape(n, 2)
    dset["micrograph_blob/psize_A"] = np.array(psizes, dtype=np.float32)
    dset["micrograph_blob/format"] = np.array(["MRC/1"] * n, dtype=object)
    dset["mscope_params/exp_group_id"] = np.full(n, exp_group_id, dtype=np.uint32)
    return dset


def check_shape(spec: MicrographSpec, file_shape: tuple[int, int]) -> None:
    """Fractions are relative to ``micrograph_blob/shape``; refuse a file whose array differs."""
    if tuple(file_shape) != tuple(spec.extra["shape"]):
        raise CryoSPARCDataError(
            f"{spec.path}: array shape {tuple(file_shape)} differs from micrograph_blob/shape "
            f"{list(spec.extra['shape'])} (uid {spec.extra['uid']}); is --project-dir pointing at the right project?")


# --- particles -> coordinates / labels ----------------------------------------------------------
@dataclass
class ParticleCoordinates:
    """Particles of one dataset grouped per micrograph, in original pixels of our files."""

    by_name: dict[str, tuple[np.ndarray, np.ndarray]]
    uids: dict[str, np.ndarray]  # particle uids in the same order
    unmatched: int  # particles whose micrograph uid is not among the exposures

    @property
    def count(self) -> int:
        return int(sum(x.size for x, _ in self.by_name.values()))


def particles_to_coordinates(dset, specs: Iterable[MicrographSpec], source: str = "particles",
                             flip_y: bool = False) -> ParticleCoordinates:
    """Particle centres per micrograph via ``location/micrograph_uid`` -> exposure ``uid``.

    Coordinates use the exposure's ``micrograph_blob/shape`` (fractions do not depend on a
    particle's own ``micrograph_shape``, which can only differ by binning).  A dataset none of
    whose particles lie on the given exposures is an error (wrong input connected).
    """
    by_uid = {int(s.extra["uid"]): s for s in specs}
    n = len(dset)
    if n == 0:
        return ParticleCoordinates({}, {}, 0)
    _require(dset, PARTICLE_REQUIRED, source, "particles")
    mic = np.asarray(dset["location/micrograph_uid"], dtype=np.uint64)
    fx = np.asarray(dset["location/center_x_frac"], dtype=float)
    fy = np.asarray(dset["location/center_y_frac"], dtype=float)
    puid = np.asarray(dset["uid"], dtype=np.uint64)
    for field_name, v in (("location/center_x_frac", fx), ("location/center_y_frac", fy)):
        bad = np.flatnonzero(~np.isfinite(v))
        if bad.size:
            i = int(bad[0])
            raise CryoSPARCDataError(f"{source}: {field_name} is {v[i]} (not a number) in row {i} (particle uid "
                                     f"{int(puid[i])}) and {bad.size - 1} more row(s); these particles cannot be read")
    out: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    uids: dict[str, np.ndarray] = {}
    matched = 0
    for u in np.unique(mic):
        spec = by_uid.get(int(u))
        if spec is None:
            continue
        sel = mic == u
        x, y = from_fraction(fx[sel], fy[sel], spec.extra["shape"], flip_y=flip_y)
        off = np.flatnonzero(sel)[outside(x, y, spec.extra["shape"])]
        if off.size:
            i = int(off[0])
            ny, nx = spec.extra["shape"]
            raise CryoSPARCDataError(
                f"{source}: row {i} (particle uid {int(puid[i])}) has center_x_frac {fx[i]:g}, center_y_frac "
                f"{fy[i]:g}: outside micrograph {spec.name} ({nx} x {ny} px; fractions run 0 to 1); "
                f"{off.size} such row(s) on it")
        out[spec.name] = (x, y)
        uids[spec.name] = puid[sel]
        matched += int(sel.sum())
    if matched == 0:
        some = ", ".join(str(int(u)) for u in np.unique(mic)[:3])
        raise CryoSPARCDataError(f"{source}: none of its {n} particles lie on the given exposures "
                                 f"(location/micrograph_uid {some}, ...); were they picked on other micrographs?")
    return ParticleCoordinates(out, uids, n - matched)


def particles_to_labels(dset, specs: Iterable[MicrographSpec], label: int, round_: int, source: str,
                        flip_y: bool = False) -> tuple[list[Label], int]:
    """Every particle as a label (1 positive, 0 negative); returns (labels, particles on other exposures)."""
    pc = particles_to_coordinates(dset, specs, source, flip_y)
    labels = [Label(name, float(a), float(b), int(label), source, round_)
              for name, (x, y) in sorted(pc.by_name.items()) for a, b in zip(x, y)]
    return labels, pc.unmatched


def particles_to_edited(dset, specs: Iterable[MicrographSpec], source: str = "reviewed",
                        flip_y: bool = False) -> tuple[dict[str, Edited], int]:
    """A reviewed particle output (e.g. Manual Picker's) as edited picks per micrograph, for ``diff_edits``."""
    pc = particles_to_coordinates(dset, specs, source, flip_y)
    return {name: Edited(x, y) for name, (x, y) in pc.by_name.items()}, pc.unmatched


# --- picks / proposals -> particles -------------------------------------------------------------
@dataclass
class PickRows:
    """Picks of one micrograph in original pixels with a probability (0-1)."""

    spec: MicrographSpec
    x: np.ndarray
    y: np.ndarray
    score: np.ndarray


def particle_fields(with_psize: bool = False) -> list[tuple]:
    return LOCATION_FIELDS + ([PSIZE_FIELD] if with_psize else []) + PICK_STATS_FIELDS


def picks_to_dataset(rows: Sequence[PickRows], min_dist_px: float | dict[str, float], flip_y: bool = False,
                     with_psize: bool = False, uids: np.ndarray | None = None):
    """A particle Dataset as cryoSPARC's pickers write it; the probability goes in both
    ``pick_stats/ncc_score`` and ``pick_stats/power`` so Inspect Picks can threshold it.

    ``min_dist_px``: the NMS distance in micrograph pixels (one value or per micrograph name),
    stored as ``location/min_dist_A``.  ``uids``: row uids to use (random ones otherwise).
    """
    Dataset = _dataset_class()
    n = int(sum(len(r.x) for r in rows))
    dset = Dataset.allocate(n, particle_fields(with_psize))
    if uids is not None:
        if len(uids) != n:
            raise ValueError(f"{len(uids)} uids given for {n} particles")
        dset["uid"] = np.asarray(uids, dtype=np.uint64)
    if n == 0:
        return dset
    mic_uid, group, path, shape, fx, fy, dist, psize, score = [], [], [], [], [], [], [], [], []
    for r in rows:
        k = len(r.x)
        if k == 0:
            continue
        e = r.spec.extra
        a, b = to_fraction(r.x, r.y, e["shape"], flip_y=flip_y)
        fx.append(a)
        fy.append(b)
        mic_uid.append(np.full(k, e["uid"], dtype=np.uint64))
        group.append(np.full(k, e.get("exp_group_id", 0), dtype=np.uint32))
        path += [e["cs_path"]] * k
        shape.append(np.tile(np.asarray(e["shape"], dtype=np.uint32), (k, 1)))
        md = min_dist_px[r.spec.name] if isinstance(min_dist_px, dict) else min_dist_px
        dist.append(np.full(k, float(md) * float(e["psize_A"]), dtype=np.float32))
        psize.append(np.full(k, float(e["psize_A"]), dtype=np.float32))
        score.append(np.clip(np.asarray(r.score, dtype=float), 0.0, 1.0))
    dset["location/micrograph_uid"] = np.concatenate(mic_uid)
    dset["location/exp_group_id"] = np.concatenate(group)
    dset["location/micrograph_path"] = np.array(path, dtype=object)
    dset["location/micrograph_shape"] = np.concatenate(shape)
    dset["location/center_x_frac"] = np.concatenate(fx).astype(np.float32)
    dset["location/center_y_frac"] = np.concatenate(fy).astype(np.float32)
    dset["location/min_dist_A"] = np.concatenate(dist)
    if with_psize:
        dset["location/micrograph_psize_A"] = np.concatenate(psize)
    s = np.concatenate(score).astype(np.float32)
    dset["pick_stats/ncc_score"] = s
    dset["pick_stats/power"] = s
    dset["pick_stats/template_idx"] = np.zeros(n, dtype=np.uint32)
    dset["pick_stats/angle_rad"] = np.zeros(n, dtype=np.float32)
    return dset


def proposals_to_rows(proposals: Sequence[Proposal], specs: Iterable[MicrographSpec]) -> list[PickRows]:
    """Group proposals per micrograph (in the order given) as PickRows."""
    by_name = {s.name: s for s in specs}
    out: dict[str, list[Proposal]] = {}
    for p in proposals:
        if p.micrograph not in by_name:
            raise ValueError(f"proposal on micrograph {p.micrograph!r} that is not among the exposures")
        out.setdefault(p.micrograph, []).append(p)
    return [PickRows(by_name[n], np.array([p.x for p in ps]), np.array([p.y for p in ps]),
                     np.array([p.score for p in ps])) for n, ps in out.items()]


def copy_into(target, source) -> list[str]:
    """Fill a server-allocated output (``job.alloc_output``) from ``source`` field by field.

    Returns the fields of ``source`` the server did not ask for (left out); fields the server
    has that we do not fill keep their allocated defaults.
    """
    have = set(target.fields())
    skipped = []
    for f in source.fields():
        if f == "uid":
            continue
        if f in have:
            target[f] = source[f]
        else:
            skipped.append(f)
    return skipped
