"""Synthetic human videos with exact ground truth for every THFM task.

    from thfm_serve.synth import render_clip, write_set
    clip = render_clip(seed=0, frames=17, height=128, width=128)   # arrays in memory
    write_set("synth", clips=100, frames=17, height=128, width=128, seed=0, workers=2)
    sample = read_clip("synth/clip_00000")   # decoded frames, camera and every task's arrays

body: the articulated body on SMPL's 24-joint skeleton and its motions; raycast: the vectorised
ray caster; scene: random scenes and the renderer; dataset: the on-disk layout (`thfm synth`).
"""

from .dataset import CAMERA_NAME, VIDEO_NAME, list_clips, read_clip, write_clip, write_set
from .scene import SynthClip, render_clip

__all__ = ["render_clip", "SynthClip", "write_clip", "write_set", "read_clip", "list_clips", "VIDEO_NAME", "CAMERA_NAME"]
