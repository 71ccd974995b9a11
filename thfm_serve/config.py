"""Presets and the THFM-specific configuration stored in ``<checkpoint>/thfm/config.json``.

The Wan2.1 parts (transformer, VAE, text encoder) keep their own diffusers/transformers configs;
this file only holds what THFM adds on top: tasks and their prompts, the joint set, the learnable
token heads and the default clip geometry.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError, ShapeError, TaskError

# Task names, in the order the engine reports them. Dense tasks are decoded by the Wan VAE;
# sparse tasks come from the learnable per-frame tokens.
DENSE_TASKS = ("depth", "normals", "segmentation", "densepose")
SPARSE_TASKS = ("keypoints2d", "keypoints3d")
TASKS = DENSE_TASKS + SPARSE_TASKS

# SMPL's 24 joints (the RICH/EMDB protocols); joint 0 (pelvis) is the root for 3D keypoints.
SMPL_JOINTS = (
    "pelvis", "left_hip", "right_hip", "spine1", "left_knee", "right_knee", "spine2",
    "left_ankle", "right_ankle", "spine3", "left_foot", "right_foot", "neck", "left_collar",
    "right_collar", "head", "left_shoulder", "right_shoulder", "left_elbow", "right_elbow",
    "left_wrist", "right_wrist", "left_hand", "right_hand",
)

DEFAULT_PROMPTS = {
    "depth": "Estimate the relative depth of the person and scene in this video.",
    "normals": "Estimate the surface normals of the person in this video.",
    "segmentation": "Segment the person in this video as a soft foreground matte.",
    "densepose": "Estimate dense body surface correspondences of the person in this video.",
    "keypoints2d": "Estimate the 2D body keypoints of the person in every frame.",
    "keypoints3d": "Estimate the 3D body keypoints of the person in every frame.",
}

# Wan VAE geometry (AutoencoderKLWan): 4x in time (clips of 4n+1 frames), 8x in space; the
# transformer patchifies latents 1x2x2, so pixels must be multiples of 8*2 = 16.
VAE_TEMPORAL = 4
VAE_SPATIAL = 8
PATCH_SPATIAL = 2
PIXEL_MULTIPLE = VAE_SPATIAL * PATCH_SPATIAL


def latent_frames(frames: int) -> int:
    """T frames (4n+1) -> T' = (T-1)/4 + 1 latent frames."""
    if frames < 1 or (frames - 1) % VAE_TEMPORAL:
        raise ShapeError(f"frame count {frames} is not of the form 4n+1 (1, 5, 9, ...)")
    return (frames - 1) // VAE_TEMPORAL + 1


def check_resolution(height: int, width: int) -> None:
    if height < PIXEL_MULTIPLE or width < PIXEL_MULTIPLE:
        raise ShapeError(
            f"resolution {height}x{width} is too small: one latent patch needs at least "
            f"{PIXEL_MULTIPLE}x{PIXEL_MULTIPLE} pixels"
        )
    if height % PIXEL_MULTIPLE or width % PIXEL_MULTIPLE:
        raise ShapeError(f"resolution {height}x{width} is not a multiple of {PIXEL_MULTIPLE}")


