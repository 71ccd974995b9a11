"""Write the demo clip (the project's one generated clip, thfm_serve.clipgen) as a video file:

    python -m thfm_serve.client.democlip OUT.mp4 [--frames 40] [--width 256] [--height 192] [--seed 0]

The same arguments give the same file contents, so a demo run is repeatable without shipping a video.
"""

from __future__ import annotations

import argparse
import logging
import sys

logger = logging.getLogger(__name__)


def main(argv: list[str] | None = None) -> int:
    from thfm_serve.clipgen import walking_clip
    from thfm_serve.errors import ThfmError
    from thfm_serve.video import encode_video

    p = argparse.ArgumentParser(prog="python -m thfm_serve.client.democlip", description=__doc__.split("\n\n")[0])
    p.add_argument("out", help="output video (.mp4, .mov, .mkv, .webm)")
    p.add_argument("--frames", type=int, default=40)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--height", type=int, default=192)
    p.add_argument("--fps", type=float, default=24.0)
    p.add_argument("--seed", type=int, default=0, help="which figure and background (default 0)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        encode_video(walking_clip(args.frames, args.height, args.width, args.seed), args.out, fps=args.fps)
    except (ThfmError, ValueError) as e:
        logger.error("%s", e)
        return 2
    logger.info("wrote %s (%d frames, %dx%d)", args.out, args.frames, args.width, args.height)
    return 0


if __name__ == "__main__":
    sys.exit(main())
