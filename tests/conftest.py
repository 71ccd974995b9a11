"""Shared fixtures: a tiny random-weight checkpoint written by the project's own command, and the
optional real sample videos (../shared/samples, absent on a fresh clone: tests using them skip)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SAMPLES = REPO_ROOT.parent / "shared" / "samples"


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from thfm_serve.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("ck") / "tiny", seed=0)


@pytest.fixture(scope="session")
def tiny_pipeline(tiny_checkpoint):
    from thfm_serve.pipeline import ThfmPipeline

    return ThfmPipeline.from_checkpoint(tiny_checkpoint)


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    if not SAMPLES.is_dir():
        pytest.skip(f"sample videos not present at {SAMPLES}")
    return SAMPLES


@pytest.fixture(scope="session", autouse=True)
def _private_cache(tmp_path_factory):
    """The exports of a test session cache this machine's matmul peak (thfm_serve.matmul_peak) in a
    folder of their own: a figure measured while tests load the machine must not reach the user's cache."""
    patch = pytest.MonkeyPatch()
    patch.setenv("THFM_CACHE_DIR", str(tmp_path_factory.mktemp("thfm-cache")))
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _quiet_libraries():
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    yield


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the tables tests left for the end of the run (tests/serverfix.py: record), e.g. the
    catalogue of bad inputs with each case's outcome."""
    from serverfix import write_tables

    write_tables(terminalreporter, config)
