"""The contract's rules and its one parser of the entry model's parameters."""

from __future__ import annotations

import pytest

from thfm_serve.contract import geometry, protocol
from thfm_serve.contract.params import Grid, Limits, read_params
from thfm_serve.contract.windows import plan_windows
from thfm_serve.errors import ShapeError, ThfmError


def test_geometry_rules_invert_each_other():
    for t in (1, 5, 9, 17, 81):
        assert geometry.video_frames(geometry.latent_frames(t)) == t
    for px in (16, 64, 480, 832):
        assert geometry.patch_pixels(geometry.patches(px)) == px
        assert geometry.latent_size(px) == 2 * geometry.patches(px)  # the 1x2x2 patch over latents
    # 81 frames at 480x832: 21 latent frames of 30x52 patches (the GenCeption recipe's 32,760 tokens).
    assert geometry.video_tokens(81, 480, 832) == 32760
    with pytest.raises(ShapeError, match="4n\\+1"):
        geometry.latent_frames(8)
    with pytest.raises(ShapeError, match="multiple of 16"):
        geometry.check_resolution(64, 72)


def test_entry_parameters_round_trip_through_the_one_parser():
    grid = Grid(17, 64, 96)
    params = {**grid.to_params(), **Limits(max_frames=50).to_params()}
    p = read_params(params)
    assert p.grid == grid and p.grid.overlap == 2  # the default for 17 frames, written down
    assert p.limits == Limits(max_frames=50)
    assert read_params({k: v for k, v in params.items() if k != protocol.PARAM_OVERLAP}).grid == grid
    with pytest.raises(ThfmError, match="no 'window_frames' parameter"):
        read_params({protocol.PARAM_HEIGHT: "64", protocol.PARAM_WIDTH: "64"})
    with pytest.raises(ShapeError, match="overlap 9 is outside 0..8"):
        read_params({**params, protocol.PARAM_OVERLAP: "9"}).grid


def test_the_served_overlap_decides_the_plan():
    # The same parameters give every path the same windows.
    grid = read_params(Grid(9, 64, 64, 3).to_params()).grid
    plan = plan_windows(20, grid.window, grid.overlap)
    assert [(w.start, w.stop) for w in plan] == [(0, 9), (6, 15), (11, 20)]
    assert [w.fade_in for w in plan] == [0, 3, 3]
