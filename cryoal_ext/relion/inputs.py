"""RELION job inputs: the micrographs STAR, version, sizes, and the session of the job folder."""
from __future__ import annotations

import time
from pathlib import Path

from ..atomic import copy_file
from .micrographs import check_pixel_size, read_header, read_micrographs_star
from .star import NODE_LABELS, RelionError, VERSION_TAG, detect_relion_version


class Inputs:
    """Job steps that read the inputs and open the session (a mixin of ``job.Job``)."""

    # -- inputs ----------------------------------------------------------------------------
    def read_inputs(self) -> None:
        s = self.s
        if not s.in_mics:
            raise RelionError("no input micrographs: select the micrographs STAR of a MotionCorr, CtfFind or "
                              "Select job as 'Input micrographs' (--in_mics)")
        self.major, how = detect_relion_version(s.in_mics, s.relion_version)
        self.version = VERSION_TAG[self.major]
        self.log(f"RELION {self.major} conventions ({how}); node label {NODE_LABELS[self.major]['coords']}")
        for k, v in s.ignored_inputs.items():
            self.log(f"note: --{k} {v} is not used by this job")
        if s.unknown:
            self.log(f"note: ignoring arguments this job does not know: {' '.join(s.unknown)}")
        t = time.perf_counter()
        self.table = read_micrographs_star(s.in_mics)
        for note in self.table.notes:
            self.log.warn(note)
        self._check_micrographs()
        self.by_key = self.table.by_key()
        self.find = self.table.resolver()
        self._timed("inputs", t)
        self.log(f"{len(self.table.entries)} micrographs in {s.in_mics} (STAR version {self.table.version or 'none'})")

    def _check_micrographs(self) -> None:
        """Every file exists and has a header; pixel sizes agree (before any slow work starts)."""
        from ..io import MicrographError

        missing, bad = [], []
        self.shapes: dict[str, tuple[int, int]] = {}  # key -> (ny, nx): labels off a micrograph are refused
        for e in self.table.entries:
            if not e.path.exists():
                missing.append(e)
                continue
            try:
                h = read_header(e.path)
            except MicrographError as exc:
                bad.append(str(exc))
                continue
            self.shapes[e.key] = h.shape
            if self.s.pixel_size:
                e.pixel_size, e.pixel_size_source = self.s.pixel_size, "--pixel_size"
                continue
            note = check_pixel_size(e, h)
            if note:
                self.log.warn(note)
        if missing:
            shown = ", ".join(f"{e.path} (rlnMicrographName {e.name})" for e in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise RelionError(f"{len(missing)} micrograph file(s) listed in {self.s.in_mics} not found: "
                              f"{shown}{more}")
        if bad:
            raise RelionError(f"unreadable micrograph(s) listed in {self.s.in_mics}: " + "; ".join(bad[:5]))

    def size_settings(self, model_meta: dict | None = None) -> None:
        s = self.s
        self.diameter = s.diameter
        if not s.diameter and not s.radius_px:
            if model_meta and model_meta.get("diameter_A"):
                self.diameter = float(model_meta["diameter_A"])
                self.log(f"particle diameter {self.diameter:g} A from the model file")
            else:
                raise RelionError("no particle size: add the parameter --diameter (in Angstrom), "
                                  "or --radius_px (in micrograph pixels)")

    # -- session ---------------------------------------------------------------------------
    def open_session(self):
        from ..session import Session

        src = self.s.continue_from
        here = self.folder / "session.json"
        if not src and self.s.in_coords and not here.exists():
            cand = Path(self.s.in_coords).parent
            if (cand / "session.json").exists() and cand.resolve() != self.folder.resolve():
                src = str(cand)
        if src and not here.exists():
            src_dir = Path(src)
            if not (src_dir / "session.json").exists():
                raise RelionError(f"--continue_from {src}: no session.json there (not a job of this program)")
            # session.json last: until it is here, a killed run simply copies again
            for f in sorted((src_dir / "proposals").glob("round_*.tsv")):
                copy_file(f, self.folder / "proposals" / f.name)
            for name in ("labels.tsv", "model.npz", "model.json", "session.json"):
                if (src_dir / name).exists():
                    copy_file(src_dir / name, self.folder / name)
            self.log(f"continuing the session of {src_dir} (labels, round, proposals copied)")
        self.session = Session(self.folder)
        self.rstate = self.session.state.setdefault("relion", {})
        prev = self.rstate.get("in_mics")
        if prev and prev != self.s.in_mics:
            self.log(f"note: input micrographs changed from {prev} to {self.s.in_mics}; labels are kept by "
                     "micrograph name")
        return self.session
