"""A local Ray dies with the driver that started it: ``python -m pipeline.jobs.reaper`` (Linux).

A driver that starts its own Ray (``jointdiff clean`` without a cluster) owns a GCS, a raylet, agents
and pool workers. Killed outright (``SIGKILL``, the OOM killer), it cannot shut them down: the raylet and
the GCS fate-share with it, but the workers finish the call they are in (and write its shard), and Ray's
dashboard and runtime-env agents stay about a minute trying to tell the dead GCS that the raylet died.

:func:`start` forks this small watcher, stdlib only, in a session of its own (Ctrl-C on the terminal
does not reach it). Every :data:`POLL_S` it notes the driver's Ray descendants (process id and start
time, so that a reused id is never taken for one); once its parent, the driver, is gone, it kills those
still alive with ``SIGKILL`` and exits. After a clean shutdown it finds nothing left to kill.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

POLL_S = 0.5


def _stat(pid: int) -> tuple[int, str] | None:
    """``(parent pid, start time)`` of a live (not zombie) process, else None."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None
    if fields[0] in (b"Z", b"X"):
        return None
    return int(fields[1]), fields[19].decode()


def _is_ray(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"ray" in f.read()
    except OSError:
        return False


def ray_descendants(root: int) -> dict[int, str]:
    """The live Ray processes below ``root`` (by parent links): ``{pid: start time}``."""
    children: dict[int, list[int]] = {}
    starts: dict[int, str] = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (st := _stat(int(name))) is not None:
            children.setdefault(st[0], []).append(int(name))
            starts[int(name)] = st[1]
    out, todo = {}, list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid in out or pid not in starts:
            continue
        if _is_ray(pid):
            out[pid] = starts[pid]
        todo.extend(children.get(pid, []))
    return out


def watch(driver: int) -> None:
    """Note ``driver``'s Ray descendants until it is gone, then kill those still alive."""
    seen: dict[int, str] = {}
    while os.getppid() == driver:
        seen.update(ray_descendants(driver))
        seen = {p: t for p, t in seen.items() if (st := _stat(p)) is not None and st[1] == t}
        time.sleep(POLL_S)
    for pid, started in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == started:  # the very process noted, not a new one with its id
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


def start() -> subprocess.Popen | None:
    """Fork the watcher for this process (None where there is no ``/proc``)."""
    if not os.path.isdir("/proc/self"):
        return None
    return subprocess.Popen([sys.executable, "-m", "pipeline.jobs.reaper", str(os.getpid())],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)


if __name__ == "__main__":
    watch(int(sys.argv[1]))
