"""One DNS name -> every server behind it (client/resolve.py), as a Kubernetes headless Service answers.

No DNS server can be changed here, so the name's answer is given by a stand-in for
socket.getaddrinfo; the servers behind it are real tritonservers on two loopback addresses
(127.0.0.1 and 127.0.0.2) sharing one port, as pods behind a headless Service do.
"""

from __future__ import annotations

import logging
import socket

import numpy as np
import pytest

from serverfix import served_repo, start_server
from thfm_serve.client import ThfmClient
from thfm_serve.client.resolve import expand_urls, resolve_url
from thfm_serve.errors import ThfmError
from thfm_serve.clipgen import make_clip

FLEET = "thfm-fleet.test"
_real_getaddrinfo = socket.getaddrinfo


def _answer(records: dict[str, list[str]]):
    def fake(host, port, family=0, type=0, proto=0, flags=0):
        if host not in records:
            return _real_getaddrinfo(host, port, family, type, proto, flags)
        out = []
        for ip in records[host]:
            fam = socket.AF_INET6 if ":" in ip else socket.AF_INET
            sockaddr = (ip, port, 0, 0) if fam == socket.AF_INET6 else (ip, port)
            out.append((fam, socket.SOCK_STREAM, 6, "", sockaddr))
        return out
    return fake


def test_resolution_rules(monkeypatch):
    monkeypatch.setattr(socket, "getaddrinfo", _answer({
        FLEET: ["10.0.0.12", "10.0.0.3", "10.0.0.12"],  # a duplicate record is one server
        "one.test": ["10.0.0.7"],
        "dual.test": ["127.0.0.1", "::1"],  # one host with both families: one server
        "v6.test": ["fd00::2", "fd00::1"],
    }))
    assert resolve_url(f"{FLEET}:8001") == ["10.0.0.3:8001", "10.0.0.12:8001"]
    assert resolve_url("grpc://one.test:8001") == ["one.test:8001"]  # kept as a name
    assert resolve_url("dual.test:8001") == ["dual.test:8001"]
    assert resolve_url("v6.test:9001") == ["[fd00::1]:9001", "[fd00::2]:9001"]
    assert resolve_url("10.1.2.3:8001") == ["10.1.2.3:8001"]
    assert expand_urls([f"{FLEET}:8001", "10.0.0.3:8001", "one.test:8001"]) == [
        "10.0.0.3:8001", "10.0.0.12:8001", "one.test:8001"]
    with pytest.raises(ThfmError, match="HOST:PORT"):
        resolve_url(FLEET)


def test_unresolvable_name_is_a_clear_error():
    with pytest.raises(ThfmError, match="cannot resolve 'no-such-host.invalid'"):
        resolve_url("no-such-host.invalid:8001")


@pytest.fixture(scope="module")
def fleet(request, tmp_path_factory, tiny_checkpoint):
    """Two real servers on one port, at 127.0.0.1 and 127.0.0.2 (both loopback on Linux)."""
    from thfm_serve.server import ServerConfig, TritonServer

    repo = served_repo(request.config, tmp_path_factory, tiny_checkpoint)
    first = start_server(repo, tmp_path_factory.mktemp("fleet-a"))
    servers = [first]
    try:
        c = first.cfg
        cfg = ServerConfig(repo=repo, host="127.0.0.2", http_port=c.http_port, grpc_port=c.grpc_port,
                           metrics_port=c.metrics_port)
        second = TritonServer(cfg, log_path=tmp_path_factory.mktemp("fleet-b") / "server.log")
        second.start(timeout_s=180)
        servers.append(second)
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.mark.server
@pytest.mark.timeout(600)
def test_one_name_spreads_windows_over_every_server(fleet, monkeypatch, tmp_path, caplog):
    port = fleet[0].cfg.grpc_port
    monkeypatch.setattr(socket, "getaddrinfo", _answer({FLEET: ["127.0.0.2", "127.0.0.1"]}))
    video = tmp_path / "clip.mp4"
    make_clip(video, frames=17, height=24, width=40)  # several 5-frame windows
    urls = expand_urls([f"{FLEET}:{port}"])
    assert urls == [f"127.0.0.1:{port}", f"127.0.0.2:{port}"]
    with ThfmClient(urls) as client:
        pred = client.predict(video, "depth,keypoints2d")
    assert set(pred.requests_per_server) == set(urls) and all(n > 0 for n in pred.requests_per_server.values())
    with ThfmClient([f"127.0.0.1:{port}"]) as client:
        one = client.predict(video, "depth,keypoints2d")
    for t in one.results:
        for k, v in one.results[t].items():
            assert np.array_equal(v, pred.results[t][k])

    # `thfm predict --url NAME:PORT` takes the same route.
    from thfm_serve.cli import main

    caplog.set_level(logging.INFO, logger="thfm_serve.client.resolve")
    assert main(["predict", str(video), "--url", f"{FLEET}:{port}", "--tasks", "depth", "--out", str(tmp_path / "o")]) == 0
    assert f"{FLEET}:{port} resolves to 2 servers" in caplog.text
    with np.load(tmp_path / "o" / "depth.npz") as f:
        assert np.array_equal(f["depth"], one.results["depth"]["depth"])
