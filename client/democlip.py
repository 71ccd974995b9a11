"""A procedurally drawn clip of a walking, waving stick figure, for demos and smoke tests:

    python -m thfm_serve.client.democlip OUT.mp4 [--frames 40] [--width 256] [--height 192]

The same arguments give the same file contents (no randomness), so a demo run is repeatable without
shipping a video.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys

import numpy as np

logger = logging.getLogger(__name__)


def _figure_points(t: float, cx: float, ground: float, leg: float) -> dict[str, tuple[float, float]]:
    """Joint positions of a walking figure at phase t (radians), centred at x=cx, feet on `ground`;
    `leg` is the length of one leg segment (the figure is about 4.5 of them tall)."""
    swing = math.sin(t)
    hip = (cx, ground - 2 * leg)
    knee_l = (hip[0] + 0.35 * leg * swing, hip[1] + leg)
    knee_r = (hip[0] - 0.35 * leg * swing, hip[1] + leg)
    foot_l = (knee_l[0] + 0.25 * leg * max(swing, -0.2), ground)
    foot_r = (knee_r[0] - 0.25 * leg * max(-swing, -0.2), ground)
    neck = (cx, hip[1] - 1.5 * leg)
    head = (cx, neck[1] - 0.45 * leg)
    shoulder = (cx, neck[1] + 0.15 * leg)
    # Left arm waves overhead, right arm swings against the legs.
    wave = math.sin(2.5 * t)
    elbow_l = (shoulder[0] + 0.6 * leg, shoulder[1] - 0.4 * leg)
    hand_l = (elbow_l[0] + 0.3 * leg * wave, elbow_l[1] - 0.6 * leg)
    elbow_r = (shoulder[0] - 0.25 * leg * swing, shoulder[1] + 0.7 * leg)
    hand_r = (elbow_r[0] - 0.3 * leg * swing, elbow_r[1] + 0.6 * leg)
    return dict(hip=hip, knee_l=knee_l, knee_r=knee_r, foot_l=foot_l, foot_r=foot_r, neck=neck, head=head,
                shoulder=shoulder, elbow_l=elbow_l, hand_l=hand_l, elbow_r=elbow_r, hand_r=hand_r)


_LIMBS = (("hip", "knee_l"), ("knee_l", "foot_l"), ("hip", "knee_r"), ("knee_r", "foot_r"), ("hip", "neck"),
          ("shoulder", "elbow_l"), ("elbow_l", "hand_l"), ("shoulder", "elbow_r"), ("elbow_r", "hand_r"))


def demo_frames(frames: int = 40, width: int = 256, height: int = 192) -> np.ndarray:
    """uint8 [frames, height, width, 3]: sky-to-floor gradient, a floor line, and the figure walking
    left to right (it wraps around)."""
    from PIL import Image, ImageDraw

    if frames < 1 or width < 16 or height < 16:
        raise ValueError("a demo clip needs at least 1 frame of 16x16 pixels")
    y = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    sky = np.array([120, 170, 230], np.float32)
    floor = np.array([90, 80, 70], np.float32)
    horizon = 0.78
    base = np.where(y < horizon, sky * (1 - 0.4 * y), floor * (1.2 - 0.3 * y))
    base = np.broadcast_to(base, (height, width, 3)).astype(np.uint8)
    ground = horizon * height + 0.08 * height
    leg = 0.16 * height
    line = max(2, height // 32)
    out = np.empty((frames, height, width, 3), np.uint8)
    for i in range(frames):
        img = Image.fromarray(base.copy())
        draw = ImageDraw.Draw(img)
        cx = (0.15 + 0.7 * (i / max(1, frames - 1))) * width
        p = _figure_points(i * 0.45, cx, ground, leg)
        for a, b in _LIMBS:
            draw.line([p[a], p[b]], fill=(240, 90, 60), width=line)
        r = 0.35 * leg
        hx, hy = p["head"]
        draw.ellipse([hx - r, hy - r, hx + r, hy + r], fill=(250, 210, 170), outline=(60, 40, 30), width=line // 2)
        # A shadow under the feet gives depth models something to agree with.
        draw.ellipse([cx - 0.6 * leg, ground - 0.08 * leg, cx + 0.6 * leg, ground + 0.08 * leg],
                     fill=(60, 55, 50))
        out[i] = np.asarray(img)
    return out


def main(argv: list[str] | None = None) -> int:
    from thfm_serve.errors import ThfmError
    from thfm_serve.video import encode_video

    p = argparse.ArgumentParser(prog="python -m thfm_serve.client.democlip", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output video (.mp4, .mov, .mkv, .webm)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--fps", type=float, default=24.0)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        encode_video(demo_frames(args.frames, args.width, args.height), args.out, fps=args.fps)
    except (ThfmError, ValueError) as e:
        logger.error("%s", e)
        return 2
    logger.info("wrote %s (%d frames, %dx%d)", args.out, args.frames, args.width, args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
