"""The contract's rules and its one parser of the entry model's parameters."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from thfm_serve.contract import geometry, protocol
from thfm_serve.contract.params import Grid, Limits, read_params
from thfm_serve.contract.windows import plan_windows, run_windows
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


def test_window_pipeline_flag_is_parsed_strictly():
    params = Grid(9, 64, 64).to_params()
    assert read_params(params).window_pipeline is False  # absent: one window after another
    assert read_params({**params, protocol.PARAM_WINDOW_PIPELINE: "1"}).window_pipeline is True
    assert read_params({**params, protocol.PARAM_WINDOW_PIPELINE: "false"}).window_pipeline is False
    with pytest.raises(ThfmError, match="'window_pipeline' is 'yes'; use 1 or 0"):
        read_params({**params, protocol.PARAM_WINDOW_PIPELINE: "yes"})


def _split_window_work(events: list, gate: threading.Event | None = None):
    """front/back halves that record their order; with a gate, the back of window 0 waits for the
    front of window 1 to have started (it can only pass if the two overlap)."""

    def front(win, part):
        events.append(("front", win.index, threading.current_thread().name))
        if gate is not None and win.index == 1:
            gate.set()
        return part.astype(np.float32) * 2.0

    def back(win, state):
        if gate is not None and win.index == 0:
            assert gate.wait(timeout=30), "the next window's front did not start while this window's back ran"
        events.append(("back", win.index, threading.current_thread().name))
        return {"depth": state[..., 0]}

    return front, back


def test_pipelined_windows_overlap_and_give_the_same_stitched_result():
    frames = np.random.default_rng(0).integers(0, 256, (20, 6, 5, 3)).astype(np.uint8)
    seq_events, pipe_events = [], []
    seq = run_windows(frames, ["depth"], 9, 3, *_split_window_work(seq_events))
    pipe = run_windows(frames, ["depth"], 9, 3, *_split_window_work(pipe_events, threading.Event()), pipelined=True)
    np.testing.assert_array_equal(pipe["depth"], seq["depth"])
    # The independent reference: frames x 2, channel 0 (the cross-fade of identical values is exact
    # up to the fade weights' float sum).
    np.testing.assert_allclose(seq["depth"], frames[..., 0].astype(np.float32) * 2.0, rtol=1e-6)
    assert [e[:2] for e in seq_events] == [("front", 0), ("back", 0), ("front", 1), ("back", 1),
                                            ("front", 2), ("back", 2)]
    # Pipelined: fronts on the worker thread, backs on the caller's, each back after its own front.
    assert {e[2] for e in pipe_events if e[0] == "back"} == {threading.current_thread().name}
    assert all(e[2].startswith("window-front") for e in pipe_events if e[0] == "front")
    order = [e[:2] for e in pipe_events]
    assert all(order.index(("front", i)) < order.index(("back", i)) for i in range(3))


def test_pipelined_windows_raise_the_failing_half_error():
    frames = np.zeros((20, 4, 4, 3), np.uint8)

    def front(win, part):
        if win.index == 2:
            raise ShapeError("window 2 is bad")
        return part

    backs = []

    def back(win, state):
        backs.append(win.index)
        return {"depth": state[..., 0].astype(np.float32)}

    with pytest.raises(ShapeError, match="window 2 is bad"):
        run_windows(frames, ["depth"], 9, 3, front, back, pipelined=True)
    assert backs == [0, 1]  # the windows before the failing one were finished, no later one
