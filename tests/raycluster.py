"""Real multi-process Ray clusters for tests: ``ray start --head`` on 127.0.0.1 (and worker nodes), each in
a process group of its own, stopped by killing those groups (never ``ray stop``, which would stop every Ray
on the machine)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

VENV_BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = []
    for _ in range(n):  # ephemeral ports, outside Ray's worker port range (10002-19999)
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def path_without_venv() -> str:
    """``PATH`` without this virtualenv's ``bin``: a head started so finds the system ``python3`` first, as one
    started with ``.venv/bin/ray start --head`` from a shell where the venv is not activated does."""
    return os.pathsep.join(p for p in os.environ.get("PATH", "").split(os.pathsep)
                           if p and Path(p).resolve() != VENV_BIN.resolve())


def _proc_stats() -> Iterator[tuple[int, str, list[str]]]:
    """``(pid, command name, the fields after it)`` of every process in ``/proc/*/stat`` (state first)."""
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
        except OSError:
            continue
        yield int(p.name), stat[stat.index("(") + 1: stat.rindex(")")], stat[stat.rindex(")") + 2:].split()


def _processes_in_group(pgid: int, name: str) -> list[int]:
    return [pid for pid, comm, fields in _proc_stats() if comm == name and int(fields[2]) == pgid]


def _live_in_group(pgid: int) -> bool:
    """Whether a process of group ``pgid`` is still running (a zombie is not)."""
    return any(int(fields[2]) == pgid and fields[0] not in ("Z", "X") for _, _, fields in _proc_stats())


def _descendants(pid: int) -> list[int]:
    parents: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                stat = (p / "stat").read_text()
            except OSError:
                continue
            parents.setdefault(int(stat[stat.rindex(")") + 2:].split()[1]), []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        out += children
        todo += children
    return out


class Cluster:
    """A head (``token``: token authentication on) and optional worker nodes, all on 127.0.0.1."""

    def __init__(self, num_cpus: int = 4, token: str | None = None, project_env: bool = False,
                 system_config: dict[str, int] | None = None):
        """``system_config``: Ray settings (``RAY_<name>`` in the nodes' environment), such as how soon the head
        declares a silent node dead."""
        self.token = token
        self.tmp = Path(tempfile.mkdtemp(prefix="jd-ray-", dir="/tmp"))  # short: socket paths must fit 107 bytes
        gcs, dash, agent, client = free_ports(4)
        self.gcs = f"127.0.0.1:{gcs}"
        self.url = f"http://127.0.0.1:{dash}"
        self.env = {**os.environ, "RAY_TMPDIR": str(self.tmp),  # where `auto` finds this cluster
                    "RAY_AUTH_MODE": "token" if token else "disabled",
                    "PATH": os.environ.get("PATH", "") if project_env else path_without_venv()}
        self.env.pop("RAY_ADDRESS", None)
        self.env.update({f"RAY_{k}": str(v) for k, v in (system_config or {}).items()})
        if token:
            self.env["RAY_AUTH_TOKEN"] = token
        self.groups: list[subprocess.Popen] = []
        self.nodes: list[int] = []  # pgid of each node's processes, head first
        self._start(["--head", "--port", str(gcs), "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dash),
                     "--dashboard-agent-listen-port", str(agent), "--ray-client-server-port", str(client)],
                    num_cpus, "head")
        self._wait_for_jobs_api()

    def _start(self, args: list[str], num_cpus: int, name: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")
        proc = subprocess.Popen(
            [str(VENV_BIN / "ray"), "start", *args, "--node-ip-address", "127.0.0.1", "--num-cpus", str(num_cpus),
             "--num-gpus", "0", "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        assert proc.wait(timeout=120) == 0, (self.tmp / f"{name}.log").read_text()
        log.close()
        self.groups.append(proc)
        self.nodes.append(proc.pid)

    def _wait_for_jobs_api(self) -> None:
        deadline = time.time() + 120
        while True:  # the Jobs API answers (401 without the token) once the dashboard is up
            try:
                urllib.request.urlopen(f"{self.url}/api/version", timeout=2)
                return
            except urllib.error.HTTPError:
                return
            except OSError:
                assert time.time() < deadline, "no Ray head in 120 s:\n" + (self.tmp / "head.log").read_text()
                time.sleep(0.5)

    def add_worker(self, num_cpus: int) -> int:
        """Start a worker node with its own CPUs; returns its index in :attr:`nodes`."""
        self._start(["--address", self.gcs], num_cpus, f"worker{len(self.nodes)}")
        return len(self.nodes) - 1

    def node_id(self, index: int) -> str:
        """The Ray node id of node ``index`` (read off its raylet's command line)."""
        (raylet,) = _processes_in_group(self.nodes[index], "raylet")
        args = Path(f"/proc/{raylet}/cmdline").read_bytes().split(b"\0")
        return next(a.split(b"=", 1)[1].decode() for a in args if a.startswith(b"--node_id="))

    def kill_node(self, index: int) -> None:
        """Lose node ``index`` as a machine is lost: SIGKILL its raylet, and at once every other process of the
        node (its workers would otherwise finish the task in hand before noticing the raylet is gone)."""
        raylets = _processes_in_group(self.nodes[index], "raylet")
        workers = [p for r in raylets for p in _descendants(r)]  # started by the raylet, in groups of their own
        for pid in raylets + workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        try:
            os.killpg(self.nodes[index], signal.SIGKILL)
        except ProcessLookupError:
            pass

    def client_env(self) -> dict[str, str]:
        """The environment of a process that talks to this cluster (a driver, `jointdiff submit`)."""
        env = {**os.environ, "RAY_AUTH_MODE": "token" if self.token else "disabled", "RAY_TMPDIR": str(self.tmp)}
        env.pop("RAY_ADDRESS", None)
        if self.token:
            env["RAY_AUTH_TOKEN"] = self.token
        return env

    def stop(self) -> None:
        """SIGTERM every node's processes, SIGKILL what is left 2 s later; returns once they are gone (or after
        2 s more), then removes the cluster's folder."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pgid in reversed(self.nodes):
                try:
                    os.killpg(pgid, sig)
                except ProcessLookupError:
                    pass
            deadline = time.time() + 2
            while any(_live_in_group(pgid) for pgid in self.nodes) and time.time() < deadline:
                time.sleep(0.1)
        shutil.rmtree(self.tmp, ignore_errors=True)
