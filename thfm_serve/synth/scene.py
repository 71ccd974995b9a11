"""Random scenes (people, camera path, lights, backgrounds, occluders) and their rendering into a clip
with exact ground truth for every THFM task.

Everything is drawn from one numpy Generator seeded per clip, so a clip depends only on its seed and
its size: `render_clip(seed, ...)` twice gives identical arrays.

Ground-truth conventions (camera.json repeats them):
- camera frame: OpenCV, x right, y down, z forward, metres; normals and 3D keypoints use it;
- pixels: continuous coordinates, pixel (row i, column j) covers [j, j+1) x [i, i+1), so its centre is
  (j + 0.5, i + 0.5), the convention of processing.sparse_output (normalised x times the width);
- depth: metric z-depth (not distance along the ray) at each pixel centre; every pixel hits the floor,
  the back wall or a body, so it is finite everywhere;
- segmentation: alpha = the fraction of samples x samples sub-pixel rays that hit a person;
- densepose: iuv = (part / 24, u, v), part in DensePose's 24-part numbering (body.PART_NAMES, 0 on the
  background), u along the limb (0 at the proximal joint) or up the trunk/head, v around it;
- keypoints: the first person's SMPL joints (the one the clip is about); a joint is visible when it
  projects into the image and the surface seen at its pixel is that person's, no more than
  VISIBLE_MARGIN in front of the joint (else something, possibly the person's own body, hides it).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from ..config import SMPL_JOINTS, SPARSE_TASKS
from .body import HAIR, NUM_PARTS, SHIRT, SHOES, SKIN, SLEEVE, TROUSERS, BodyShape, Motion, Person
from .raycast import RayGrid, cast, footprint

VISIBLE_MARGIN = 0.15  # metres: a joint lies inside the body, up to about this far behind its skin
MAX_PEOPLE = 2


@dataclass(frozen=True)
class Material:
    """Albedo of a surface: two colours mixed by a pattern over its (u, v) or world coordinates."""

    base: np.ndarray  # [3] in [0, 1]
    other: np.ndarray  # [3]
    pattern: str  # solid | stripes | checks | noise | image
    freq: float
    noise: np.ndarray  # [g, g] smooth random field in [0, 1] (pattern 'noise')
    image: np.ndarray | None = None  # [h, w, 3] float in [0, 1] (pattern 'image')

    @classmethod
    def sample(cls, rng: np.random.Generator, base: np.ndarray | None = None, patterns=("solid", "stripes", "checks", "noise")) -> "Material":
        base = rng.uniform(0.05, 0.95, 3) if base is None else base
        return cls(base=base, other=np.clip(base * rng.uniform(0.3, 1.6) + rng.uniform(-0.2, 0.2, 3), 0, 1),
                   pattern=str(rng.choice(patterns)), freq=float(rng.uniform(3, 12)), noise=rng.random((6, 6)))

    def albedo(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """u, v [...] -> [..., 3] colours; coordinates may exceed [0, 1] (planes tile)."""
        if self.pattern == "image" and self.image is not None:
            h, w = self.image.shape[:2]
            return self.image[(np.mod(v, 1.0) * (h - 1)).astype(int), (np.mod(u, 1.0) * (w - 1)).astype(int)]
        if self.pattern == "stripes":
            p = (np.sin(2 * np.pi * self.freq * u) > 0).astype(np.float64)
        elif self.pattern == "checks":
            p = np.mod(np.floor(self.freq * u) + np.floor(self.freq * v), 2.0)
        elif self.pattern == "noise":
            p = _bilinear_wrap(self.noise, u * 2, v * 2)
        else:
            return np.broadcast_to(self.base, u.shape + (3,))
        return self.base + (self.other - self.base) * p[..., None]


def _bilinear_wrap(grid: np.ndarray, u: np.ndarray, v: np.ndarray) -> np.ndarray:
    g0, g1 = grid.shape
    x, y = np.mod(u, 1.0) * g1, np.mod(v, 1.0) * g0
    x0, y0 = np.floor(x).astype(int), np.floor(y).astype(int)
    fx, fy = x - x0, y - y0
    x0, y0, x1, y1 = x0 % g1, y0 % g0, (x0 + 1) % g1, (y0 + 1) % g0
    top = grid[y0, x0] * (1 - fx) + grid[y0, x1] * fx
    bottom = grid[y1, x0] * (1 - fx) + grid[y1, x1] * fx
    return top * (1 - fy) + bottom * fy


SKIN_TONES = np.array([[0.96, 0.80, 0.69], [0.90, 0.72, 0.58], [0.78, 0.57, 0.42], [0.62, 0.43, 0.30],
                       [0.45, 0.30, 0.20], [0.30, 0.20, 0.14]])


def _outfit(rng: np.random.Generator) -> dict[int, Material]:
    skin = SKIN_TONES[rng.integers(len(SKIN_TONES))] * rng.uniform(0.9, 1.08)
    shirt = Material.sample(rng)
    return {
        SKIN: Material.sample(rng, base=np.clip(skin, 0, 1), patterns=("solid",)),
        SHIRT: shirt,
        SLEEVE: shirt,
        TROUSERS: Material.sample(rng, patterns=("solid", "solid", "stripes", "noise")),
        SHOES: Material.sample(rng, base=rng.uniform(0.02, 0.5) * np.ones(3), patterns=("solid",)),
        HAIR: Material.sample(rng, base=rng.uniform(0.02, 0.45) * np.array([1.0, 0.8, 0.6]), patterns=("solid", "noise")),
    }


@dataclass
class Scene:
    """Everything a clip shows, drawn from one seed."""

    people: list[Person]
    outfits: list[dict[int, Material]]
    fov_x: float  # radians
    cam_distance: float  # horizontal distance from the tracked target, metres
    cam_height: float
    cam_azimuth: float
    cam_orbit: float  # radians per second
    cam_dolly: float  # relative distance change per second
    cam_shake: np.ndarray  # [2, 3]: amplitude, frequency of a small hand-held wobble
    follow: float  # 0: the camera aims at the start position, 1: it tracks the first person
    wall_distance: float  # the back wall is the plane z = -wall_distance
    floor: Material
    wall: Material
    wall_scale: float
    light_dir: np.ndarray  # [3] unit, world frame, towards the light
    light: float
    ambient: float
    tint: np.ndarray  # [3]
    occluder: tuple[np.ndarray, np.ndarray, float] | None  # capsule (a, b, radius), world frame
    occluder_material: Material | None
    noise_sigma: float
    meta: dict = field(default_factory=dict)

    @classmethod
    def sample(cls, rng: np.random.Generator, backgrounds: list[np.ndarray] | None = None,
               motions: tuple[str, ...] | None = None, people: int | None = None, aspect: float = 1.0) -> "Scene":
        """aspect: height / width of the frames, so that framing holds for portrait and landscape."""
        draw = 2 if rng.random() < 0.3 else 1  # drawn even when fixed, so other draws stay the same
        n_people = draw if people is None else people
        if n_people not in (1, MAX_PEOPLE):
            raise ValueError(f"people must be 1 or {MAX_PEOPLE}, got {people}")
        people = [Person(BodyShape.sample(rng), Motion.sample(rng, motions), (0.0, 0.0))]
        if n_people == 2:
            side = rng.choice([-1.0, 1.0])
            people.append(Person(BodyShape.sample(rng), Motion.sample(rng, motions),
                                 (float(side * rng.uniform(0.9, 1.6)), float(rng.uniform(-1.2, 0.6)))))
        fov_x = float(np.deg2rad(rng.uniform(40, 65)))
        # Full body in view most of the time; sometimes a closer, cropped framing.
        framing = rng.uniform(0.5, 0.85) if rng.random() < 0.2 else rng.uniform(0.95, 1.35)
        # the narrower of the two fields of view decides how far back a 1.8 m person fits
        cam_distance = float(framing * 1.1 / (np.tan(fov_x / 2) * min(1.0, aspect)))
        wall = Material.sample(rng)
        if backgrounds:
            img = backgrounds[rng.integers(len(backgrounds))]
            wall = Material(wall.base, wall.other, "image", 1.0, wall.noise, image=img)
        occluder = None
        if rng.random() < 0.2:
            frac = rng.uniform(0.35, 0.6)  # of the way from the person to the camera
            az = rng.uniform(-0.4, 0.4)
            along = np.array([np.sin(az), 0.0, np.cos(az)]) * cam_distance * frac
            lateral = np.array([np.cos(az), 0.0, -np.sin(az)]) * rng.uniform(-0.5, 0.5)
            base = along + lateral
            if rng.random() < 0.5:  # a pillar
                occluder = (base, base + np.array([0, rng.uniform(1.2, 2.6), 0]), float(rng.uniform(0.08, 0.22)))
            else:  # a rail across the legs
                h = rng.uniform(0.4, 1.0)
                half = np.array([np.cos(az), 0.0, -np.sin(az)]) * rng.uniform(0.5, 1.5)
                occluder = (base + half + [0, h, 0], base - half + [0, h, 0], float(rng.uniform(0.05, 0.15)))
        elev, azim = rng.uniform(0.4, 1.3), rng.uniform(-np.pi, np.pi)
        return cls(
            people=people, outfits=[_outfit(rng) for _ in people], fov_x=fov_x, cam_distance=cam_distance,
            cam_height=float(rng.uniform(0.7, 2.0)), cam_azimuth=float(rng.uniform(-0.5, 0.5)),
            cam_orbit=float(rng.uniform(-0.3, 0.3)), cam_dolly=float(rng.uniform(-0.08, 0.08)),
            cam_shake=np.stack([rng.uniform(0, 0.02, 3), rng.uniform(0.5, 2.0, 3)]),
            follow=float(rng.uniform(0.5, 1.0)), wall_distance=float(rng.uniform(1.5, 4.0)),
            floor=Material.sample(rng, patterns=("solid", "checks", "noise", "stripes")), wall=wall,
            wall_scale=float(rng.uniform(0.3, 1.5)),
            light_dir=np.array([np.cos(elev) * np.sin(azim), np.sin(elev), np.cos(elev) * np.cos(azim)]),
            light=float(rng.uniform(0.5, 0.85)), ambient=float(rng.uniform(0.25, 0.45)),
            tint=rng.uniform(0.9, 1.1, 3), occluder=occluder,
            occluder_material=Material.sample(rng) if occluder is not None else None,
            noise_sigma=float(rng.uniform(0.0, 0.012)),
            meta={"people": n_people, "motions": [list(p.motion.kinds) for p in people],
                  "occluder": None if occluder is None else ("pillar" if occluder[0][1] == 0 else "rail"),
                  "background": wall.pattern},
        )

    def cameras(self, t: np.ndarray, pelvis: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """t [F], first person's pelvis [F, 3] -> world-to-camera rotations [F, 3, 3] and camera
        centres [F, 3] (OpenCV axes)."""
        target = pelvis[0] + self.follow * (pelvis - pelvis[0])
        target = target * np.array([1.0, 0.0, 1.0]) + np.array([0.0, 1.0, 0.0]) * (0.6 * pelvis[:, 1:2] + 0.3)
        az = self.cam_azimuth + self.cam_orbit * t
        dist = self.cam_distance * (1 + self.cam_dolly * t)
        centre = target + np.stack([dist * np.sin(az), np.full_like(t, 0.0), dist * np.cos(az)], -1)
        centre[:, 1] = self.cam_height
        amp, freq = self.cam_shake
        centre = centre + amp * np.sin(2 * np.pi * freq * t[:, None] + np.arange(3))
        fwd = target - centre
        fwd /= np.linalg.norm(fwd, axis=-1, keepdims=True)
        right = np.cross(fwd, [0.0, 1.0, 0.0])
        right /= np.linalg.norm(right, axis=-1, keepdims=True)
        down = np.cross(fwd, right)
        return np.stack([right, down, fwd], axis=1), centre


@dataclass
class SynthClip:
    """One rendered clip and its ground truth, in the engine's output layouts."""

    frames: np.ndarray  # uint8 [F, H, W, 3]
    depth: np.ndarray  # float32 [F, H, W], metres (z)
    normals: np.ndarray  # float32 [F, H, W, 3], unit, camera frame
    alpha: np.ndarray  # float32 [F, H, W] in [0, 1]
    iuv: np.ndarray  # float32 [F, H, W, 3] in [0, 1]
    keypoints2d: np.ndarray  # float32 [F, 24, 2], pixels (x, y)
    visibility: np.ndarray  # bool [F, 24]
    keypoints3d: np.ndarray  # float32 [F, 24, 3], metres, camera frame, root-relative
    root: np.ndarray  # float32 [F, 3], the root joint (pelvis) in the camera frame, metres
    camera: dict
    fps: float

    def results(self) -> dict[str, dict[str, np.ndarray]]:
        """{task: arrays} with the keys `thfm predict` writes (processing.task_result), plus the
        joints' visibility in keypoints2d and the root's camera-frame position in keypoints3d."""
        from ..processing import task_result

        arrays = {"depth": self.depth, "normals": self.normals, "segmentation": self.alpha, "densepose": self.iuv,
                  "keypoints2d": self.keypoints2d, "keypoints3d": self.keypoints3d}
        out = {t: task_result(t, a, list(SMPL_JOINTS) if t in SPARSE_TASKS else None) for t, a in arrays.items()}
        out["keypoints2d"]["visibility"] = self.visibility
        out["keypoints3d"]["root"] = self.root
        return out


