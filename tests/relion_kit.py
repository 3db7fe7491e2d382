"""Helpers for tests that run REAL RELION programs (the kits in ../shared/relion/relion4 and relion5).

A kit is a ``bin/`` of RELION programs built from RELION's own source (see its README).  The
helpers find a kit and say plainly what is missing (the folder, a runtime library, Xvfb), start a
private Xvfb, make a project the way the GUI does (``relion --do_projdir``), drive
``relion_pipeliner`` (add, edit and run jobs) and read ``default_pipeline.star``.  Picker edits are
written back through ``relion_star_handler``, i.e. by RELION's own STAR writer, the one
``relion_manualpick`` uses when the user presses CTRL+S.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "relion_scripts" / "cryoal_relion.py"
KITS = {4: "relion4", 5: "relion5"}
VERSION_TAG = {4: 30001, 5: 50001}
COORDS_LABEL = {4: "MicrographsCoords.star.relion.autopick", 5: "MicrographCoordsGroup.star.relion.autopick"}
LOGFILE_LABEL = "LogFile.pdf.relion"
ADDED_FOM = {4: -999.0, 5: 0.0}  # what each version's picker writes as FOM for a pick the user adds
PROGRAMS = ("relion", "relion_pipeliner", "relion_manualpick", "relion_display", "relion_preprocess",
            "relion_import", "relion_star_handler")
RUNTIME_PACKAGES = "libfltk1.3 libfftw3-double3 libtiff6 libpng16-16 libgomp1 libstdc++6"
JOB_DIRS = {"relion.import": "Import", "relion.external": "External", "relion.extract": "Extract",
            "relion.manualpick": "ManualPick"}


def kits_folder() -> Path:
    """$CRYOAL_RELION_KITS, else ../shared/relion beside the repository."""
    env = os.environ.get("CRYOAL_RELION_KITS")
    return Path(env) if env else REPO.parent / "shared" / "relion"


def kit_bin(major: int) -> Path:
    return kits_folder() / KITS[major] / "bin"


def missing(major: int) -> str | None:
    """Why RELION ``major`` cannot run here (a sentence naming the missing piece), or None."""
    bin_ = kit_bin(major)
    if not bin_.is_dir():
        return f"RELION {major} kit not found: {bin_} (set CRYOAL_RELION_KITS to the folder holding {KITS[major]}/)"
    for prog in PROGRAMS:
        if not os.access(bin_ / prog, os.X_OK):
            return f"RELION {major} kit incomplete: {bin_ / prog} missing or not executable"
    if shutil.which("ldd"):
        for prog in PROGRAMS:
            out = subprocess.run(["ldd", str(bin_ / prog)], capture_output=True, text=True).stdout
            lost = [line.split()[0] for line in out.splitlines() if "not found" in line]
            if lost:
                return (f"RELION {major}: runtime library not found for {prog}: {', '.join(lost)} "
                        f"(apt-get install {RUNTIME_PACKAGES})")
    if shutil.which("Xvfb") is None:
        return "Xvfb not found (apt-get install xvfb): RELION's GUI needs a display to make a project"
    return None


class Xvfb:
    """A private X server (``Xvfb -displayfd``: it picks a free display number itself)."""

    def __init__(self, size: str = "1280x1024x24"):
        r, w = os.pipe()
        self.proc = subprocess.Popen(["Xvfb", "-displayfd", str(w), "-screen", "0", size, "-nolisten", "tcp"],
                                     pass_fds=(w,), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(w)
        with os.fdopen(r) as f:
            number = f.readline().strip()
        if not number:
            self.proc.kill()
            raise RuntimeError("Xvfb did not start")
        self.display = f":{number}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


def write_micrographs(dest: Path, source: Path | None, names: list[str], size: int = 512,
                      pixel_size: float = 5.36) -> list[Path]:
    """``size``² float32 crops (top-left corner) of the named micrographs, header pixel size set.

    ``source``: a folder of full micrographs (../shared/data/empiar10028/micrographs); None: the
    bundled 512² crops (already crops; converted from float16 to float32).
    """
    import mrcfile

    dest.mkdir(parents=True, exist_ok=True)
    out = []
    for name in names:
        src = (source / f"{name}.mrc") if source else (REPO / "cryoal_ext" / "example_data" / "empiar10028_small"
                                                      / "micrographs" / f"{name}_crop.mrc")
        with mrcfile.open(src, permissive=True) as m:
            data = np.asarray(m.data, np.float32)[:size, :size]
        path = dest / f"{name}.mrc"
        with mrcfile.new(path, overwrite=True) as m:
            m.set_data(np.ascontiguousarray(data))
            m.voxel_size = pixel_size
        out.append(path)
    return out


@dataclass
class RelionProject:
    """A real RELION project folder and the environment RELION's programs run in."""

    root: Path
    major: int
    display: str
    cache: str
    log: list[str] = field(default_factory=list)

    @property
    def env(self) -> dict:
        """The kit first on PATH (RELION starts its programs through PATH), then this interpreter's
        folder (the script's shebang is ``env python3``), this checkout first on PYTHONPATH."""
        path = os.pathsep.join([str(kit_bin(self.major)), str(Path(sys.executable).parent), os.environ.get("PATH", "")])
        pp = os.pathsep.join([str(REPO)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
        return dict(os.environ, PATH=path, PYTHONPATH=pp, DISPLAY=self.display, CRYOAL_CACHE=self.cache,
                    OMP_NUM_THREADS="1", CRYOAL_LOCK_WAIT="3")

    def sh(self, cmd: list[str] | str, timeout: float = 300, check: bool = True) -> subprocess.CompletedProcess:
        t = time.perf_counter()
        res = subprocess.run(cmd, cwd=self.root, env=self.env, capture_output=True, text=True, timeout=timeout,
                             shell=isinstance(cmd, str))
        shown = cmd if isinstance(cmd, str) else " ".join(cmd)
        self.log.append(f"[{time.perf_counter() - t:6.1f} s] {shown}")
        if check and res.returncode != 0:
            raise AssertionError(f"{shown} -> exit {res.returncode}\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}")
        return res

    # -- making the project ------------------------------------------------------------------
    def make(self) -> None:
        """``relion --do_projdir``: the GUI creates .gui_projectdir and default_pipeline.star, then quits."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.sh(["relion", "--do_projdir", "--idle", "1", "--refresh", "1"], timeout=60)
        if not (self.root / "default_pipeline.star").exists():
            raise AssertionError(f"relion --do_projdir made no default_pipeline.star in {self.root}")

    # -- the pipeliner -------------------------------------------------------------------------
    def add_job(self, job_type: str, options: dict) -> str:
        """``relion_pipeliner --addJob TYPE --addJobOptions "name == value;..."``; returns the job folder."""
        before = set(self.processes())
        text = ";".join(f"{k} == {v}" for k, v in options.items())
        self.sh(["relion_pipeliner", "--addJob", job_type, "--addJobOptions", text])
        new = [p for p in self.processes() if p not in before]
        if len(new) != 1 or not new[0].startswith(JOB_DIRS.get(job_type, "")):
            raise AssertionError(f"--addJob {job_type} added {new}")
        return new[0]

    def edit_job(self, job: str, option: str, value: str) -> None:
        """What changing a field before Continue! does: ``--editJob <job>job.star``."""
        self.sh(["relion_pipeliner", "--editJob", f"{job}job.star", "--editOption", option, "--editValue", value])

    def run_job(self, job: str, timeout: float = 900, sec_wait: int = 1) -> str:
        """``relion_pipeliner --RunJobs JOB``: runs it (again: RELION's Continue!) and waits; returns its status."""
        self.sh(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", str(sec_wait)], timeout=timeout)
        return self.processes()[job]

    def start_job(self, job: str, sec_wait: int) -> subprocess.Popen:
        """The same, without waiting: the pipeliner checks for the job's end only every ``sec_wait`` s."""
        self.log.append(f"[start] relion_pipeliner --RunJobs {job} --sec_wait_after {sec_wait}")
        return subprocess.Popen(["relion_pipeliner", "--RunJobs", job, "--sec_wait_after", str(sec_wait)],
                                cwd=self.root, env=self.env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    # -- reading the pipeline ------------------------------------------------------------------
    def pipeline(self) -> dict:
        return starfile.read(self.root / "default_pipeline.star", always_dict=True)

    def processes(self) -> dict[str, str]:
        """Process name -> status label (Scheduled, Running, Succeeded, Failed, Aborted)."""
        t = self.pipeline().get("pipeline_processes")
        if not isinstance(t, pd.DataFrame):
            return {}
        return dict(zip(t["rlnPipeLineProcessName"].astype(str), t["rlnPipeLineProcessStatusLabel"].astype(str)))

    def status(self, job: str) -> str | None:
        """The job's status while RELION may be rewriting default_pipeline.star (None if unreadable now)."""
        try:
            return self.processes().get(job)
        except Exception:  # noqa: BLE001 - a half-written file: ask again on the next poll
            return None

    def nodes(self) -> dict[str, str]:
        t = self.pipeline().get("pipeline_nodes")
        if not isinstance(t, pd.DataFrame):
            return {}
        return dict(zip(t["rlnPipeLineNodeName"].astype(str), t["rlnPipeLineNodeTypeLabel"].astype(str)))

    def node_file(self, name: str, label: str) -> Path:
        """Where RELION touches a node for the GUI's Browse buttons: .Nodes/<label up to the first dot>/<name>."""
        return self.root / ".Nodes" / label.split(".")[0] / name

    def text(self, job: str, name: str) -> str:
        p = self.root / job / name
        return p.read_text(errors="replace") if p.exists() else ""

    def coordinate_list(self, path: str) -> dict[str, Path]:
        t = starfile.read(self.root / path, always_dict=True)["coordinate_files"]
        return {str(m): self.root / str(c) for m, c in zip(t["rlnMicrographName"], t["rlnMicrographCoordinates"])}


# --- reading and editing coordinate files -------------------------------------------------------
def read_table(path: Path) -> pd.DataFrame:
    data = starfile.read(path, always_dict=True)
    return next((v for v in data.values() if isinstance(v, pd.DataFrame)), pd.DataFrame())


def free_spot(taken: list[tuple[float, float]], size: int, min_dist: float, seed: int) -> tuple[int, int]:
    """An integer pixel (the picker rounds clicks to pixels) at least ``min_dist`` from every spot taken."""
    rng = np.random.default_rng(seed)
    for _ in range(10000):
        x, y = (int(v) for v in rng.integers(60, size - 60, 2))
        if all(np.hypot(x - a, y - b) > min_dist for a, b in taken):
            return x, y
    raise AssertionError("no free spot for a new pick")


@dataclass
class Edit:
    """One micrograph's review, as the user made it in RELION's picker, and the labels it must give."""

    micrograph: str  # rlnMicrographName
    kept: list[tuple[float, float]]
    deleted: list[tuple[float, float]]
    added: list[tuple[int, int]]  # green (type 2, the default)
    red: list[tuple[int, int]]  # CTRL+1 then click (type 1)

    def expected(self, key: str) -> list[tuple[str, float, float, int]]:
        return ([(key, x, y, 1) for x, y in self.kept] + [(key, x, y, 0) for x, y in self.deleted]
                + [(key, float(x), float(y), 1) for x, y in self.added]
                + [(key, float(x), float(y), 0) for x, y in self.red])


def picker_edit(project: RelionProject, micrograph: str, path: Path, delete: int = 1, add: int = 1, red: int = 1,
                size: int = 512, radius: float = 28.0, seed: int = 0) -> Edit:
    """Edit one per-micrograph queries file exactly as RELION's picker saves it (CTRL+S, in place).

    Deletes the first ``delete`` proposals (middle click), adds ``add`` green picks and ``red`` red
    picks (CTRL+1) at free spots.  Like the picker, a new row is a copy of the last row with the
    click position, rlnParticleSelectionType = the current type, rlnAnglePsi -999 and FOM 0
    (RELION 5) or -999 (RELION 4.0).  The file is then written by relion_star_handler, i.e. by the
    same RELION STAR writer the picker uses.
    """
    df = read_table(path)
    xs, ys = df["rlnCoordinateX"].astype(float), df["rlnCoordinateY"].astype(float)
    n_del = min(delete, len(df))
    deleted = list(zip(xs[:n_del], ys[:n_del]))
    kept_df = df.iloc[n_del:]
    kept = list(zip(kept_df["rlnCoordinateX"].astype(float), kept_df["rlnCoordinateY"].astype(float)))
    taken = list(zip(xs, ys))
    rows = [kept_df]
    template = (kept_df if len(kept_df) else df).iloc[[-1]]
    new_green, new_red = [], []
    for i in range(add + red):
        # well away from every proposal (else it would count as re-centring one) and from other picks
        x, y = free_spot(taken, size, 2.5 * radius, seed + i)
        taken.append((x, y))
        row = template.copy()
        sel = 2 if i < add else 1
        row["rlnCoordinateX"], row["rlnCoordinateY"] = float(x), float(y)
        row["rlnParticleSelectionType"], row["rlnAnglePsi"] = sel, -999.0
        row["rlnAutopickFigureOfMerit"] = ADDED_FOM[project.major]
        rows.append(row)
        (new_green if sel == 2 else new_red).append((x, y))
    out = pd.concat(rows, ignore_index=True)
    tmp = path.with_name(path.name + ".edit.star")
    starfile.write(out, tmp, overwrite=True)
    project.sh(["relion_star_handler", "--i", str(tmp), "--o", str(path), "--ignore_optics",
                "--select", "rlnCoordinateX", "--minval", "-99999999", "--maxval", "99999999"])
    tmp.unlink()
    return Edit(micrograph, kept, deleted, new_green, new_red)


def truthful_edit(project: RelionProject, micrograph: str, path: Path, truth: tuple[np.ndarray, np.ndarray],
                  radius: float) -> Edit:
    """A careful user's review in the picker: delete every query farther than ``radius`` from an expert
    pick, keep the rest, add nothing; saved in place by relion_star_handler as ``picker_edit`` does."""
    df = read_table(path)
    xs, ys = df["rlnCoordinateX"].astype(float).to_numpy(), df["rlnCoordinateY"].astype(float).to_numpy()
    tx, ty = truth
    near = np.array([bool(tx.size) and np.hypot(tx - x, ty - y).min() <= radius for x, y in zip(xs, ys)], bool)
    tmp = path.with_name(path.name + ".edit.star")
    starfile.write(df[near].reset_index(drop=True) if near.any() else df.iloc[:0], tmp, overwrite=True)
    project.sh(["relion_star_handler", "--i", str(tmp), "--o", str(path), "--ignore_optics",
                "--select", "rlnCoordinateX", "--minval", "-99999999", "--maxval", "99999999"])
    tmp.unlink()
    return Edit(micrograph, list(zip(xs[near], ys[near])), list(zip(xs[~near], ys[~near])), [], [])


def labels_of(folder: Path) -> list[tuple[str, float, float, int]]:
    p = folder / "labels.tsv"
    if not p.exists():
        return []
    df = pd.read_csv(p, sep="\t", dtype={"micrograph": str})
    return [(str(r.micrograph), float(r.x), float(r.y), int(r.label)) for r in df.itertuples()]


def same_labels(got: list, want: list, tol: float = 0.011) -> str | None:
    """None when the two label lists are the same multiset (coordinates to ``tol`` px), else what differs."""
    left = sorted(got)
    right = sorted(want)
    unmatched = list(right)
    extra = []
    for g in left:
        hit = next((w for w in unmatched if w[0] == g[0] and w[3] == g[3]
                    and abs(w[1] - g[1]) <= tol and abs(w[2] - g[2]) <= tol), None)
        if hit is None:
            extra.append(g)
        else:
            unmatched.remove(hit)
    if not extra and not unmatched:
        return None
    return f"labels not given by the user: {extra}; edits that did not become labels: {unmatched}"


def stop(proc: subprocess.Popen) -> None:
    """End a process this test started (by its pid only)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def stop_group(proc: subprocess.Popen) -> None:
    """End the process group of a process this test started with start_new_session=True (by its id)."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
