"""A real multi-node Ray cluster on this machine for tests: a head and worker nodes, each started by
`ray start --block` in a process group of its own, on free ports, in a private temporary folder, with
a small object store.

Nodes are stopped by signalling their own process trees (never `ray stop`, which stops every Ray
process on the machine, other people's included). kill_node(i) is the fault: SIGKILL to a worker
node's whole tree, as when a machine dies.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from thfm_serve.server import free_ports

logger = logging.getLogger(__name__)

VENV_BIN = Path(sys.executable).parent
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # Ray's minimum is 75 MB; plenty for records of a few bytes
WORKER_PORTS = 16  # ports per node for Ray's worker processes


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def descendants(pid: int) -> list[int]:
    """Every process below pid (by parent links, read from /proc)."""
    kids, out, todo = _children(), [], [pid]
    while todo:
        p = todo.pop()
        for c in kids.get(p, []):
            out.append(c)
            todo.append(c)
    return out


def _kill_tree(proc: subprocess.Popen, sig: int) -> None:
    pids = [proc.pid] + descendants(proc.pid)
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass
    for p in pids:  # processes that left the group (setsid) are still below us in the tree
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _alive(pid: int) -> bool:
    """True while pid exists and is not a zombie."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


class RayCluster:
    def __init__(self, cpus_per_node: int = 1):
        self.cpus = cpus_per_node
        # Short: Ray puts Unix sockets under it, and socket paths are limited to 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
        self.nodes: list[subprocess.Popen] = []
        # The address Ray itself picks for this machine (it advertises it whatever it is told to bind).
        from ray.util import get_node_ip_address

        self.ip = get_node_ip_address()
        self.address: str | None = None
        # Ray's token authentication with a token of this cluster's own, given to every node and
        # driver through the environment (Ray's default token file is in $HOME, shared by everyone).
        self.env = dict(os.environ, RAY_USAGE_STATS_ENABLED="0", PATH=f"{VENV_BIN}:{os.environ.get('PATH', '')}",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))
        self.env.pop("RAY_ADDRESS", None)

    def _start(self, args: list[str], name: str) -> subprocess.Popen:
        ports = free_ports(6 + WORKER_PORTS)
        cmd = [str(VENV_BIN / "ray"), "start", "--block", "--disable-usage-stats", f"--num-cpus={self.cpus}",
               f"--object-store-memory={OBJECT_STORE_BYTES}", f"--node-ip-address={self.ip}",
               f"--node-manager-port={ports[0]}", f"--object-manager-port={ports[1]}",
               f"--metrics-export-port={ports[2]}", f"--runtime-env-agent-port={ports[3]}",
               f"--dashboard-agent-listen-port={ports[4]}", f"--dashboard-agent-grpc-port={ports[5]}",
               "--worker-port-list=" + ",".join(map(str, ports[6:])), *args]
        log = open(self.temp_dir / f"{name}.log", "wb")
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True)
        log.close()
        self.nodes.append(proc)
        return proc

    def start(self, workers: int = 1, timeout_s: float = 60) -> "RayCluster":
        port, client_port = free_ports(2)
        self._start(["--head", f"--port={port}", f"--ray-client-server-port={client_port}",
                     "--include-dashboard=false", f"--temp-dir={self.temp_dir}"], "head")
        self.address = f"{self.ip}:{port}"
        self._wait_nodes(1, timeout_s)
        for i in range(workers):
            self._start([f"--address={self.address}"], f"worker{i}")
        self._wait_nodes(1 + workers, timeout_s)
        return self

    def alive_nodes(self) -> int:
        code = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                "print(sum(1 for n in ray.nodes() if n['Alive']))")
        proc = subprocess.run([sys.executable, "-c", code, self.address], capture_output=True, text=True,
                              env=self.env, timeout=120)
        if proc.returncode != 0:
            return -1
        return int(proc.stdout.strip().splitlines()[-1])

    def _wait_nodes(self, n: int, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, p in enumerate(self.nodes):
                if p.poll() is not None:
                    raise RuntimeError(f"ray node {i} exited with {p.returncode}: {self.log_tail()}")
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise TimeoutError(f"{n} Ray node(s) not up in {timeout_s} s: {self.log_tail()}")

    def log_tail(self, n: int = 2000) -> str:
        out = []
        for f in sorted(self.temp_dir.glob("*.log")):
            out.append(f"--- {f.name}\n" + f.read_text(errors="replace")[-n:])
        return "\n".join(out)

    def kill_node(self, index: int) -> None:
        """SIGKILL a node's whole process tree: the node is gone, as on a machine failure."""
        if index == 0:
            raise ValueError("node 0 is the head")
        _kill_tree(self.nodes[index], signal.SIGKILL)
        self.nodes[index].wait(timeout=30)

    def pids(self) -> list[int]:
        out = []
        for p in self.nodes:
            if p.poll() is None:
                out += [p.pid] + descendants(p.pid)
        return out

    def stop(self) -> None:
        # Every process of every node, collected first: once a raylet dies its workers are re-parented
        # and no longer found below it. SIGTERM to `ray start --block` stops its node in order;
        # SIGKILL then goes to whatever is left.
        tree = {pid for p in self.nodes if p.poll() is None for pid in [p.pid] + descendants(p.pid)}
        for p in reversed(self.nodes):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)  # `ray start` stops and reaps its own processes
        deadline = time.monotonic() + 10
        for p in self.nodes:
            try:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for p in self.nodes:
            _kill_tree(p, signal.SIGKILL)
        for pid in tree:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        for p in self.nodes:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                logger.warning("ray node pid %d did not exit", p.pid)
        # SIGKILL is asynchronous: a killed process stays in /proc (running its exit, not yet a zombie)
        # for a moment, longer when it has gigabytes of memory to release. Return once every one is
        # gone or a zombie, so that a caller's check sees the end state.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(_alive(pid) for pid in tree):
            time.sleep(0.05)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "RayCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
