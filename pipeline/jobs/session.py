"""A Ray session for whatever this process runs on Ray: the cleaning job, Ray Train, the flows.

* :func:`cluster_address`: the cluster to join (``--ray-address``, else ``RAY_ADDRESS``), with ``ray://`` (Ray
  Client, under which Ray Data and Ray Train fail) and the Jobs API's ``http://`` refused in one line;
* :func:`init_ray` / :func:`ray_session`: join that cluster or start a new in-process local Ray, which dies
  with this process even when it is killed outright (:mod:`pipeline.jobs.reaper`);
* :func:`quiet_ray_noise`: drop the lines Ray prints on every run that are not about the run.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def cluster_address(address: str | None, command: str = "clean") -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``, else None (a new local Ray); a ``ray://``
    or ``http://`` address is refused with a one-line :class:`ConfigError` saying what to use instead."""
    from pipeline.config import check_ray_address

    check_ray_address(address, command=command)
    if not address and os.environ.get("RAY_ADDRESS"):
        address = os.environ["RAY_ADDRESS"]
        check_ray_address(address, "RAY_ADDRESS", command)
    return address or None


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start a new in-process local Ray; reuse a Ray
    already initialised in this process. Returns whether this call started or connected it.

    A ``ray://`` (Ray Client) address is refused before anything starts: Ray Data does not run under
    Ray Client (``'Worker' object has no attribute 'core_worker'`` half-way through the job)."""
    import ray

    if ray.is_initialized():
        return False
    address = cluster_address(address)
    if address:
        ray.init(address=address)
    else:  # "local": a new instance, never a cluster that `ray start` left running on this machine
        ray.init(address="local", include_dashboard=False)
        _reap_local_ray()
    return True


_reaper: Any = None


def _reap_local_ray() -> None:
    """Once per process: the local Ray that this driver starts dies with it, even when it is killed outright
    (:mod:`pipeline.jobs.reaper`)."""
    global _reaper
    if _reaper is None or _reaper.poll() is not None:
        from pipeline.jobs import reaper

        _reaper = reaper.start()


@contextmanager
def ray_session(address: str | None = None) -> Iterator[bool]:
    """:func:`init_ray` for the duration of a block (which gets whether it started or joined Ray itself);
    shut down on exit only if the block started it."""
    import ray

    started = init_ray(address)
    try:
        yield started
    finally:
        if started:
            ray.shutdown()


# Lines Ray prints to the driver's stderr (from C++, so no logging filter sees them) on every run that are not
# about this run: Ray Data puts its own map function in the object store and passes it to each pool actor,
# and Ray's core worker logs that at ERROR level for any restartable actor (ray-project/ray#57733).
KNOWN_RAY_NOISE = (b"has constructor arguments in the object store and max_restarts > 0",)


@contextmanager
def quiet_ray_noise() -> Iterator[None]:
    """Drop the lines of :data:`KNOWN_RAY_NOISE` from this process's standard error (file descriptor 2)
    while the block runs; everything else passes through unchanged and at once (progress bars included).

    A pipe replaces descriptor 2 and a thread copies it to the real one. The thread stays for the life of
    the process: processes started meanwhile (a local Ray's) may still hold the pipe."""
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        yield
        return
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    def pump() -> None:
        buf = b""
        while chunk := os.read(read_end, 65536):
            buf += chunk
            while (nl := buf.find(b"\n")) >= 0:
                line, buf = buf[:nl + 1], buf[nl + 1:]
                if not any(n in line for n in KNOWN_RAY_NOISE):
                    os.write(saved, line)
            if buf and not buf.startswith(b"["):  # not the start of a Ray log line: a progress bar's update
                os.write(saved, buf)
                buf = b""
        if buf:
            os.write(saved, buf)

    threading.Thread(target=pump, name="quiet-ray-noise", daemon=True).start()
    try:
        yield
    finally:
        sys.stderr.flush()
        os.dup2(saved, 2)
