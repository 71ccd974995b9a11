"""Articulated bodies on SMPL's 24-joint skeleton, built from capsules and ellipsoids, and their motions.

SMPL's model files are not redistributable, so the body is made of primitives hung on SMPL's
kinematic tree (config.SMPL_JOINTS, in SMPL's joint order and with SMPL's parents). World frame:
metres, y up, the floor is y = 0, a body at rest faces +z and its left side is +x (SMPL's convention).

A pose is one local rotation per joint, expressed in the parent's frame, as Euler angles
[x, y, z] in radians composed R = Ry @ Rx @ Rz; the rest pose is SMPL's T-pose. Sign conventions
(worked out once, used by every motion below): a negative x-rotation swings a hanging limb forward
(+z), a positive one backward; Rz(-a) lowers the left arm from the T-pose, Rz(+a) the right one.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..config import SMPL_JOINTS

J = {name: i for i, name in enumerate(SMPL_JOINTS)}

# SMPL's kinematic tree (its kintree_table): parent of each joint, -1 for the root (pelvis).
PARENTS = np.array([-1, 0, 0, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 9, 9, 12, 13, 14, 16, 17, 18, 19, 20, 21])

# Rest (T-pose) joint positions of an average adult, metres, feet on the floor. Approximates the
# neutral SMPL template's joint regressor output (shifted so the ankles are 7 cm above the floor).
REST = np.array([
    [0.00, 0.93, 0.00],  # pelvis
    [0.07, 0.85, 0.00], [-0.07, 0.85, 0.00],  # hips
    [0.00, 1.04, -0.01],  # spine1
    [0.10, 0.48, 0.00], [-0.10, 0.48, 0.00],  # knees
    [0.00, 1.17, 0.00],  # spine2
    [0.09, 0.08, -0.04], [-0.09, 0.08, -0.04],  # ankles
    [0.00, 1.23, 0.02],  # spine3
    [0.11, 0.02, 0.09], [-0.11, 0.02, 0.09],  # feet (toes)
    [0.00, 1.45, -0.01],  # neck
    [0.08, 1.37, 0.00], [-0.08, 1.37, 0.00],  # collars
    [0.00, 1.58, 0.03],  # head
    [0.18, 1.40, -0.01], [-0.18, 1.40, -0.01],  # shoulders
    [0.44, 1.40, -0.03], [-0.44, 1.40, -0.03],  # elbows
    [0.69, 1.40, -0.02], [-0.69, 1.40, -0.02],  # wrists
    [0.78, 1.40, -0.02], [-0.78, 1.40, -0.02],  # hands
], dtype=np.float64)

# DensePose's 24 surface parts (1-based; 0 is background). Each primitive covers a pair of parts,
# split by the sign of the surface normal along a body axis (front/back for the trunk and legs,
# outside/inside for the arms, right/left for the head), as DensePose splits its charts.
NUM_PARTS = 24
PART_NAMES = (
    "torso_back", "torso_front", "right_hand", "left_hand", "left_foot", "right_foot",
    "upper_leg_right_back", "upper_leg_left_back", "upper_leg_right_front", "upper_leg_left_front",
    "lower_leg_right_back", "lower_leg_left_back", "lower_leg_right_front", "lower_leg_left_front",
    "upper_arm_left_inside", "upper_arm_right_inside", "upper_arm_left_outside", "upper_arm_right_outside",
    "lower_arm_left_inside", "lower_arm_right_inside", "lower_arm_left_outside", "lower_arm_right_outside",
    "head_right", "head_left",
)

# Clothing regions: each primitive takes its colour and texture from one of these.
SKIN, SHIRT, SLEEVE, TROUSERS, SHOES, HAIR = range(6)


@dataclass(frozen=True)
class Prim:
    """One body primitive. kind 'capsule': a segment from joint a to joint b (b may equal a with an
    offset) of radius r; kind 'ellipsoid': centred at joint a + R_a @ offset with semi-axes `radii`
    in joint a's frame (axis 1, y, is the long axis). parts = (part if normal . axis < 0, part if
    >= 0); split is the axis in joint a's frame."""

    kind: str
    a: int
    b: int
    radius: float
    radii: tuple[float, float, float]
    offset: tuple[float, float, float]
    parts: tuple[int, int]
    split: tuple[float, float, float]
    region: int


FRONT = (0.0, 0.0, 1.0)
SIDE = (1.0, 0.0, 0.0)
UP = (0.0, 1.0, 0.0)


