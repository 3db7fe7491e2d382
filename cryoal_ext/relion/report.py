"""RELION job outputs: coordinate nodes, the output node list, overlays and the summary PDF."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .coordinates import write_coordinates


class Report:
    """Job steps that write outputs: coordinates, node list, pictures (a mixin of ``job.Job``)."""

    # -- outputs ---------------------------------------------------------------------------
    def write_coords(self, names: list[str], picks_of: dict, pickname: str, list_name: str) -> tuple[str, dict]:
        return write_coordinates(self.out, names, picks_of, pickname, list_name, self.version)

    def nodes(self) -> list[tuple[str, str]]:
        """Every output this job has on disk, as (node name, kind) for RELION_OUTPUT_NODES.star.

        model.npz is not declared: Display would run relion_display on it (see star.NODE_LABELS).
        """
        out = []
        for name, kind in (("queries.star", "coords"), ("autopick.star", "coords"), ("candidates.star", "coords"),
                           ("logfile.pdf", "logfile")):
            if (self.folder / name).exists():
                out.append((self.out + name, kind))
        return out

    def plots(self, round_dir: Path, items, picks_by_key: dict, proposals, threshold: float,
              scores: np.ndarray, summary: dict) -> list[Path]:
        from ..plots import plot_histogram, plot_overlay

        pngs = []
        labels = self.session.labels.effective()
        for it in items[: max(self.s.overlays, 0)]:
            key = it.mic.name
            fr = it.mic.frame
            pk = picks_by_key.get(key)
            q = [p for p in proposals if p.micrograph == key]
            path = round_dir / f"overlay_{key}.png"
            plot_overlay(it.mic.image, str(path),
                         picks=(pk.x, pk.y) if pk is not None else None,
                         queries=(np.array([p.x for p in q]), np.array([p.y for p in q])) if q else None,
                         labels=[(l.x, l.y, l.label) for l in labels if l.micrograph == key],
                         radius=fr.radius_to_working(self.radius_of(self.by_key[key])),
                         title=f"{self.by_key[key].name}: {len(pk) if pk is not None else 0} picks "
                               f"(FOM > {threshold:g}, blue), {len(q)} queries (yellow), labels +/x",
                         scale=(fr.scale_x, fr.scale_y))
            pngs.append(path)
        hist = round_dir / "scores.png"
        plot_histogram(scores, str(hist), threshold, title=f"pick probabilities ({scores.size} candidates)")
        pngs.append(hist)
        write_summary_pdf(self.folder / "logfile.pdf", summary, pngs)
        return pngs


def write_summary_pdf(path: Path, summary: dict, pngs: list[Path]) -> None:
    """A small PDF for RELION's 'logfile.pdf' node: a text page and the round's pictures."""
    from ..atomic import atomic_path
    from ..plots import _plt

    plt = _plt()
    from matplotlib.backends.backend_pdf import PdfPages

    lines = [f"cryoal_ext RELION job: {summary.get('mode')} (round {summary.get('round')})", ""]
    for k, v in summary.items():
        if k not in ("mode",):
            lines.append(f"{k}: {v}")
    with atomic_path(path) as tmp:
        with PdfPages(tmp) as pdf:
            fig = plt.figure(figsize=(8.27, 11.69))
            fig.text(0.06, 0.95, "\n".join(lines), va="top", family="monospace", fontsize=9, wrap=True)
            pdf.savefig(fig)
            plt.close(fig)
            for png in pngs:
                if not Path(png).exists():
                    continue
                fig, ax = plt.subplots(figsize=(8.27, 8.27))
                ax.imshow(plt.imread(str(png)))
                ax.set_axis_off()
                pdf.savefig(fig)
                plt.close(fig)
