"""Greedy NMS on the prediction device (issue 15, part 2): the picks of ``extract.nms``, found in parallel.

Why: on a GPU the CPU NMS (a sort of every pixel and a walk over them) costs as much as the
network.  Exactness rests on one fact.  Let every candidate (score >= threshold) carry its rank
in ``extract.nms``'s walk (score descending, ties in raster order).  A candidate whose rank is the
best among the undecided candidates within the radius will be picked by the walk: everything
before it within the radius is already decided and was not picked (it would have suppressed it).
So each round

1. finds those peaks with a disc-shaped max filter of the ranks (max-pool over rows of the disc;
   two peaks of one round are never within the radius of each other),
2. marks them picked and suppresses the undecided candidates within the radius of them,

and the picks are exactly the walk's.  After a few rounds the undecided candidates left are few
(those whose better neighbours were all suppressed, chains in the gaps between picks); the exact
greedy walk (``extract._greedy``) finishes them on the CPU: nothing decided lies within the
radius of them, so their outcome depends only on each other.  The picks, sorted by rank, are
``extract.nms``'s in its order, with the same values.  Tested equal on random maps with ties and
plateaus, borders, radius 0 and larger than the image, and real logit maps (tests/test_nms_torch.py).
"""
from __future__ import annotations

import numpy as np

from .extract import _capped, _disc, _greedy, nms


def _row_widths(radius: float, shape: tuple[int, int]) -> list[int]:
    """Half-width of ``extract._disc`` in each row offset 0..r (the disc is symmetric in both axes)."""
    dy, dx = _disc(_capped(radius, shape))
    r = int(dy.max()) if dy.size else 0
    return [int(np.abs(dx[dy == d]).max()) for d in range(r + 1)]


def disc_max(x, widths: list[int]):
    """Max of ``x`` (H, W) over the disc of ``widths`` around each pixel (outside the image: ignored).

    Horizontal maxima of growing width (one shift per width) combined over the disc's rows:
    ~5 r elementwise ops on the device, exact.
    """

    h_img, w_img = x.shape
    out = x.clone()
    h, cur = x, 0
    for dy in range(len(widths) - 1, -1, -1):  # widths shrink with |dy|: visit rows from the edge inwards
        w = min(widths[dy], w_img - 1)
        while cur < w:
            g = h.clone()
            g[:, 1:].clamp_min_(h[:, :-1])
            g[:, :-1].clamp_min_(h[:, 1:])
            h, cur = g, cur + 1
        if dy == 0:
            out.clamp_min_(h)
        elif dy < h_img:
            out[dy:].clamp_min_(h[:-dy])
            out[:-dy].clamp_min_(h[dy:])
    return out


def _suppress(alive, picks, dy, dx, shape: tuple[int, int]) -> None:
    """Clear ``alive`` (flat bool) in the disc (offsets dy, dx) around each of ``picks`` (flat indices)."""
    ny, nx = shape
    step = max(1, (1 << 23) // max(int(dy.numel()), 1))  # bounded index memory however large the disc
    for i in range(0, int(picks.numel()), step):
        p = picks[i : i + step]
        yy = (p // nx)[:, None] + dy[None, :]
        xx = (p % nx)[:, None] + dx[None, :]
        ok = (yy >= 0) & (yy < ny) & (xx >= 0) & (xx < nx)
        alive[(yy * nx + xx)[ok]] = False


def _passes(flat, threshold: float):
    """``flat >= threshold`` with numpy's promotion (a Python float is compared in the map's dtype)."""
    import torch

    np_dtype = torch.empty(0, dtype=flat.dtype).numpy().dtype
    dt = np.result_type(np.empty(0, dtype=np_dtype), threshold)
    if dt == np_dtype:
        return flat >= float(np.asarray(threshold).astype(np_dtype))
    return flat.to(torch.from_numpy(np.empty(0, dtype=dt)).dtype) >= float(threshold)


def nms_torch(score, radius: float, threshold: float | None = None, rounds: int = 8, tail: int = 2048):
    """``extract.nms(score, radius, threshold)`` on the tensor's device: (iy, ix, values) as numpy, same order.

    ``score``: a torch tensor (H, W) (or numpy, run with torch on the CPU).  ``rounds``: at most
    this many parallel rounds; ``tail``: stop them once at most this many candidates are
    undecided; the exact greedy walk then finishes on the CPU.  A map with NaN goes to
    ``extract.nms`` as is (NaN has no place in the parallel order).
    """
    import torch

    s = score if isinstance(score, torch.Tensor) else torch.from_numpy(np.ascontiguousarray(score))
    ny, nx = s.shape
    with torch.inference_mode():
        flat = s.reshape(-1)
        if bool(torch.isnan(flat).any()):
            return nms(flat.cpu().numpy().reshape(ny, nx), radius, threshold)
        # rank = position in np.argsort(-flat, kind="stable"); + 0.0 makes -0.0 equal to 0.0 for any sort
        order = torch.sort(-(flat + 0.0), stable=True).indices
        n_c = int(_passes(flat, threshold).sum()) if threshold is not None else flat.numel()
        order = order[:n_c]
        kdt = torch.float32 if n_c < (1 << 24) else torch.float64  # ranks exact in the key
        key = torch.full((ny * nx,), float("-inf"), dtype=kdt, device=s.device)
        key[order] = -torch.arange(n_c, dtype=kdt, device=s.device)
        alive = torch.zeros(ny * nx, dtype=torch.bool, device=s.device)
        alive[order] = True
        widths = _row_widths(radius, (ny, nx))
        dy_np, dx_np = _disc(_capped(radius, (ny, nx)))
        dy = torch.from_numpy(dy_np.astype(np.int64)).to(s.device)
        dx = torch.from_numpy(dx_np.astype(np.int64)).to(s.device)
        picked = []
        left = n_c
        for _ in range(max(0, int(rounds))):
            if left <= tail:
                break
            k = torch.where(alive, key, torch.tensor(float("-inf"), dtype=kdt, device=s.device)).view(ny, nx)
            peak = (alive & (k.reshape(-1) == disc_max(k, widths).reshape(-1))).nonzero()[:, 0]
            picked.append(peak)
            _suppress(alive, peak, dy, dx, (ny, nx))  # the disc holds its centre: the peaks leave too
            left = int(alive.sum())
        rest = alive.nonzero()[:, 0]
        got = torch.cat(picked) if picked else rest[:0]
        got_rank = (-key[got]).cpu().numpy().astype(np.int64)
        rest_rank = (-key[rest]).cpu().numpy().astype(np.int64)
        rest_np = rest.cpu().numpy().astype(np.int64)
        if rest_np.size:  # the exact walk over what is undecided, in rank order
            walk = rest_np[np.argsort(rest_rank, kind="stable")]
            iy, ix, _ = _greedy(walk, np.zeros(ny * nx, dtype=np.bool_), (ny, nx), radius, None)
            tail_idx = iy * nx + ix
            tail_rank = rest_rank[np.searchsorted(rest_np, tail_idx)]  # rest is ascending (nonzero)
        else:
            tail_idx = tail_rank = np.empty(0, dtype=np.int64)
        idx = np.concatenate([got.cpu().numpy().astype(np.int64), tail_idx])
        rank = np.concatenate([got_rank, tail_rank])
        idx = idx[np.argsort(rank, kind="stable")]
        values = flat[torch.from_numpy(idx).to(s.device)].cpu().numpy()
    iy, ix = np.divmod(idx, nx)
    return iy, ix, values