def _cap(a, b, r, parts, split, region, offset=(0.0, 0.0, 0.0)):
    return Prim("capsule", J[a], J[b], r, (0.0, 0.0, 0.0), offset, parts, split, region)


def _ell(a, radii, offset, parts, split, region):
    return Prim("ellipsoid", J[a], J[a], 0.0, radii, offset, parts, split, region)


@dataclass(frozen=True)
class BodyShape:
    """Proportions of one person: segment length scales and girth, drawn per clip."""

    height: float = 1.0  # overall scale of the skeleton
    legs: float = 1.0  # hip -> ankle lengths
    arms: float = 1.0  # shoulder -> hand lengths
    torso: float = 1.0  # pelvis -> neck lengths
    shoulders: float = 1.0  # collar -> shoulder widths
    girth: float = 1.0  # primitive radii
    head: float = 1.0  # head size
    long_sleeves: bool = True
    long_trousers: bool = True

    @classmethod
    def sample(cls, rng: np.random.Generator) -> "BodyShape":
        return cls(
            height=rng.uniform(0.88, 1.12), legs=rng.uniform(0.92, 1.08), arms=rng.uniform(0.92, 1.08),
            torso=rng.uniform(0.92, 1.08), shoulders=rng.uniform(0.88, 1.15), girth=rng.uniform(0.8, 1.35),
            head=rng.uniform(0.92, 1.08), long_sleeves=bool(rng.random() < 0.6),
            long_trousers=bool(rng.random() < 0.75),
        )

    def offsets(self) -> np.ndarray:
        """[24, 3] bone offsets from each joint's parent at rest (root: its rest position)."""
        off = REST.copy()
        off[1:] = REST[1:] - REST[PARENTS[1:]]
        legs = [J[n] for n in ("left_knee", "right_knee", "left_ankle", "right_ankle", "left_foot", "right_foot")]
        arms = [J[n] for n in ("left_elbow", "right_elbow", "left_wrist", "right_wrist", "left_hand", "right_hand")]
        torso = [J[n] for n in ("spine1", "spine2", "spine3", "neck", "left_collar", "right_collar")]
        off[legs] *= self.legs
        off[arms] *= self.arms
        off[torso] *= self.torso
        off[[J["left_shoulder"], J["right_shoulder"]], 0] *= self.shoulders
        off[J["head"]] *= self.head
        return off * self.height

    def primitives(self) -> list[Prim]:
        g, hd = self.girth, self.head
        sleeve = SLEEVE if self.long_sleeves else SKIN
        legwear = TROUSERS if self.long_trousers else SKIN
        return [
            # trunk: DensePose parts 1 (back) / 2 (front)
            _ell("pelvis", (0.16 * g, 0.11, 0.11 * g), (0.0, 0.0, -0.01), (1, 2), FRONT, TROUSERS),
            _ell("spine1", (0.145 * g, 0.12, 0.10 * g), (0.0, 0.06, 0.0), (1, 2), FRONT, SHIRT),
            _ell("spine3", (0.17 * g, 0.16, 0.11 * g), (0.0, 0.04, 0.0), (1, 2), FRONT, SHIRT),
            _cap("left_collar", "left_shoulder", 0.058 * g, (1, 2), FRONT, SHIRT),
            _cap("right_collar", "right_shoulder", 0.058 * g, (1, 2), FRONT, SHIRT),
            _cap("neck", "head", 0.05 * g, (1, 2), FRONT, SKIN),
            # head: 23 right / 24 left
            _ell("head", (0.085 * hd, 0.11 * hd, 0.095 * hd), (0.0, 0.06, 0.0), (23, 24), SIDE, SKIN),
            # arms: upper 15/17 left, 16/18 right; lower 19/21 left, 20/22 right (inside, outside)
            _cap("left_shoulder", "left_elbow", 0.048 * g, (15, 17), FRONT, SHIRT),
            _cap("right_shoulder", "right_elbow", 0.048 * g, (16, 18), FRONT, SHIRT),
            _cap("left_elbow", "left_wrist", 0.038 * g, (19, 21), FRONT, sleeve),
            _cap("right_elbow", "right_wrist", 0.038 * g, (20, 22), FRONT, sleeve),
            _cap("left_wrist", "left_hand", 0.036 * g, (4, 4), FRONT, SKIN),
            _cap("right_wrist", "right_hand", 0.036 * g, (3, 3), FRONT, SKIN),
            # legs: upper 7/9 right, 8/10 left; lower 11/13 right, 12/14 left (back, front)
            _cap("left_hip", "left_knee", 0.075 * g, (8, 10), FRONT, TROUSERS),
            _cap("right_hip", "right_knee", 0.075 * g, (7, 9), FRONT, TROUSERS),
            _cap("left_knee", "left_ankle", 0.055 * g, (12, 14), FRONT, legwear),
            _cap("right_knee", "right_ankle", 0.055 * g, (11, 13), FRONT, legwear),
            _cap("left_ankle", "left_foot", 0.045, (5, 5), FRONT, SHOES),
            _cap("right_ankle", "right_foot", 0.045, (6, 6), FRONT, SHOES),
        ]


