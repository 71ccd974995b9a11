"""The wheel: one top-level import name, and the Triton model sources a repository is written from."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    out = tmp_path_factory.mktemp("wheel")
    # --no-build-isolation: setuptools and wheel come from the project's virtualenv (no downloads).
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out),
                           str(ROOT)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    wheels = list(out.glob("thfm_serve-*.whl"))
    assert len(wheels) == 1, list(out.iterdir())
    return zipfile.ZipFile(wheels[0])


def test_wheel_installs_one_top_level_package(wheel):
    names = wheel.namelist()
    top = {n.split("/", 1)[0] for n in names if not n.split("/", 1)[0].endswith(".dist-info")}
    assert top == {"thfm_serve"}, top  # no bare export/ or client/ module in site-packages
    assert not any(part == "triton" for n in names for part in Path(n).parts)
    assert "thfm_serve/export/build.py" in names and "thfm_serve/client/transport.py" in names


def test_wheel_carries_every_model_source_write_repository_copies(wheel):
    names = set(wheel.namelist())
    sources = sorted(p.relative_to(ROOT / "model_repository") for p in (ROOT / "model_repository").glob("*/model.py"))
    assert sources, "no model_repository/*/model.py in the source tree"
    missing = [str(s) for s in sources if f"thfm_serve/model_repository/{s.as_posix()}" not in names]
    assert not missing, missing
    for s in sources:  # the packaged file is the committed one
        assert wheel.read(f"thfm_serve/model_repository/{s.as_posix()}") == (ROOT / "model_repository" / s).read_bytes()
