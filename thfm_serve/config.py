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

# Tasks and the clip geometry belong to the contract (thfm_serve.contract); they are imported here
# because the checkpoint config is validated against them, and re-exported for the model code.
from .contract.geometry import PATCH_SPATIAL, PIXEL_MULTIPLE, VAE_SPATIAL, VAE_TEMPORAL, check_resolution, latent_frames  # noqa: F401
from .contract.tasks import DENSE_TASKS, SPARSE_TASKS, TASKS, parse_tasks  # noqa: F401
from .contract.depth import DepthCode
from .errors import CheckpointError, ThfmError

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


@dataclass
class ThfmConfig:
    """What ``thfm/config.json`` holds."""

    tasks: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))  # task -> prompt
    joint_names: list[str] = field(default_factory=lambda: list(SMPL_JOINTS))
    frames: int = 81  # default clip length (4n+1): the model's window
    height: int = 480
    width: int = 832
    head_hidden: int = 1024  # hidden width of the keypoint MLP heads
    # How depth targets were squashed into [0, 1] (contract.depth): the code and its gain `a`, both
    # needed to invert it. Configs without `depth_encoding` predate the choice and used log1p.
    depth_log_scale: float = 0.5
    depth_encoding: str = "log1p"
    root_joint: int = 0  # 3D keypoints are relative to this joint
    text_len: int = 512  # UMT5 context length used for the cached prompt embeddings
    text_dim: int = 4096
    preset: str = "custom"
    format_version: int = 1

    @property
    def num_joints(self) -> int:
        return len(self.joint_names)

    @property
    def depth_code(self) -> DepthCode:
        return DepthCode(self.depth_encoding, self.depth_log_scale)

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
        try:
            self.depth_code
        except ThfmError as e:
            raise CheckpointError(f"thfm/config.json: {e}") from None
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
    # Sized to be trained from scratch on a 2-core CPU in a few hours (`thfm train --preset small`,
    # README): 9 frames at 128x128 are 3x16x16 latents, 192 video tokens + 9 frame tokens; a
    # 192-wide, 6-block transformer (about 4M parameters) and a base_dim-16 VAE with one res block
    # and a decoder of base_dim 32.
    "small": Preset(
        name="small",
        transformer=dict(
            patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=64, in_channels=16,
            out_channels=16, text_dim=64, freq_dim=64, ffn_dim=768, num_layers=6, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024,
        ),
        # The decoder is twice the encoder's width: it draws every dense output (limbs a few pixels
        # wide), while the encoder only has to carry the video to the transformer.
        vae=dict(base_dim=16, decoder_base_dim=32, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=1,
                 attn_scales=[], temperal_downsample=[False, True, True]),
        thfm=dict(frames=9, height=128, width=128, head_hidden=256, text_len=24, text_dim=64),
        text_encoder=dict(vocab_size=256, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
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
