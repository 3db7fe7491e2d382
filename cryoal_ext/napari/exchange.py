"""Labels and picks in and out of the napari plugin: RELION STAR, cryoSPARC .cs, Topaz txt, label TSV.

Why a module of its own: the formats, and the names each host gives a micrograph, are a different
job from the labelling session.  ``FileExchange`` is the controller's half that does it; it reads
the controller's state (``specs``, ``picks``, ``threshold``, ``labels``, ``store``, ``round``, the
source's RELION table or cryoSPARC exposures) and its ``radius_of`` / ``pixel_size_of``, and writes
through the package's own writers (atomic, the user's umask).
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from ..extract import Picks
from ..files import read_coordinates, write_star, write_topaz
from ..io import micrograph_name
from ..labels import Label, LabelStore
from ..workflow import MicrographSpec

def stable_uid(name: str) -> int:
    """A uid for a micrograph that is the same in every session (cryoSPARC uids are unsigned 64-bit)."""
    return int(hashlib.sha1(name.encode()).hexdigest()[:15], 16)


class FileExchange:
    """Export picks and labels, import labels, and match the names other files give the micrographs."""

    def _relion_name(self, name: str) -> str:
        spec = self.specs.get(name)
        if spec is None:
            return name
        return spec.extra.get("relion_name") or spec.path

    def _cs_specs(self) -> dict[str, MicrographSpec]:
        """Specs with cryoSPARC's fields (uid, path, shape, pixel size), made from the files when the
        source was not a .cs: uids are stable hashes of the names, so exports agree between sessions."""
        from ..cryosparc.data import _dataset_class, exposures_from_files, exposures_to_specs

        if self._exposures is None or any("uid" not in s.extra for s in self.specs.values()):
            specs = list(self.specs.values())
            dsets = [exposures_from_files([s.path], pixel_size=self.pixel_size_of(s.name), uids=[stable_uid(s.name)])
                     for s in specs]
            dset = dsets[0] if len(dsets) == 1 else _dataset_class().append_many(*dsets)
            for spec, cs in zip(specs, exposures_to_specs(dset, None, "exposures", check_files=False)):
                spec.extra.update(cs.extra)
            self._exposures = dset
        return self.specs

    def export_picks(self, path: str | os.PathLike, threshold: float | None = None) -> list[Path]:
        """Picks above the threshold as RELION STAR, cryoSPARC .cs or Topaz txt (by the suffix of ``path``).

        cryoSPARC: a particles .cs as its pickers write it (probability in ``pick_stats/ncc_score``),
        plus ``<stem>_exposures.cs`` when the micrographs did not come from a .cs.
        """
        path = Path(path)
        t = self.threshold if threshold is None else threshold
        if not self.picks:
            raise ValueError("no picks yet: retrain or predict first")
        picks = [self.picks[n].above(t) for n in self.specs if n in self.picks]
        fmt = path.suffix.lower()
        if fmt == ".txt":
            write_topaz(path, picks)
            return [path]
        if fmt == ".star":
            from ..relion.coordinates import coordinates_frame

            frames = []
            for p in picks:
                df = coordinates_frame(p)
                df.insert(0, "rlnMicrographName", self._relion_name(p.name))
                frames.append(df)
            write_star(path, {"particles": pd.concat(frames, ignore_index=True)})
            return [path]
        if fmt == ".cs":
            from ..cryosparc.data import PickRows, picks_to_dataset, save_dataset

            specs = self._cs_specs()
            rows = [PickRows(specs[p.name], p.x, p.y, p.score) for p in picks]
            out = [save_dataset(path, picks_to_dataset(rows, {p.name: self.radius_of(p.name) for p in picks}))]
            if self.source_kind != "cryosparc":
                out.append(save_dataset(path.with_name(f"{path.stem}_exposures.cs"), self._exposures))
            return out
        raise ValueError(f"{path}: export picks as .star (RELION), .cs (cryoSPARC) or .txt (Topaz)")

    def export_labels(self, path: str | os.PathLike) -> list[Path]:
        """Labels as a RELION STAR (one table, rlnParticleSelectionType 2 = positive, 1 = negative), a
        label TSV (the session format), or positives and negatives as two cryoSPARC .cs / Topaz txt
        files, ``<stem>_positive`` and ``<stem>_negative`` (what ``--positives``/``--negatives`` take)."""
        path = Path(path)
        labels = self.labels
        fmt = path.suffix.lower()
        if fmt == ".tsv":
            store = LabelStore(path)
            store.labels = labels
            store.save()
            return [path]

        def picks_of(lab: int) -> list[Picks]:
            out = []
            for n in dict.fromkeys(l.micrograph for l in labels):
                sel = [l for l in labels if l.micrograph == n and l.label == lab]
                out.append(Picks(n, np.array([l.x for l in sel], float), np.array([l.y for l in sel], float),
                                 np.full(len(sel), float(lab))))
            return out

        if fmt == ".star":
            from ..relion.coordinates import NEGATIVE_SELECTION_TYPE, POSITIVE_SELECTION_TYPE, coordinates_frame

            frames = []
            for lab, st in ((1, POSITIVE_SELECTION_TYPE), (0, NEGATIVE_SELECTION_TYPE)):
                for p in picks_of(lab):
                    df = coordinates_frame(p, st)
                    df.insert(0, "rlnMicrographName", self._relion_name(p.name))
                    frames.append(df)
            table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
                columns=["rlnMicrographName", "rlnCoordinateX", "rlnCoordinateY", "rlnParticleSelectionType"])
            write_star(path, {"particles": table})
            return [path]
        out = []
        for lab, word in ((1, "positive"), (0, "negative")):
            target = path.with_name(f"{path.stem}_{word}{fmt}")
            if fmt == ".txt":
                write_topaz(target, [p for p in picks_of(lab) if len(p)])
            elif fmt == ".cs":
                from ..cryosparc.data import PickRows, picks_to_dataset, save_dataset

                specs = self._cs_specs()
                unknown = sorted({l.micrograph for l in labels} - set(specs))
                if unknown:
                    raise ValueError(f"labels on micrograph(s) not among the open ones, e.g. {unknown[0]}")
                rows = [PickRows(specs[p.name], p.x, p.y, p.score) for p in picks_of(lab) if len(p)]
                save_dataset(target, picks_to_dataset(rows, {r.spec.name: self.radius_of(r.spec.name) for r in rows}))
            else:
                raise ValueError(f"{path}: export labels as .star (RELION), .cs (cryoSPARC), .txt (Topaz) or .tsv")
            out.append(target)
        return out

    # --- import ---------------------------------------------------------------------------------
    def resolve(self, name: str) -> str | None:
        """Our micrograph name for a name another file uses (exact, RELION's rules, or the file stem)."""
        name = str(name)
        if name in self.specs:
            return name
        if self._relion_table is not None:
            e = self._relion_table.resolver()(name)
            if e is not None:
                return e.key
        stem = micrograph_name(name)
        return stem if stem in self.specs else None

    def import_labels(self, path: str | os.PathLike, label: int | None = None) -> tuple[int, int]:
        """Existing picks as labels: Topaz txt, RELION STAR (a coordinate list or a table with
        rlnMicrographName; rlnParticleSelectionType gives the label when present), cryoSPARC
        particles .cs, or a label TSV.  ``label``: 1 or 0 for every pick (overrides the file's own
        labels); None: the file's labels where it has them, else positive.  Returns (labels added, picks on micrographs that are not open)."""
        path = Path(path)
        fmt = path.suffix.lower()
        source = f"import:{path.name}"
        default = 1 if label is None else int(label)
        if fmt == ".cs":
            from ..cryosparc.data import load_dataset, particles_to_labels

            labs, unmatched = particles_to_labels(load_dataset(path, "particles"), list(self._cs_specs().values()),
                                                  default, self.round, source)
            return self.store.add(labs), unmatched
        if fmt == ".tsv":
            table = pd.DataFrame([l.__dict__ for l in LabelStore(path).effective()],
                                 columns=["micrograph", "x", "y", "label"])
        elif fmt == ".star":
            from ..relion.coordinates import read_picks_table

            table = read_picks_table(path, self.project_dir or ".",
                                     lambda n: self.pixel_size_of(self.resolve(n)) if self.resolve(n) else None)
        else:
            t = read_coordinates(path)
            table = pd.DataFrame({"micrograph": t["image_name"], "x": t["x"], "y": t["y"], "label": np.nan})
        labs, unmatched = [], 0
        for r in table.itertuples(index=False):
            name = self.resolve(r.micrograph)
            if name is None:
                unmatched += 1
                continue
            lab = default if label is not None or not np.isfinite(r.label) else int(r.label)
            labs.append(Label(name, float(r.x), float(r.y), lab, source, self.round))
        return self.store.add(labs), unmatched
