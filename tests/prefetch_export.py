"""Export the tiny checkpoint's repository at its own clip into a pytest cache folder, in a process of
its own (tests/serverfix.py: start_default_grid_prefetch says why).

    python tests/prefetch_export.py CACHE_ROOT

Writes the tiny checkpoint as conftest.tiny_checkpoint does (same preset and seed, so the same files
and hash) into a temporary folder, and exports it into CACHE_ROOT/model_repository under
CACHE_ROOT/.lock; the session's fixture then reuses it.
"""

from __future__ import annotations

import logging
import sys
import tempfile
from pathlib import Path


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if len(argv) != 1:
        logging.error("usage: prefetch_export.py CACHE_ROOT")
        return 2
    import torch

    from thfm_serve.checkpoint import init_checkpoint

    from serverfix import TINY_SEED, _export_locked

    torch.set_num_threads(1)  # the session's tests have the other core
    root = Path(argv[0])
    with tempfile.TemporaryDirectory(prefix="thfm-prefetch-") as tmp:
        checkpoint = init_checkpoint("tiny", Path(tmp) / "tiny", seed=TINY_SEED)
        _export_locked(root / "model_repository", checkpoint)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
