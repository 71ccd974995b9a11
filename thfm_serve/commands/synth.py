"""`thfm synth --out DIR --clips N`: render synthetic people with ground truth for every task."""

from __future__ import annotations

import logging

logger = logging.getLogger(__name__)


def register(sub) -> None:
    from ..synth.body import MOTIONS

    p = sub.add_parser("synth", help="render synthetic human clips with exact ground truth for all six tasks")
    p.add_argument("--out", required=True, help="output directory (one folder per clip)")
    p.add_argument("--clips", type=int, default=8, help="number of clips (default 8)")
    p.add_argument("--frames", type=int, default=17, help="frames per clip (default 17)")
    p.add_argument("--height", type=int, default=128, help="frame height in pixels (default 128)")
    p.add_argument("--width", type=int, default=128, help="frame width in pixels (default 128)")
    p.add_argument("--seed", type=int, default=0, help="set seed: clip i is rendered from (seed, i) (default 0)")
    p.add_argument("--fps", type=float, default=24.0, help="frame rate of the motion and the video (default 24)")
    p.add_argument("--samples", type=int, default=3,
                   help="sub-pixel rays per pixel side for colours and the soft matte (default 3: 9 rays)")
    p.add_argument("--motions", default=None,
                   help=f"comma-separated subset of {','.join(MOTIONS)} to draw from (default: all, and mixtures)")
    p.add_argument("--backgrounds", default=None, help="folder of images to use as back walls (default: procedural)")
    p.add_argument("--workers", type=int, default=1, help="render in this many processes (default 1)")
    p.add_argument("--preview", action="store_true",
                   help="also write <clip>/preview.png: frames next to their ground truth for every task")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..errors import ThfmError
    from ..synth.body import MOTIONS
    from ..synth.dataset import write_set

    motions = None
    if args.motions:
        motions = tuple(m.strip() for m in args.motions.split(",") if m.strip())
        unknown = sorted(set(motions) - set(MOTIONS))
        if unknown or not motions:
            raise ThfmError(f"--motions: unknown {unknown}; choose from {', '.join(MOTIONS)}")
    if args.samples < 1:
        raise ThfmError(f"--samples must be at least 1, got {args.samples}")
    if args.workers < 1:
        raise ThfmError(f"--workers must be at least 1, got {args.workers}")
    if not args.fps > 0:
        raise ThfmError(f"--fps must be positive, got {args.fps}")
    write_set(args.out, args.clips, args.frames, args.height, args.width, args.seed, args.fps, args.samples,
              args.backgrounds, motions, args.workers, args.preview)
    return 0
