"""The `thfm` console command.

Each subcommand lives in its own module exposing ``register(subparsers)``, which adds a parser whose
``func`` default takes the parsed args and returns an exit code. Errors the user can cause are
ThfmError: printed as one line, exit status 2, no traceback.

The package's own subcommands are listed here; `thfm export` lives in the export toolchain (the
top-level export/ folder, which depends on this package) and registers itself through the
``thfm_serve.commands`` entry-point group in pyproject.toml, so this package never imports it.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import logging
import os
import sys

from .errors import ThfmError

logger = logging.getLogger("thfm")

COMMAND_MODULES = (
    "thfm_serve.commands.checkpoint",  # init-checkpoint
    "thfm_serve.commands.predict",  # predict (--checkpoint in-process, --url through Triton)
    "thfm_serve.commands.serve",  # serve (tritonserver on a model repository, foreground)
    "thfm_serve.commands.perf",  # perf (perf_analyzer sweep over a served model)
    "thfm_serve.commands.synth",  # synth (synthetic human clips with ground truth)
    "thfm_serve.commands.evaluate",  # eval (predictions against ground truth, the paper's metrics)
    "thfm_serve.commands.batch",  # batch (a corpus of videos on Ray through a Triton fleet)
    "thfm_serve.commands.deploy",  # deploy k8s (Kubernetes manifests for a Triton fleet)
    "thfm_serve.commands.train",  # train (THFM's recipe on clips with ground truth)
)
PLUGIN_GROUP = "thfm_serve.commands"  # export (checkpoint -> ONNX / TensorRT in a model repository)


def plugin_commands() -> list[str]:
    """Module names of the subcommands registered by installed distributions (pyproject entry points)."""
    return sorted(ep.value for ep in importlib.metadata.entry_points(group=PLUGIN_GROUP))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="thfm", description="THFM Serve: export, serve and call THFM.")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in (*COMMAND_MODULES, *plugin_commands()):
        importlib.import_module(name).register(sub)
    return parser


def setup_logging(verbose: int = 0, quiet: bool = False) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    if verbose < 2:
        # Library chatter (weight-loading progress bars, accelerate hints) is noise for a CLI user.
        # Set through the libraries' own environment switches, read when they are first imported,
        # so commands that never touch diffusers/transformers don't pay seconds to import them here.
        for var, value in (("DIFFUSERS_VERBOSITY", "error"), ("TRANSFORMERS_VERBOSITY", "error"),
                           ("HF_HUB_DISABLE_PROGRESS_BARS", "1"), ("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")):
            os.environ.setdefault(var, value)
        for noisy in ("diffusers", "transformers", "httpx", "urllib3"):
            logging.getLogger(noisy).setLevel(logging.ERROR)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.verbose, args.quiet)
    try:
        return int(args.func(args) or 0)
    except ThfmError as e:
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
