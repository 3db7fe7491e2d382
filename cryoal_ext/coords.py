"""The one place that owns coordinate conventions.

Every coordinate the package exchanges with the outside world is a particle CENTRE in pixels of
the original micrograph file, x = column, y = row of ``data[y, x]`` as mrcfile loads it, origin at
the first row/column (RELION's and Topaz's convention).  Internally we work on a Fourier-cropped
copy.  Fourier cropping keeps sample 0 in place and resamples the band-limited image on a grid
of spacing ``n_orig / n_work``, so the exact map between the two frames is a pure scale per axis.
cryoSPARC's fractional coordinates are ``x / nx`` and ``y / ny`` of the same array frame.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def working_shape(shape: tuple[int, int], pixel_size: float, working_pixel_size: float) -> tuple[int, int]:
    """Shape (ny, nx) of the Fourier-cropped image at ``working_pixel_size``.

    Never upsamples: a micrograph already coarser than the working size is used as is.
    """
    factor = max(float(working_pixel_size) / float(pixel_size), 1.0)
    ny, nx = shape
    return max(int(round(ny / factor)), 1), max(int(round(nx / factor)), 1)


@dataclass(frozen=True)
class Frame:
    """Scaling between a micrograph's original pixels and its working-scale pixels."""

    original_shape: tuple[int, int]  # (ny, nx) of the file
    working_shape: tuple[int, int]  # (ny, nx) after Fourier cropping
    pixel_size: float  # Angstrom per original pixel

    @property
    def scale_y(self) -> float:
        return self.original_shape[0] / self.working_shape[0]

    @property
    def scale_x(self) -> float:
        return self.original_shape[1] / self.working_shape[1]

    @property
    def working_pixel_size(self) -> float:
        return self.pixel_size * 0.5 * (self.scale_x + self.scale_y)

    def to_working(self, x, y):
        """Original-pixel centres -> working-pixel centres (floats)."""
        return np.asarray(x, dtype=float) / self.scale_x, np.asarray(y, dtype=float) / self.scale_y

    def to_original(self, x, y):
        """Working-pixel centres -> original-pixel centres (floats)."""
        return np.asarray(x, dtype=float) * self.scale_x, np.asarray(y, dtype=float) * self.scale_y

    def radius_to_working(self, radius_px: float) -> float:
        """A radius in original pixels expressed in working pixels."""
        return float(radius_px) / (0.5 * (self.scale_x + self.scale_y))

    def to_working_index(self, x, y):
        """Nearest working-scale pixel index (ix, iy), clipped into the image."""
        wx, wy = self.to_working(x, y)
        ix = np.clip(np.rint(wx).astype(int), 0, self.working_shape[1] - 1)
        iy = np.clip(np.rint(wy).astype(int), 0, self.working_shape[0] - 1)
        return ix, iy


def to_fraction(x, y, shape: tuple[int, int], flip_y: bool = False):
    """Original-pixel centres -> cryoSPARC ``center_x_frac``/``center_y_frac`` for ``shape`` = (ny, nx)."""
    ny, nx = shape
    fx = np.asarray(x, dtype=float) / nx
    fy = np.asarray(y, dtype=float) / ny
    if flip_y:
        fy = 1.0 - fy
    return fx, fy


def from_fraction(fx, fy, shape: tuple[int, int], flip_y: bool = False):
    """cryoSPARC fractional centres -> original-pixel centres of the array of ``shape`` = (ny, nx)."""
    ny, nx = shape
    fy = np.asarray(fy, dtype=float)
    if flip_y:
        fy = 1.0 - fy
    return np.asarray(fx, dtype=float) * nx, fy * ny


def inside_border(x, y, shape: tuple[int, int], border: float) -> np.ndarray:
    """Mask of centres at least ``border`` pixels away from every edge of an image of ``shape``."""
    ny, nx = shape
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    if border <= 0:
        return np.ones(x.shape, dtype=bool)
    return (x >= border) & (x < nx - border) & (y >= border) & (y < ny - border)


def outside(x, y, shape: tuple[int, int]) -> np.ndarray:
    """Mask of centres off an image of ``shape`` = (ny, nx): not 0 <= x <= nx and 0 <= y <= ny, or not finite.

    The closed range matches cryoSPARC's fractions 0..1; anything further out cannot be a particle of that image.
    """
    ny, nx = shape
    x = np.asarray(x, dtype=float)
    y = np.asarray(y, dtype=float)
    with np.errstate(invalid="ignore"):
        inside = (x >= 0) & (x <= nx) & (y >= 0) & (y <= ny)
    return ~inside
