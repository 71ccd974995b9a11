"""The one windowing policy: cutting a clip into model windows, and stitching their results back.

The in-process pipeline, the served entry model, the ensembles and the client all plan with
`plan_windows` and stitch with `Stitcher` (through `run_windows` where one loop runs every window),
so every path gives the same answer on the same frames.

The model sees `window` frames at a time (the entry model's `window_frames`). A clip longer than
that is cut into full windows that overlap by at least `overlap` frames (default_overlap unless
told); neighbouring results are cross-faded linearly over exactly `overlap` frames so that nothing
jumps at a window seam.

Plan (N frames, window W, overlap O, stride S = W - O):
  * N <= W: one window [0, N), run as snap_frames(N) frames (the last frame repeated up to 4n+1).
  * otherwise windows start at 0, S, 2S, ... while they end before N, and one last window is
    aligned to the end, [N - W, N), so that every request is a full window (the exported VAE has a
    static frame count). Its overlap with the window before can be longer than O.
  * the hand-over from window i to window i+1 happens in a "fade zone" of O frames: the first O
    frames of window i+1 for the regular windows, the last O frames of window i before the last
    (end-aligned) window. Frames of the overlap outside the zone come from the earlier window.
  * O <= (W - 1) // 2 keeps the zones disjoint: every frame gets contributions from one window, or
    from two inside a zone, never three.

With O = 0 there is no cross-fade: windows of W frames one after another, the last aligned to the
end and only its new frames used.

Stitching is order-independent by construction: a frame outside a zone is a copy of one window's
result, and a zone frame is the sum of exactly two products a*w + b*(1-w); IEEE addition of two
terms is commutative, so the bytes do not depend on which window (or server) answered first.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from ..errors import ShapeError
from .geometry import latent_frames, snap_frames
from .tasks import OUTPUT_KEYS


@dataclass(frozen=True)
class ClipWindow:
    """One request: input frames [start, stop).

    fade_in: the first `fade_in` frames of this window are blended with the previous window (its
    weight rises linearly). fade_out: the last `fade_out` *used* frames, ending at `use_stop`, are
    blended with the next window (its weight falls). Frames [use_start, use_stop) of the input take
    a contribution from this window; frames in [start, use_start) or [use_stop, stop) are computed
    but not used (the overlap beyond a fade zone).
    """

    index: int
    start: int
    stop: int
    use_start: int
    use_stop: int
    fade_in: int
    fade_out: int

    @property
    def frames(self) -> int:
        return self.stop - self.start

    @property
    def length(self) -> int:
        """The 4n+1 frames the model runs on: the window itself, or a short clip padded up to 4n+1."""
        return snap_frames(self.frames)


def max_overlap(window: int) -> int:
    """Largest overlap for which fade zones stay disjoint (no frame blended from three windows)."""
    return max(0, (window - 1) // 2)


def default_overlap(window: int) -> int:
    """About an eighth of a window (10 of 81 frames): enough frames to hide a seam, little extra cost."""
    return min(max_overlap(window), max(1, (window - 1) // 8))


def check_overlap(window: int, overlap: int) -> int:
    """The overlap, or a ShapeError when it is outside 0..max_overlap(window)."""
    if isinstance(overlap, bool) or not isinstance(overlap, (int, np.integer)) or overlap < 0 \
            or overlap > max_overlap(window):
        raise ShapeError(
            f"overlap {overlap} is outside 0..{max_overlap(window)} for a window of {window} frames "
            "(at most half a window, so that no frame is blended from three windows)"
        )
    return int(overlap)


def plan_windows(num_frames: int, window: int, overlap: int | None = None) -> list[ClipWindow]:
    """Windows covering num_frames frames (overlap None: default_overlap); see the module docstring."""
    latent_frames(window)  # ShapeError unless 4n+1
    if num_frames < 1:
        raise ShapeError("a clip needs at least one frame")
    overlap = check_overlap(window, default_overlap(window) if overlap is None else overlap)
    if num_frames <= window:
        return [ClipWindow(0, 0, num_frames, 0, num_frames, 0, 0)]

    stride = window - overlap
    starts = []
    s = 0
    while s + window < num_frames:
        starts.append(s)
        s += stride
    starts.append(num_frames - window)  # end-aligned; > the previous start since that one ended before N

    # Fade zone between window i and i+1: [zone_start[i], zone_start[i] + overlap).
    zones = []
    for i in range(len(starts) - 1):
        if i + 1 == len(starts) - 1:
            zones.append(starts[i] + window - overlap)  # last O frames of the earlier window
        else:
            zones.append(starts[i + 1])  # first O frames of the later window (the overlap is exactly O)

    out = []
    for i, start in enumerate(starts):
        use_start = start if i == 0 else zones[i - 1]
        use_stop = num_frames if i == len(starts) - 1 else zones[i] + overlap
        out.append(ClipWindow(
            index=i,
            start=start,
            stop=start + window,
            use_start=use_start,
            use_stop=use_stop,
            fade_in=0 if i == 0 else overlap,
            fade_out=0 if i == len(starts) - 1 else overlap,
        ))
    return out


def fade_weights(overlap: int) -> np.ndarray:
    """Weight of the later window over a fade zone of `overlap` frames: 1/(O+1) .. O/(O+1).

    Neither end reaches 0 or 1, so both windows count in every zone frame, and the weights are
    symmetric: the earlier window gets exactly 1 - w, computed once here so both sides agree.
    """
    return (np.arange(1, overlap + 1, dtype=np.float64) / (overlap + 1)).astype(np.float32)


class Stitcher:
    """Accumulates per-window arrays ([frames, ...] each) into one [num_frames, ...] array.

    add() may be called in any order; the result is the same bytes whatever the order (see the
    module docstring). Memory: the output array plus nothing per window.
    """

    def __init__(self, plan: list[ClipWindow], num_frames: int):
        self.plan = plan
        self.num_frames = num_frames
        self._out: np.ndarray | None = None
        self._done: set[int] = set()

    @property
    def complete(self) -> bool:
        return len(self._done) == len(self.plan)

    def add(self, win: ClipWindow, array: np.ndarray, name: str = "output") -> None:
        array = np.asarray(array)
        if array.shape[0] != win.frames:
            raise ShapeError(
                f"{name}: the server returned {array.shape[0]} frames for window {win.index} "
                f"(frames {win.start}-{win.stop - 1}), expected {win.frames}"
            )
        if win.index in self._done:
            raise ValueError(f"{name}: window {win.index} added twice")
        if self._out is None:
            # Zeros: zone frames are built by adding two weighted terms.
            self._out = np.zeros((self.num_frames,) + array.shape[1:], dtype=array.dtype)
        elif array.shape[1:] != self._out.shape[1:] or array.dtype != self._out.dtype:
            raise ShapeError(
                f"{name}: window {win.index} came back as {array.dtype} {list(array.shape[1:])} per "
                f"frame, earlier windows as {self._out.dtype} {list(self._out.shape[1:])}"
            )
        out = self._out
        local = lambda t: t - win.start  # noqa: E731 - input frame -> index in this window
        plain_start = win.use_start + win.fade_in
        plain_stop = win.use_stop - win.fade_out
        if plain_stop > plain_start:
            out[plain_start:plain_stop] = array[local(plain_start):local(plain_stop)]
        if win.fade_in:
            w = fade_weights(win.fade_in).reshape((-1,) + (1,) * (array.ndim - 1)).astype(array.dtype)
            sl = slice(local(win.use_start), local(win.use_start) + win.fade_in)
            out[win.use_start:win.use_start + win.fade_in] += array[sl] * w
        if win.fade_out:
            # The earlier window's weight is 1 - (the later window's weight), frame by frame.
            w = (1 - fade_weights(win.fade_out)).reshape((-1,) + (1,) * (array.ndim - 1)).astype(array.dtype)
            sl = slice(local(plain_stop), local(win.use_stop))
            out[plain_stop:win.use_stop] += array[sl] * w
        self._done.add(win.index)

    def blended_frames(self) -> np.ndarray:
        """Indices of the frames that were cross-faded from two windows (every fade zone)."""
        idx = [t for win in self.plan if win.fade_in for t in range(win.use_start, win.use_start + win.fade_in)]
        return np.asarray(idx, dtype=np.int64)

    def result(self) -> np.ndarray:
        if not self.complete or self._out is None:
            missing = sorted(set(range(len(self.plan))) - self._done)
            raise ValueError(f"windows {missing} have no result yet")
        return self._out


def stitched(task: str, stitcher: Stitcher) -> np.ndarray:
    """A task's stitched array. A cross-fade of two unit normals is shorter than one: the blended
    frames are made unit normals again, as the task promises; other frames are left exactly as the
    windows gave them."""
    arr = stitcher.result()
    if task == "normals":
        idx = stitcher.blended_frames()
        if idx.size:
            n = arr[idx]
            arr[idx] = n / np.maximum(np.linalg.norm(n, axis=-1, keepdims=True), np.float32(1e-6))
    return arr


# A window's work in two halves: front(window, its frames [f, H, W, 3]) -> state (the encoder and
# core's work), back(window, state) -> {task: array [f, ...]} at the input's resolution (the
# decoder's and everything after it).
WindowFront = Callable[[ClipWindow, np.ndarray], Any]
WindowBack = Callable[[ClipWindow, Any], Mapping[str, np.ndarray]]


def run_windows(frames: np.ndarray, tasks: Sequence[str], window: int, overlap: int | None,
                front: WindowFront, back: WindowBack, log: Callable[..., None] | None = None,
                pipelined: bool = False) -> dict[str, np.ndarray]:
    """The window loop: plan, run every window, stitch -> {task: array [F, ...]} in frame order.

    The in-process pipeline, the served entry model and export validation run this loop; the
    client drives the same plan and Stitcher over the network (thfm_serve.client.core.Run).
    pipelined: the front of window i+1 runs on a worker thread while the back of window i runs on
    the caller's.

    Where the two halves use different devices or model instances (a served GPU repository: the
    decoder of one window beside the encoder and core of the next) that hides one behind the other;
    on a CPU whose cores every stage already uses it only adds contention, so callers choose.
    Results are the same either way: each window's halves see the same inputs and the stitching is
    order-independent (module docstring). At most one front runs ahead, so at most two windows'
    latents are held at once. An error in either half stops the loop and is raised as it was.
    """
    num_frames = frames.shape[0]
    plan = plan_windows(num_frames, window, overlap)
    stitchers = {t: Stitcher(plan, num_frames) for t in tasks}

    def start(win: ClipWindow) -> Any:
        if log is not None:
            log("window %d/%d: frames %d-%d", win.index + 1, len(plan), win.start, win.stop - 1)
        return front(win, frames[win.start : win.stop])

    def finish(win: ClipWindow, state: Any) -> None:
        outputs = back(win, state)
        for t in tasks:
            stitchers[t].add(win, outputs[t], OUTPUT_KEYS[t])

    if not pipelined or len(plan) == 1:
        for win in plan:
            finish(win, start(win))
    else:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="window-front") as pool:
            ahead = pool.submit(start, plan[0])
            for i, win in enumerate(plan):
                state = ahead.result()
                if i + 1 < len(plan):
                    ahead = pool.submit(start, plan[i + 1])
                try:
                    finish(win, state)
                except BaseException:
                    ahead.cancel()  # a front already running finishes (the pool waits) and is dropped
                    raise
    return {t: stitched(t, stitchers[t]) for t in tasks}