def _perp_frame(axis: np.ndarray, split: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unit e1 (split made perpendicular to axis) and e2 = axis x e1."""
    a = axis / max(np.linalg.norm(axis), 1e-12)
    e1 = split - (split @ a) * a
    if np.linalg.norm(e1) < 1e-6:
        e1 = np.cross(a, [1.0, 0.0, 0.0]) if abs(a[0]) < 0.9 else np.cross(a, [0.0, 1.0, 0.0])
    e1 /= np.linalg.norm(e1)
    return e1, np.cross(a, e1)


def render_clip(seed: int | np.random.SeedSequence, frames: int = 17, height: int = 128, width: int = 128,
                fps: float = 24.0, samples: int = 3, backgrounds: list[np.ndarray] | None = None,
                motions: tuple[str, ...] | None = None, people: int | None = None) -> SynthClip:
    """Render one clip of `frames` frames at height x width, with samples x samples rays per pixel for
    the colours and the matte (plus one at each pixel centre for the other ground truth). motions
    restricts the motions drawn; people fixes the number of people (1 or 2; default: drawn)."""
    if frames < 1 or height < 8 or width < 8:
        raise ValueError(f"a clip needs at least 1 frame of 8x8 pixels, got {frames} frames of {height}x{width}")
    if samples < 1:
        raise ValueError(f"samples must be >= 1, got {samples}")
    if not (np.isfinite(fps) and fps > 0):
        raise ValueError(f"fps must be positive, got {fps}")
    rng = np.random.default_rng(seed)
    scene = Scene.sample(rng, backgrounds, motions, people, aspect=height / width)
    t = np.arange(frames) / fps
    posed = [p.animate(t) for p in scene.people]
    rots, centres = scene.cameras(t, posed[0][0][:, 0])
    fx = fy = width / 2 / np.tan(scene.fov_x / 2)
    cx, cy = width / 2, height / 2
    intr = (fx, fy, cx, cy)
    centre_grid = RayGrid.make(height, width, fx, fy, cx, cy, 1)
    sub_grid = RayGrid.make(height, width, fx, fy, cx, cy, samples)
    prims = [p.shape.primitives() for p in scene.people]

    out = {k: [] for k in ("frames", "depth", "normals", "alpha", "iuv", "kp2d", "vis", "kp3d", "root")}
    for f in range(frames):
        R, C = rots[f], centres[f]
        caps, ells, meta = [], [], []  # meta per primitive: (person, parts, split (camera), material, is_head)
        for pi, (person, (pos, grot)) in enumerate(zip(scene.people, posed)):
            scale = person.shape.height
            for prim in prims[pi]:
                ra = R @ grot[f, prim.a]  # joint frame -> camera
                split = ra @ np.array(prim.split)
                mat = scene.outfits[pi][prim.region]
                if prim.kind == "capsule":
                    pa = R @ (pos[f, prim.a] - C)
                    pb = R @ (pos[f, prim.b] - C)
                    if prim.a == prim.b:
                        pb = pa + ra @ (np.array(prim.offset) * scale)
                    e1, e2 = _perp_frame(pb - pa, split)
                    caps.append((pa, pb, prim.radius * scale, e1, e2))
                    meta.append(("c", pi, prim.parts, split, mat, False))
                else:
                    centre = R @ (pos[f, prim.a] - C) + ra @ (np.array(prim.offset) * scale)
                    ells.append((centre, ra, np.array(prim.radii) * scale))
                    meta.append(("e", pi, prim.parts, split, mat, prim.parts == (23, 24)))
        if scene.occluder is not None:
            a, b, r = scene.occluder
            pa, pb = R @ (a - C), R @ (b - C)
            e1, e2 = _perp_frame(pb - pa, R @ np.array([0.0, 0.0, 1.0]))
            caps.append((pa, pb, r, e1, e2))
            meta.append(("c", -1, (0, 0), np.zeros(3), scene.occluder_material, False))
        # Index order in cast(): capsules, then ellipsoids, then the planes.
        meta = [m for m in meta if m[0] == "c"] + [m for m in meta if m[0] == "e"]
        floor_n, wall_n = R @ np.array([0.0, 1.0, 0.0]), R @ np.array([0.0, 0.0, 1.0])
        planes = [(floor_n, float(-np.array([0.0, 1.0, 0.0]) @ C)),
                  (wall_n, float(-scene.wall_distance - np.array([0.0, 0.0, 1.0]) @ C))]
        person_of = np.array([m[1] for m in meta] + [-1, -1])

        hc = cast(centre_grid, caps, ells, planes, intr)

        # --- ground truth at the pixel centres
        depth = hc.t * centre_grid.dirs[..., 2]
        part = np.zeros((height, width), np.int32)
        part_flat, normal_flat = part.reshape(-1), hc.normal.reshape(-1, 3)
        for k, idx in _groups(hc.prim, len(meta)):
            m = meta[k]
            if m[1] >= 0:
                part_flat[idx] = np.where(normal_flat[idx] @ m[3] >= 0, m[2][1], m[2][0])
        iuv = np.zeros((height, width, 3))
        body = part > 0
        iuv[..., 0] = part / NUM_PARTS
        iuv[body, 1:] = hc.uv[body]

        # --- colours and matte: sub-pixel samples over the pixels the people can cover, the centre
        # sample elsewhere (no person's edge there to antialias; an occluder's edges outside it stay
        # aliased)
        colour = _shade(hc, centre_grid, meta, scene, R, C, posed, f)
        alpha = np.zeros((height, width))
        box = footprint(centre_grid, caps[:-1] if scene.occluder is not None else caps, ells, intr)
        if box is not None:
            rows, cols = box
            s = samples
            sub = sub_grid.crop(slice(rows.start * s, rows.stop * s), slice(cols.start * s, cols.stop * s))
            hs = cast(sub, caps, ells, planes, intr)
            h_box, w_box = rows.stop - rows.start, cols.stop - cols.start
            shaded = _shade(hs, sub, meta, scene, R, C, posed, f)
            colour[rows, cols] = shaded.reshape(h_box, s, w_box, s, 3).mean(axis=(1, 3))
            alpha[rows, cols] = (person_of[hs.prim] >= 0).reshape(h_box, s, w_box, s).mean(axis=(1, 3))
        colour = colour + rng.normal(0.0, scene.noise_sigma, colour.shape)

        # --- keypoints of the first person
        joints = (posed[0][0][f] - C) @ R.T  # [24, 3] camera frame
        x = fx * joints[:, 0] / joints[:, 2] + cx
        y = fy * joints[:, 1] / joints[:, 2] + cy
        inside = (joints[:, 2] > 0) & (x >= 0) & (x < width) & (y >= 0) & (y < height)
        col = np.clip(np.floor(x), 0, width - 1).astype(int)
        row = np.clip(np.floor(y), 0, height - 1).astype(int)
        seen = (person_of[hc.prim[row, col]] == 0) & (depth[row, col] >= joints[:, 2] - VISIBLE_MARGIN)
        out["frames"].append(np.clip(np.round(colour * 255), 0, 255).astype(np.uint8))
        out["depth"].append(depth)
        out["normals"].append(hc.normal)
        out["alpha"].append(alpha)
        out["iuv"].append(iuv)
        out["kp2d"].append(np.stack([x, y], -1))
        out["vis"].append(inside & seen)
        out["kp3d"].append(joints - joints[0])
        out["root"].append(joints[0])

    camera = {
        "width": width, "height": height, "fps": fps, "frames": frames,
        "fx": fx, "fy": fy, "cx": cx, "cy": cy,
        "K": [[fx, 0.0, cx], [0.0, fy, cy], [0.0, 0.0, 1.0]],
        "world_to_camera": [np.concatenate([np.concatenate([R, (-R @ C)[:, None]], 1), [[0, 0, 0, 1]]]).tolist()
                            for R, C in zip(rots, centres)],
        "camera_frame": "opencv: x right, y down, z forward; metres",
        "world_frame": "y up, floor at y = 0",
        "pixel_convention": "continuous: pixel (row i, column j) has its centre at (j + 0.5, i + 0.5)",
        "depth": "z-depth in metres at pixel centres",
        "densepose": f"iuv = (part / {NUM_PARTS}, u, v), DensePose's 24 parts, 0 = background",
        "keypoints_person": 0,
        "samples_per_pixel": samples * samples,
        "scene": scene.meta,
    }
    f32 = np.float32
    return SynthClip(
        frames=np.stack(out["frames"]), depth=np.stack(out["depth"]).astype(f32),
        normals=np.stack(out["normals"]).astype(f32), alpha=np.stack(out["alpha"]).astype(f32),
        iuv=np.stack(out["iuv"]).astype(f32), keypoints2d=np.stack(out["kp2d"]).astype(f32),
        visibility=np.stack(out["vis"]), keypoints3d=np.stack(out["kp3d"]).astype(f32),
        root=np.stack(out["root"]).astype(f32), camera=camera, fps=fps,
    )


def _groups(prim: np.ndarray, count: int):
    """Flat sample indices grouped by primitive: yields (k, indices) for k < count that were hit.
    One sort instead of one full-grid comparison per primitive."""
    flat = prim.reshape(-1)
    idx = np.flatnonzero((flat >= 0) & (flat < count))
    idx = idx[np.argsort(flat[idx], kind="stable")]
    keys = flat[idx]
    bounds = np.searchsorted(keys, np.arange(count + 1))
    for k in range(count):
        if bounds[k + 1] > bounds[k]:
            yield k, idx[bounds[k]:bounds[k + 1]]


def _shade(hits, grid: RayGrid, meta, scene: Scene, R, C, posed, f) -> np.ndarray:
    """[H', W', 3] colours in [0, 1]: albedo x (ambient + sky + key light), a soft contact shadow under
    each person on the floor."""
    shape = hits.t.shape
    n_body = len(meta)
    albedo = np.zeros((hits.t.size, 3))
    shadow = np.ones(hits.t.size)
    uv = hits.uv.reshape(-1, 2)
    for k, idx in _groups(hits.prim, n_body + 2):
        if k < n_body:
            m = meta[k]
            u, v = uv[idx, 0], uv[idx, 1]
            col = m[4].albedo(u, v)
            if m[5]:  # hair on the top and back of the head
                hair = (u > 0.62) | ((u > 0.35) & (np.abs(v - 0.5) < 0.22))
                col = np.where(hair[:, None], scene.outfits[m[1]][HAIR].albedo(u, v), col)
            albedo[idx] = col
            continue
        # floor (k == n_body) or back wall: textured in world coordinates
        w = (hits.t.reshape(-1)[idx, None] * grid.dirs.reshape(-1, 3)[idx]) @ R + C  # X_w = R^T X_c + C
        if k == n_body:
            albedo[idx] = scene.floor.albedo(w[:, 0] * scene.wall_scale / 2, w[:, 2] * scene.wall_scale / 2)
            for pos, _ in posed:
                d2 = (w[:, 0] - pos[f, 0, 0]) ** 2 + (w[:, 2] - pos[f, 0, 2]) ** 2
                shadow[idx] *= 1 - 0.45 * np.exp(-d2 / 0.12)
        else:
            albedo[idx] = scene.wall.albedo(w[:, 0] * scene.wall_scale / 2, -w[:, 1] * scene.wall_scale / 2)
    light = R @ scene.light_dir
    up = R @ np.array([0.0, 1.0, 0.0])
    n = hits.normal.reshape(-1, 3)
    shade = scene.ambient + 0.15 * (n @ up + 1) / 2 + scene.light * np.maximum(n @ light, 0)
    return np.clip(albedo * (shade * shadow)[:, None] * scene.tint, 0.0, 1.0).reshape(shape + (3,))
