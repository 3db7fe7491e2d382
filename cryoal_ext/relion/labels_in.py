"""Labels into the RELION job's session: the reviewed queries, extra coordinate inputs, label tables.

The rules of a review (kept, deleted, added, red, unopened; a review applied once) are
``review.apply_answers``; this module finds the files RELION's picker wrote and hands them over.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ..atomic import copy_file
from ..review import apply_answers
from .coordinates import file_digest, read_coordinate_list, read_mic_coordinates, read_picks_table
from .star import mic_root


class LabelImport:
    """Job steps that bring the user's answers into the session (a mixin of ``job.Job``)."""

    # -- labels in -------------------------------------------------------------------------
    def _labels_from_table(self, df, default_label: int | None, source: str, force: int | None = None):
        from ..labels import Label

        out, unknown = [], set()
        rnd = self.session.round
        for r in df.itertuples(index=False):
            e = self.find(r.micrograph)
            if e is None:
                unknown.add(str(r.micrograph))
                continue
            lab = force if force is not None else (int(r.label) if np.isfinite(r.label) else default_label)
            out.append(Label(e.key, float(r.x), float(r.y), int(lab), source, rnd))
        if unknown:
            self.log.warn(f"{source}: {len(unknown)} micrograph(s) not in {self.s.in_mics} were skipped "
                          f"(e.g. {sorted(unknown)[0]})")
        return out

    def _pixel_size_of(self, name: str) -> float | None:
        e = self.find(name)
        return e.pixel_size if e else None

    def _import_review(self, sources: list[str], written: dict, imported: dict, just_imported: dict):
        """Answers from reviewed coordinate files (the rules: cryoal_ext/review.py).

        A file counts only if it changed since we wrote it and was not imported before, so an
        unopened file never turns into labels, in this job or in the job it continues.  A file we
        wrote answers the round that wrote it; any other file answers the latest round.  When
        several sources hold the same micrograph for one round, the newest file wins.  A file that
        is not one of our queries files and keeps none of the proposals shown on its micrograph is
        taken as independent picks (no implicit negatives).
        """
        from ..review import Answer, Edited, kept_count

        session = self.session
        found: dict[tuple[int, str], tuple[float, str, Path, str]] = {}
        skipped = 0
        for src in sources:
            for name, f in read_coordinate_list(src).items():
                e = self.find(name)
                if e is None:
                    self.log.warn(f"{src}: micrograph {name} is not in {self.s.in_mics}; skipped")
                    continue
                rel, digest = str(f), file_digest(f)
                ours = _written_entry(written.get(rel))
                if (ours and ours["digest"] == digest) or imported.get(rel) == digest:
                    skipped += 1
                    continue
                just_imported[rel] = digest
                rnd = ours["round"] if ours and ours["round"] is not None else max(session.round - 1, 0)
                prev = found.get((rnd, e.key))
                if prev is None or f.stat().st_mtime > prev[0]:
                    found[(rnd, e.key)] = (f.stat().st_mtime, name, f, rel)
        if not found:
            self.log(f"review: 0 micrograph(s) edited, {skipped} unchanged or already imported "
                     f"({', '.join(sources)})")
            if session.round > 0 and not self.s.final:
                self.log("note: no reviewed queries found. Open 'queries.star' (Display button), delete what is not "
                         "a particle, add missed ones, save (CTRL+S) in every micrograph, then run again")
            return []
        self.log(f"review: {len(found)} micrograph(s) edited, {skipped} unchanged or already imported "
                 f"({', '.join(sources)})")
        review_dir = self.folder / "rounds" / f"round_{session.round:03d}" / "reviewed"
        answers = []
        for (rnd, key), (_, name, f, rel) in sorted(found.items()):
            copy_file(f, review_dir / (mic_root(name) + "_reviewed.star"))  # the evidence, as read
            c = read_mic_coordinates(f)
            ed = Edited(c.x, c.y, c.label)
            props = [p for p in session.shown(rnd) if p.micrograph == key] if rnd < session.round else []
            tol = max(1.0, 0.2 * self.radius_of(self.by_key[key]))
            independent = not props or (kept_count(props, ed, tol) == 0 and rel not in written)
            if props and independent:
                self.log(f"note: {f} keeps none of the {len(props)} proposals shown on {name}; taken as independent "
                         "picks (no implicit negatives)")
            answers.append(Answer(rnd, key, ed, str(f), independent=independent,
                                  label_source="relion:picks" if independent else "relion:review"))
        return answers

    def import_labels(self) -> int:
        """Reviewed queries / Manual picking coordinates, particles, label files -> the label store."""
        s = self.s
        session = self.session
        rnd = session.round
        new = []
        # 1. the review of the queries shown (or any picks, in round 0)
        written = self.rstate.get("written_queries", {})
        imported = self.rstate.get("imported", {})
        just_imported: dict[str, str] = {}
        sources = []
        if rnd > 0 and (self.folder / "queries.star").exists():
            sources.append(self.out + "queries.star")  # our queries, edited in place via Display
        for src in (s.reviewed, s.in_coords):
            if src and src not in sources:
                sources.append(src)
        answers = self._import_review(sources, written, imported, just_imported) if sources else []
        # 2. particles (e.g. from good 2D classes) are positives
        if s.in_parts:
            df = read_picks_table(s.in_parts, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 1, f"relion:parts:{Path(s.in_parts).name}")
            self.log(f"{len(lab)} positive labels from particles {s.in_parts}")
            new += lab
        # 3. explicit label files, 4. negatives
        for f in s.labels:
            df = read_picks_table(f, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 1, f"relion:labels:{Path(f).name}")
            npos = sum(l.label for l in lab)
            self.log(f"{npos} positive, {len(lab) - npos} negative labels from {f}")
            new += lab
        for f in s.negatives:
            df = read_picks_table(f, pixel_size_of=self._pixel_size_of)
            lab = self._labels_from_table(df, 0, f"relion:negatives:{Path(f).name}", force=0)
            self.log(f"{len(lab)} negative labels from {f}")
            new += lab
        outcome = apply_answers(session, answers, lambda key: self.radius_of(self.by_key[key]), "relion:review",
                                extra=new, shape_of=lambda key: self.shapes.get(key))
        if outcome.applied or outcome.repeated:
            npos = outcome.positives
            self.log(f"review: {len(outcome.applied)} answer(s) applied -> {npos} positive, "
                     f"{len(outcome.labels) - npos} negative labels"
                     + (f"; {len(outcome.repeated)} applied before, skipped" if outcome.repeated else ""))
        added = outcome.added
        if just_imported:
            imported.update(just_imported)
            self.rstate["imported"] = imported
            session.save_state()
        pos, neg = session.labels.counts()
        self.log(f"labels: +{added} new, {pos} positive and {neg} negative in {session.labels.path}")
        return added


def _written_entry(entry) -> dict | None:
    """A ``written_queries`` record: {"digest", "round"} (a bare digest in sessions made before rounds were kept)."""
    if entry is None:
        return None
    return entry if isinstance(entry, dict) else {"digest": entry, "round": None}
