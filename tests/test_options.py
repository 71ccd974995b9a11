"""One options object per stage, built by the CLI from its parsed arguments."""

from __future__ import annotations

from dataclasses import fields

import pytest

from thfm_serve.cli import build_parser
from thfm_serve.errors import ThfmError
from thfm_serve.options import ExportOptions, PredictOptions, ServeOptions


def _args(*argv):
    return build_parser().parse_args(list(argv))


@pytest.mark.parametrize("cls,argv", [
    (ExportOptions, ["export", "--checkpoint", "ck", "--repo", "r"]),
    (ServeOptions, ["serve", "--repo", "r"]),
    (PredictOptions, ["predict", "v.mp4", "--checkpoint", "ck", "--out", "o"]),
])
def test_every_field_comes_from_a_flag(cls, argv):
    """A field with no flag of the same destination would silently keep its default."""
    args = vars(_args(*argv))
    missing = [f.name for f in fields(cls) if f.name not in args and f.name != "limits"]
    assert missing == []


def test_export_options_from_flags():
    opts = ExportOptions.from_args(_args("export", "--checkpoint", "ck", "--repo", "r", "--precision", "int8",
                                         "--frames", "9", "--only", "core", "--no-engine",
                                         "--max-request-frames", "120", "--max-in-flight", "3"))
    assert (opts.precision, opts.frames, opts.only, opts.no_engine) == ("int8", 9, ["core"], True)
    assert opts.limits == {"max_frames": 120, "max_in_flight": 3}
    kw = opts.export_kwargs()
    assert kw["build_engine"] is False and kw["models"] == ["core"] and "calibration_clips" not in kw
    with pytest.raises(ThfmError, match="unknown precision 'fp4'"):
        ExportOptions("ck", "r", precision="fp4").validate()
    with pytest.raises(ThfmError, match="max_frames must be a positive integer"):
        ExportOptions("ck", "r", limits={"max_frames": 0}).validate()
    with pytest.raises(ThfmError, match="--no-configs"):
        ExportOptions("ck", "r", no_configs=True, limits={"max_frames": 5}).validate()


def test_serve_options_make_the_server_config():
    opts = ServeOptions.from_args(_args("serve", "--repo", "r", "--grpc-port", "9001", "--host", "0.0.0.0"))
    cfg = opts.validate().server_config()
    assert (str(cfg.repo), cfg.host, cfg.grpc_port, cfg.http_port) == ("r", "0.0.0.0", 9001, 8000)
    with pytest.raises(ThfmError, match="--start-timeout"):
        ServeOptions("r", start_timeout=0).validate()


def test_predict_options_check_the_combination():
    opts = PredictOptions.from_args(_args("predict", "v.mp4", "--url", "h:1", "--url", "h:2", "--out", "o",
                                          "--overlap", "2"))
    assert opts.url == ("h:1", "h:2") and opts.served and opts.overlap == 2
    with pytest.raises(ThfmError, match="--prompt works only in-process"):
        PredictOptions("v", "o", url=("h:1",), prompt=("depth=x",)).validate()
    with pytest.raises(ThfmError, match="--bf16"):
        PredictOptions("v", "o", url=("h:1",), bf16=True).validate()
    with pytest.raises(ThfmError, match="TASK=TEXT"):
        PredictOptions("v", "o", checkpoint="ck", prompt=("depth",)).validate()
    with pytest.raises(ThfmError, match="exactly one of --checkpoint"):
        PredictOptions("v", "o").validate()
    assert PredictOptions("v", "o", checkpoint="ck", prompt=("depth=a=b",)).prompts == {"depth": "a=b"}
    with pytest.raises(ThfmError, match="--window 17 differs from the served model's 9"):
        PredictOptions("v", "o", url=("h:1",), window=17).check_served_grid(9, 64, 64)