@dataclass
class ThfmConfig:
    """What ``thfm/config.json`` holds."""

    tasks: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))  # task -> prompt
    joint_names: list[str] = field(default_factory=lambda: list(SMPL_JOINTS))
    frames: int = 81  # default clip length (4n+1): the model's window
    height: int = 480
    width: int = 832
    head_hidden: int = 1024  # hidden width of the keypoint MLP heads
    # Depth targets were squashed as d' = clip(a * log(d + 1), 0, 1); `a` is needed to invert it.
    depth_log_scale: float = 0.5
    root_joint: int = 0  # 3D keypoints are relative to this joint
    text_len: int = 512  # UMT5 context length used for the cached prompt embeddings
    text_dim: int = 4096
    preset: str = "custom"
    format_version: int = 1

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    def validate(self) -> "ThfmConfig":
        unknown = sorted(set(self.tasks) - set(TASKS))
        if unknown:
            raise CheckpointError(f"thfm/config.json names unknown tasks {unknown}; known: {list(TASKS)}")
        latent_frames(self.frames)
        check_resolution(self.height, self.width)
        if not self.joint_names:
            raise CheckpointError("thfm/config.json has an empty joint set")
        if not 0 <= self.root_joint < self.num_joints:
            raise CheckpointError(f"root_joint {self.root_joint} outside the {self.num_joints}-joint set")
        return self

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ThfmConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise CheckpointError(f"thfm/config.json has unknown keys {unknown}")
        return cls(**data).validate()

    @classmethod
    def load(cls, path: Path) -> "ThfmConfig":
        try:
            data = json.loads(Path(path).read_text())
        except FileNotFoundError:
            raise CheckpointError(f"missing {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not valid JSON: {e}") from None
        return cls.from_dict(data)


def parse_tasks(spec: str | list[str] | tuple[str, ...], available: list[str] | tuple[str, ...] = TASKS) -> list[str]:
    """'depth,keypoints2d' or ['depth', ...] or 'all' -> ordered, de-duplicated task list."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    items = [t.strip() for t in items if t.strip()]
    if not items:
        raise TaskError(f"no task given; choose from {', '.join(available)} (or 'all')")
    out: list[str] = []
    for t in items:
        if t == "all":
            continue
        if t not in TASKS:
            raise TaskError(f"unknown task {t!r}; choose from {', '.join(TASKS)} (or 'all')")
        if t not in available:
            raise TaskError(f"task {t!r} is not provided by this checkpoint (it has {', '.join(available)})")
        if t not in out:
            out.append(t)
    # 'all' may be repeated or sit next to task names (each still checked above): it means every task.
    return list(available) if "all" in items else out


# --- presets ----------------------------------------------------------------------------------
# Transformer kwargs are diffusers' WanTransformer3DModel config; VAE kwargs AutoencoderKLWan's.
# The Wan2.1 shapes come from the published diffusers configs (width/layers/heads/ffn).

@dataclass(frozen=True)
class Preset:
    name: str
    transformer: dict[str, Any]
    vae: dict[str, Any]
    thfm: dict[str, Any]
    # UMT5 encoder config for a random text encoder, or None: prompt embeddings are cached and the
    # (11 GB) text encoder is left out.
    text_encoder: dict[str, Any] | None
    instantiable: bool = True


PRESETS: dict[str, Preset] = {
    "tiny": Preset(
        name="tiny",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16,
            out_channels=16, text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        vae=dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 2, 2], num_res_blocks=1, attn_scales=[],
                 temperal_downsample=[False, True, True]),
        thfm=dict(frames=9, height=64, width=64, head_hidden=32, text_len=16, text_dim=32),
        text_encoder=dict(vocab_size=256, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                          relative_attention_num_buckets=8, relative_attention_max_distance=16,
                          feed_forward_proj="gated-gelu", dense_act_fn="gelu_new", is_gated_act=True,
                          pad_token_id=0, eos_token_id=1, decoder_start_token_id=0),
    ),
    "wan2.1-1.3b": Preset(
        name="wan2.1-1.3b",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]),
        thfm=dict(frames=81, height=480, width=832, head_hidden=1024, text_len=512, text_dim=4096),
        text_encoder=None,
    ),
    "wan2.1-14b": Preset(
        name="wan2.1-14b",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16,
            out_channels=16, text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40,
            cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        vae=dict(base_dim=96, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                 temperal_downsample=[False, True, True]),
        thfm=dict(frames=81, height=480, width=832, head_hidden=1024, text_len=512, text_dim=4096),
        text_encoder=None,
        # 14B parameters are 56 GB in fp32: known to the code for users who have the weights,
        # never instantiated with random weights on a 24 GB machine.
        instantiable=False,
    ),
}
