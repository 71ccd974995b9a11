"""perf/bench_e2e.py: the stage split from tritonserver's statistics, and a whole run on the tiny
checkpoint (pipeline and served, six tasks) whose stages add up and whose served outputs match."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from perfscripts import load_perf_script

bench = load_perf_script("bench_e2e")


def _snap(**models):
    return {"model_stats": [{"name": n, "inference_stats": {"success": {"count": str(c), "ns": str(int(ns))}}}
                            for n, (c, ns) in models.items()]}


def test_stats_snapshot_reads_the_json_form():
    got = bench.stats_snapshot(_snap(thfm=(3, 12_000_000_000), core=(0, 0)))
    assert got == {"thfm": {"count": 3, "ns": 12_000_000_000}, "core": {"count": 0, "ns": 0}}


def test_served_stages_split_one_request():
    # Before: some earlier requests. During this one: entry 10 s of which encoder 2, core 3, decoder 4.
    before = bench.stats_snapshot(_snap(thfm=(1, 5e9), vae_encoder=(1, 1e9), core=(1, 1e9), vae_decoder=(1, 2e9)))
    after = bench.stats_snapshot(_snap(thfm=(2, 15e9), vae_encoder=(2, 3e9), core=(2, 4e9), vae_decoder=(3, 6e9)))
    st = bench.served_stages(before, after, "thfm", "vae_encoder", "core", "vae_decoder", wall_s=10.5, video_s=0.25)
    assert st == pytest.approx({"video": 0.25, "encode": 2.0, "core": 3.0, "decode": 4.0, "postprocess": 1.0,
                                "wire": 0.5})
    # Whole request time = video decode + the client's wall time.
    assert sum(st.values()) == pytest.approx(10.75)


def test_served_stages_refuse_a_request_the_server_did_not_count():
    same = bench.stats_snapshot(_snap(thfm=(1, 5e9)))
    with pytest.raises(RuntimeError, match="no successful request of 'thfm'"):
        bench.served_stages(same, same, "thfm", "vae_encoder", "core", "vae_decoder", wall_s=1.0, video_s=0.0)


def test_settled_stats_wait_for_the_request_to_be_counted():
    # The response reaches the client before tritonserver counts the request: the first snapshots
    # still show the old counts, then the entry model's count lands before the decoder's.
    before = bench.stats_snapshot(_snap(thfm=(1, 5e9), vae_decoder=(1, 2e9)))
    seen = [before, before, bench.stats_snapshot(_snap(thfm=(2, 15e9), vae_decoder=(1, 2e9))),
            bench.stats_snapshot(_snap(thfm=(2, 15e9), vae_decoder=(3, 6e9)))]
    calls = []

    def snapshot():
        calls.append(1)
        return seen[min(len(calls), len(seen)) - 1]

    got = bench.settled_stats(snapshot, before, "thfm", poll_s=0.0)
    assert got["vae_decoder"]["count"] == 3 and got["thfm"]["count"] == 2
    assert len(calls) == 5  # the last state seen twice in a row
    with pytest.raises(RuntimeError, match="no successful request of 'thfm' within 0 s"):
        bench.settled_stats(lambda: before, before, "thfm", timeout_s=0.0, poll_s=0.0)


def test_speedup_target_by_machine_class():
    assert bench.speedup_target("amx") == 3.0
    assert bench.speedup_target("avx512-vnni-bf16") == 3.0
    assert bench.speedup_target("avx2-fma") == 2.0


def test_utilisation_against_the_peak_at_each_precision():
    u = bench.utilisation({"encode": 2.0, "core": 4.0, "decode": 1.0}, {"encode": 400e9, "core": 4e12, "decode": 0.0},
                          {"encode": "fp32", "core": "int8", "decode": "fp32"}, {"fp32": 400.0, "int8": 2000.0})
    assert u["encode"]["of_peak"] == pytest.approx(0.5)  # 200 GFLOP/s of 400
    assert u["core"]["of_peak"] == pytest.approx(0.5)  # 1000 GFLOP/s of 2000
    assert "decode" not in u  # no FLOPs counted: no utilisation claimed


@pytest.mark.server
@pytest.mark.timeout(900)
def test_whole_run_on_the_tiny_checkpoint(request, tiny_checkpoint, tmp_path_factory, tmp_path):
    from serverfix import exported_repo

    repo = tmp_path / "repo"
    shutil.copytree(exported_repo(request.config, tmp_path_factory, tiny_checkpoint), repo)
    out = tmp_path / "out"
    assert bench.main(["--checkpoint", str(tiny_checkpoint), "--repo", str(repo), "--runs", "2", "--warmup", "1",
                       "--matmul-size", "256", "--workdir", str(tmp_path / "work"), "--out", str(out),
                       "--name", "tiny"]) == 0
    r = json.loads((out / "tiny.json").read_text())
    assert r["tasks"] == ["depth", "normals", "segmentation", "densepose", "keypoints2d", "keypoints3d"]
    for path in ("pipeline", "served"):
        p = r[path]
        assert len(p["runs"]) == 2
        for run, total in zip(p["runs"], p["totals_s"]):
            assert sum(run.values()) == pytest.approx(total)
        for stage in ("video", "encode", "core", "decode"):
            assert p["stages_s"][stage] > 0, (path, stage)
    # The entry model's server time accounts for the client's round trip: the wire is what is left,
    # small next to the request (it can dip a hair below 0 as the server's clock stops at release).
    served = r["served"]["stages_s"]
    assert abs(served["wire"]) < 0.5 * r["served"]["median_s"], served
    assert r["served"]["precisions"] == {"vae_encoder": "fp32", "core": "fp32", "vae_decoder": "fp32"}
    # The fp32 repository serves what the fp32 pipeline computes (onnxruntime vs PyTorch).
    d = r["drift"]["tasks"]
    assert set(d) == set(r["tasks"])
    assert d["keypoints2d"]["max_px"] < 0.01 and d["keypoints3d"]["max_mm"] < 0.1
    assert d["depth"]["abs_rel"] < 1e-3 and d["normals"]["mean_deg"] < 0.5
    assert all(b["ok"] for b in r["drift"]["bounds"])
    md = (out / "tiny.md").read_text()
    assert "| VAE decode |" in md and r["machine"]["class"] in md
    # The report can be rebuilt from the JSON alone.
    (out / "tiny.md").unlink()
    assert bench.main(["--report", str(out / "tiny.json")]) == 0
    assert (out / "tiny.md").read_text() == md


def test_output_drift_units():
    from thfm_serve.export.validate import output_drift

    ref = np.zeros((2, 17, 2), np.float32)
    got = ref.copy()
    got[0, 0] = [3.0, 4.0]  # one joint 5 px off
    d = output_drift("keypoints2d", ref, got)
    assert d["max_px"] == pytest.approx(5.0) and d["mean_px"] == pytest.approx(5.0 / 34)
    d3 = output_drift("keypoints3d", np.zeros((1, 2, 3)), np.array([[[0.0, 0.0, 0.01], [0, 0, 0]]]))
    assert d3["max_mm"] == pytest.approx(10.0)
    with pytest.raises(ValueError, match="no drift metric"):
        output_drift("captions", ref, got)
