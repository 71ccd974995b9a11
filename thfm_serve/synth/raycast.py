"""A vectorised numpy ray caster for capsules, ellipsoids and planes, in the camera frame.

The camera sits at the origin looking down +z (OpenCV: x right, y down). A ray grid holds one unit
direction per sample; every primitive is intersected analytically (exact depth, normal and surface
coordinates, no meshes), and only over the rectangle of samples its bounding sphere can cover, so the
cost grows with the pixels a body covers rather than with pixels times primitives.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NEAR = 0.05  # metres: hits closer than this are ignored (the camera is never inside a body)


@dataclass
class RayGrid:
    """Sample positions xs [W'] and ys [H'] in continuous pixel coordinates (pixel (i, j) covers
    [j, j+1) x [i, i+1), so its centre is (j + 0.5, i + 0.5)) and their unit ray directions."""

    xs: np.ndarray
    ys: np.ndarray
    dirs: np.ndarray  # [H', W', 3] float64 unit vectors

    @classmethod
    def make(cls, height: int, width: int, fx: float, fy: float, cx: float, cy: float, samples: int = 1) -> "RayGrid":
        """samples x samples stratified sub-pixel positions per pixel (1: the pixel centres)."""
        sub = (np.arange(samples) + 0.5) / samples
        xs = (np.arange(width)[:, None] + sub[None, :]).reshape(-1)
        ys = (np.arange(height)[:, None] + sub[None, :]).reshape(-1)
        d = np.empty((len(ys), len(xs), 3))
        d[..., 0] = ((xs - cx) / fx)[None, :]
        d[..., 1] = ((ys - cy) / fy)[:, None]
        d[..., 2] = 1.0
        d /= np.linalg.norm(d, axis=-1, keepdims=True)
        return cls(xs=xs, ys=ys, dirs=d)


    def crop(self, rows: slice, cols: slice) -> "RayGrid":
        return RayGrid(xs=self.xs[cols], ys=self.ys[rows], dirs=self.dirs[rows, cols])


def footprint(grid: RayGrid, capsules: list, ellipsoids: list, intrinsics) -> tuple[slice, slice] | None:
    """Rows and columns of the grid that any of the primitives can cover (the union of their
    windows), or None if none is in view."""
    fx, fy, cx, cy = intrinsics
    spheres = [((pa + pb) / 2, np.linalg.norm(pb - pa) / 2 + r) for pa, pb, r, _, _ in capsules]
    spheres += [(c, float(radii.max())) for c, _, radii in ellipsoids]
    r0 = c0 = None
    for centre, radius in spheres:
        win = _window(grid, centre, radius, fx, fy, cx, cy)
        if win is None:
            continue
        rows, cols = win
        r0, r1 = (rows.start, rows.stop) if r0 is None else (min(r0, rows.start), max(r1, rows.stop))
        c0, c1 = (cols.start, cols.stop) if c0 is None else (min(c0, cols.start), max(c1, cols.stop))
    return None if r0 is None else (slice(r0, r1), slice(c0, c1))


@dataclass
class Hits:
    """Nearest hit per sample: distance along the ray (inf: none), primitive index (-1: none, planes
    come after the body primitives), unit normal and surface coordinates (u, v) in [0, 1]."""

    t: np.ndarray  # [H', W']
    prim: np.ndarray  # [H', W'] int32
    normal: np.ndarray  # [H', W', 3]
    uv: np.ndarray  # [H', W', 2]

    @classmethod
    def empty(cls, shape: tuple[int, int]) -> "Hits":
        return cls(np.full(shape, np.inf), np.full(shape, -1, np.int32), np.zeros(shape + (3,)), np.zeros(shape + (2,)))


def _window(grid: RayGrid, centre: np.ndarray, radius: float, fx: float, fy: float, cx: float, cy: float):
    """Index slices of the samples a sphere can cover (its exact projected x and y extents), or None
    if it is behind the camera; the whole grid if the camera is inside or beside it."""
    x, y, z = centre
    if z + radius <= NEAR:
        return None
    out = []
    for along, c, f, coords in ((x, cx, fx, grid.xs), (y, cy, fy, grid.ys)):
        dist = np.hypot(along, z)
        if dist <= radius or z <= 0:
            out.append(slice(0, len(coords)))
            continue
        mid, half = np.arctan2(along, z), np.arcsin(radius / dist)
        lo, hi = mid - half, mid + half
        if lo <= -np.pi / 2 + 1e-3 or hi >= np.pi / 2 - 1e-3:
            out.append(slice(0, len(coords)))
            continue
        p0, p1 = f * np.tan(lo) + c, f * np.tan(hi) + c
        i0 = int(np.searchsorted(coords, p0 - 1.0))
        i1 = int(np.searchsorted(coords, p1 + 1.0))
        if i1 <= i0:
            return None
        out.append(slice(i0, i1))
    return out[1], out[0]  # rows (y), columns (x)


def _sphere_t(d: np.ndarray, c: np.ndarray, r: float) -> np.ndarray:
    """First hit of rays from the origin along unit d [..., 3] with the sphere (c, r); inf if none."""
    b = d @ c
    h = b * b - (c @ c - r * r)
    t = b - np.sqrt(np.maximum(h, 0.0))
    return np.where((h >= 0) & (t > NEAR), t, np.inf)


def capsule(d: np.ndarray, pa: np.ndarray, pb: np.ndarray, r: float):
    """Rays from the origin along d [..., 3] against the capsule (segment pa-pb, radius r)
    -> t [...], unit normal [..., 3], u [...] (0 at pa, 1 at pb along the axis)."""
    ba = pb - pa
    baba = ba @ ba
    oa = -pa
    bard, rdoa = d @ ba, d @ oa
    baoa, oaoa = ba @ oa, oa @ oa
    a = baba - bard * bard
    b = baba * rdoa - baoa * bard
    c = baba * oaoa - baoa * baoa - r * r * baba
    h = b * b - a * c
    with np.errstate(divide="ignore", invalid="ignore"):
        t_cyl = (-b - np.sqrt(np.maximum(h, 0.0))) / a
    y = baoa + t_cyl * bard
    t_cyl = np.where((h >= 0) & (a > 1e-12) & (y > 0) & (y < baba) & (t_cyl > NEAR), t_cyl, np.inf)
    # The caps: a capsule is the union of the cylinder and two spheres, so the first hit is the nearest.
    t = np.minimum(t_cyl, np.minimum(_sphere_t(d, pa, r), _sphere_t(d, pb, r)))
    p = np.where(np.isfinite(t)[..., None], d * np.where(np.isfinite(t), t, 0.0)[..., None], 0.0)
    s = np.clip(((p - pa) @ ba) / max(baba, 1e-12), 0.0, 1.0)
    n = (p - (pa + s[..., None] * ba)) / r
    return t, n, s


def ellipsoid(d: np.ndarray, centre: np.ndarray, rot: np.ndarray, radii: np.ndarray):
    """Rays from the origin along d [..., 3] against the ellipsoid (centre, axes = columns of rot,
    semi-axes radii) -> t [...], unit normal [..., 3], local unit-sphere hit point [..., 3]."""
    to_local = rot.T / radii[:, None]  # camera -> unit-sphere coordinates
    o = to_local @ (-centre)
    dl = d @ to_local.T
    aa = np.einsum("...i,...i->...", dl, dl)
    bb = dl @ o
    cc = o @ o - 1.0
    h = bb * bb - aa * cc
    t = (-bb - np.sqrt(np.maximum(h, 0.0))) / aa
    t = np.where((h >= 0) & (t > NEAR), t, np.inf)
    pl = o + dl * np.where(np.isfinite(t), t, 0.0)[..., None]
    n = (pl / radii) @ rot.T  # gradient of |A (p - c)|^2, back in the camera frame
    n /= np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), 1e-12)
    return t, n, pl


def plane(d: np.ndarray, normal: np.ndarray, offset: float) -> np.ndarray:
    """Rays from the origin against the plane {p: normal . p = offset} -> t [...] (inf if none)."""
    dn = d @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = offset / dn
    return np.where((np.abs(dn) > 1e-9) & (t > NEAR), t, np.inf)


def cast(grid: RayGrid, capsules: list, ellipsoids: list, planes: list, intrinsics: tuple[float, float, float, float]) -> Hits:
    """Nearest hit per sample over every primitive.

    capsules: (pa, pb, r, e1, e2) with e1, e2 unit vectors perpendicular to the axis (v = angle
    around it); ellipsoids: (centre, rot, radii); planes: (normal, offset). Primitive indices in the
    result: capsules first, then ellipsoids, then planes, in the order given.
    """
    fx, fy, cx, cy = intrinsics
    shape = grid.dirs.shape[:2]
    hits = Hits.empty(shape)
    idx = len(capsules) + len(ellipsoids)
    for normal, offset in planes:  # planes span the whole image: no window
        t = plane(grid.dirs, normal, offset)
        better = t < hits.t
        hits.t[better], hits.prim[better] = t[better], idx
        # Face the camera (the origin): points on the plane have normal . p = offset.
        hits.normal[better] = -normal if offset > 0 else normal
        idx += 1
    for k, (pa, pb, r, e1, e2) in enumerate(capsules):
        win = _window(grid, (pa + pb) / 2, np.linalg.norm(pb - pa) / 2 + r, fx, fy, cx, cy)
        if win is None:
            continue
        d = grid.dirs[win]
        t, n, u = capsule(d, pa, pb, r)
        better = t < hits.t[win]
        if not better.any():
            continue
        v = np.mod(np.arctan2(n @ e2, n @ e1) / (2 * np.pi), 1.0)
        _store(hits, win, better, t, k, n, u, v)
    for k, (centre, rot, radii) in enumerate(ellipsoids):
        win = _window(grid, centre, float(radii.max()), fx, fy, cx, cy)
        if win is None:
            continue
        d = grid.dirs[win]
        t, n, pl = ellipsoid(d, centre, rot, radii)
        better = t < hits.t[win]
        if not better.any():
            continue
        u = np.clip((pl[..., 1] + 1.0) / 2.0, 0.0, 1.0)
        v = np.mod(np.arctan2(pl[..., 0], pl[..., 2]) / (2 * np.pi), 1.0)
        _store(hits, win, better, t, len(capsules) + k, n, u, v)
    return hits


def _store(hits: Hits, win, better, t, k, n, u, v) -> None:
    tw, pw, nw, uvw = hits.t[win], hits.prim[win], hits.normal[win], hits.uv[win]
    tw[better] = t[better]
    pw[better] = k
    nw[better] = n[better]
    uvw[better, 0] = u[better]
    uvw[better, 1] = v[better]
