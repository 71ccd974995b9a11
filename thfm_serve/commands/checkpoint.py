"""`thfm init-checkpoint`: write a random-weight checkpoint in the real layout."""

from __future__ import annotations

import logging

from ..config import PRESETS

logger = logging.getLogger(__name__)


def register(sub) -> None:
    p = sub.add_parser(
        "init-checkpoint",
        help="write a random-weight THFM checkpoint (diffusers Wan2.1 layout + thfm/)",
        description="Random weights give meaningless outputs; the layout is the real one, so every "
        "other command takes the path a real checkpoint takes.",
    )
    p.add_argument("--preset", required=True, choices=list(PRESETS))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="same seed, same files (default 0)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import init_checkpoint

    out = init_checkpoint(args.preset, args.out, seed=args.seed)
    logger.info("wrote %s checkpoint to %s", args.preset, out)
    return 0