# --- rotations ----------------------------------------------------------------------------------


def euler_to_matrix(e: np.ndarray) -> np.ndarray:
    """[..., 3] Euler angles (x, y, z) -> [..., 3, 3] rotation R = Ry @ Rx @ Rz."""
    cx, cy, cz = np.cos(e[..., 0]), np.cos(e[..., 1]), np.cos(e[..., 2])
    sx, sy, sz = np.sin(e[..., 0]), np.sin(e[..., 1]), np.sin(e[..., 2])
    z, o = np.zeros_like(cx), np.ones_like(cx)
    rx = np.stack([o, z, z, z, cx, -sx, z, sx, cx], -1).reshape(e.shape[:-1] + (3, 3))
    ry = np.stack([cy, z, sy, z, o, z, -sy, z, cy], -1).reshape(e.shape[:-1] + (3, 3))
    rz = np.stack([cz, -sz, z, sz, cz, z, z, z, o], -1).reshape(e.shape[:-1] + (3, 3))
    return ry @ rx @ rz


def forward_kinematics(euler: np.ndarray, root: np.ndarray, offsets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """euler [F, 24, 3] local rotations, root [F, 3] pelvis position, offsets [24, 3]
    -> joint positions [F, 24, 3] and global rotations [F, 24, 3, 3] (world frame)."""
    local = euler_to_matrix(euler)
    frames = euler.shape[0]
    rot = np.empty((frames, 24, 3, 3))
    pos = np.empty((frames, 24, 3))
    rot[:, 0], pos[:, 0] = local[:, 0], root
    for j in range(1, 24):  # SMPL orders parents before children
        p = PARENTS[j]
        rot[:, j] = rot[:, p] @ local[:, j]
        pos[:, j] = pos[:, p] + rot[:, p] @ offsets[j]
    return pos, rot


# --- motions ------------------------------------------------------------------------------------

MOTIONS = ("walk", "wave", "turn", "squat", "jump")


@dataclass(frozen=True)
class Motion:
    """What a person does: one or two of MOTIONS (a mixture adds their joint rotations), with
    amplitudes, speed and phase drawn per clip."""

    kinds: tuple[str, ...]
    speed: float  # cycles per second scale
    phase: float  # radians
    amplitude: float
    yaw: float  # initial facing, radians about +y (0: facing +z)
    turn_rate: float  # radians per second when turning
    wave_right: bool

    @classmethod
    def sample(cls, rng: np.random.Generator, kinds: tuple[str, ...] | None = None) -> "Motion":
        if kinds is None:
            if rng.random() < 0.35:  # a mixture of two different motions
                kinds = tuple(str(k) for k in rng.choice(MOTIONS, size=2, replace=False))
            else:
                kinds = (str(rng.choice(MOTIONS)),)
        unknown = set(kinds) - set(MOTIONS)
        if unknown:
            raise ValueError(f"unknown motions {sorted(unknown)}; known: {MOTIONS}")
        return cls(kinds=tuple(kinds), speed=rng.uniform(0.8, 1.25), phase=rng.uniform(0, 2 * np.pi),
                   amplitude=rng.uniform(0.75, 1.2), yaw=rng.uniform(-1.0, 1.0),
                   turn_rate=rng.choice([-1, 1]) * rng.uniform(0.8, 2.0), wave_right=bool(rng.random() < 0.6))

    def pose(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """t [F] seconds -> local euler [F, 24, 3], root translation in the floor plane [F, 3]
        (before the feet are put on the floor) and extra root height [F] (jumps)."""
        n = len(t)
        e = np.zeros((n, 24, 3))
        # Arms hang from the T-pose (about 72 degrees down) unless a motion moves them.
        e[:, J["left_shoulder"], 2] = -1.25
        e[:, J["right_shoulder"], 2] = 1.25
        e[:, J["left_elbow"], 1] = -0.15
        e[:, J["right_elbow"], 1] = 0.15
        yaw = np.full(n, self.yaw)
        ground = np.zeros((n, 3))
        lift = np.zeros(n)
        a, w = self.amplitude, 2 * np.pi * self.speed
        ph = w * t + self.phase
        for kind in self.kinds:
            if kind == "walk":
                s = np.sin(ph)
                e[:, J["left_hip"], 0] += -0.45 * a * s
                e[:, J["right_hip"], 0] += 0.45 * a * s
                e[:, J["left_knee"], 0] += 0.6 * a * np.maximum(0, np.sin(ph + 1.2))
                e[:, J["right_knee"], 0] += 0.6 * a * np.maximum(0, np.sin(ph + 1.2 + np.pi))
                e[:, J["left_shoulder"], 0] += 0.35 * a * s  # arms swing against the legs
                e[:, J["right_shoulder"], 0] += -0.35 * a * s
                e[:, J["spine2"], 1] += 0.08 * a * s
                step = 1.1 * self.speed * a  # metres per second
                ground[:, 0] += step * t * np.sin(self.yaw)
                ground[:, 2] += step * t * np.cos(self.yaw)
            elif kind == "wave":
                side, sign = ("right", 1.0) if self.wave_right else ("left", -1.0)
                osc = np.sin(2.0 * w * t + self.phase)
                e[:, J[f"{side}_shoulder"], 2] = sign * (-0.2 - 0.15 * a)  # upper arm out, above level
                e[:, J[f"{side}_elbow"], 1] = 0.0
                e[:, J[f"{side}_elbow"], 2] = sign * (-1.45 + 0.45 * a * osc)  # forearm up, waving
            elif kind == "turn":
                yaw = yaw + self.turn_rate * t
                e[:, J["spine3"], 1] += 0.15 * np.sin(ph)
            elif kind == "squat":
                d = 0.5 * (1 - np.cos(ph)) * min(a, 1.0)  # 0 standing .. 1 deep
                e[:, J["left_hip"], 0] += -1.3 * d
                e[:, J["right_hip"], 0] += -1.3 * d
                e[:, J["left_knee"], 0] += 2.1 * d
                e[:, J["right_knee"], 0] += 2.1 * d
                e[:, J["left_ankle"], 0] += -0.8 * d
                e[:, J["right_ankle"], 0] += -0.8 * d
                e[:, J["spine1"], 0] += 0.45 * d  # lean forward for balance
                e[:, J["left_shoulder"], 0] += -1.1 * d  # arms forward
                e[:, J["right_shoulder"], 0] += -1.1 * d
            elif kind == "jump":
                cyc = np.mod(ph / (2 * np.pi), 1.0)
                crouch = np.where(cyc < 0.35, np.sin(np.pi * cyc / 0.35), 0.0) * 0.6
                crouch += np.where(cyc > 0.8, np.sin(np.pi * (cyc - 0.8) / 0.2), 0.0) * 0.4
                flight = np.where((cyc >= 0.35) & (cyc <= 0.8), np.sin(np.pi * (cyc - 0.35) / 0.45), 0.0)
                for side in ("left", "right"):
                    e[:, J[f"{side}_hip"], 0] += -1.0 * crouch
                    e[:, J[f"{side}_knee"], 0] += 1.6 * crouch
                    e[:, J[f"{side}_ankle"], 0] += -0.6 * crouch
                e[:, J["spine1"], 0] += 0.3 * crouch
                e[:, J["left_shoulder"], 2] += 0.9 * flight  # arms up in the air
                e[:, J["right_shoulder"], 2] += -0.9 * flight
                lift += 0.25 * a * flight
        e[:, 0, 1] += yaw
        return e, ground, lift


@dataclass(frozen=True)
class Person:
    shape: BodyShape
    motion: Motion
    start: tuple[float, float]  # (x, z) on the floor at t = 0

    def animate(self, t: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """t [F] seconds -> joints [F, 24, 3] and global rotations [F, 24, 3, 3], world frame, with the
        lowest point of the feet on the floor (plus any jump height)."""
        euler, ground, lift = self.motion.pose(t)
        offsets = self.shape.offsets()
        root = ground + np.array([self.start[0], 0.0, self.start[1]])
        pos, rot = forward_kinematics(euler, root, offsets)
        # Feet on the floor: the lowest of the ankle/toe spheres touches y = 0.
        feet = [J[n] for n in ("left_ankle", "right_ankle", "left_foot", "right_foot")]
        low = pos[:, feet, 1].min(axis=1) - 0.045
        shift = -low + lift
        pos[:, :, 1] += shift[:, None]
        return pos, rot
