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
from pathlib import Path
from typing import Any


def cluster_address(address: str | None, command: str = "clean") -> str | None:
    """The Ray cluster to join: ``address``, else ``RAY_ADDRESS``, else None (a new local Ray); a ``ray://``
    or ``http://`` address is refused with a one-line :class:`ConfigError` saying what to use instead."""
    from pipeline.config import check_ray_address

    what = "--ray-address"
    check_ray_address(address, command=command)
    if not address and os.environ.get("RAY_ADDRESS"):
        address, what = os.environ["RAY_ADDRESS"], "RAY_ADDRESS"
        check_ray_address(address, what, command)
    if address:
        _check_answers(address, what)
    return address or None


def _check_answers(address: str, what: str) -> None:
    """A one-line :class:`ConfigError` when nothing answers at ``HOST:PORT``: ``ray.init`` would retry for minutes,
    printing a line every 5 s. ``auto`` (the address ``ray start`` recorded on this machine) is left to Ray."""
    import socket

    from pipeline.config import ConfigError

    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or not host:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=10).close()
    except OSError as exc:
        raise ConfigError(f"{what} {address}: nothing answers there ({exc.strerror or exc}): check that `ray start "
                          "--head` runs on that machine and that this is its GCS port (6379 unless --port said "
                          "otherwise)") from None


def use_the_token_at_hand() -> None:
    """Turn on Ray's token authentication for this process when a token is at hand and ``RAY_AUTH_MODE`` is
    not set. Ray 2.60's ``ray start --head`` turns it on by itself when ``~/.ray/auth_token`` exists, but a
    driver joining that head does not, and fails with "Failed to connect to Ray cluster" after 20 s of
    ``InvalidAuthToken`` lines. A driver in token mode joins a cluster without authentication as well.
    Ray reads the mode once, when it is imported: call this before ``import ray``."""
    if os.environ.get("RAY_AUTH_MODE"):
        return
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    if os.environ.get("RAY_AUTH_TOKEN") or (path and Path(path).is_file()) or (
            not path and Path("~/.ray/auth_token").expanduser().is_file()):
        os.environ["RAY_AUTH_MODE"] = "token"


def init_ray(address: str | None = None) -> bool:
    """Connect to ``address`` (else ``RAY_ADDRESS``), or start a new in-process local Ray; reuse a Ray
    already initialised in this process. Returns whether this call started or connected it.

    A ``ray://`` (Ray Client) address is refused before anything starts: Ray Data does not run under
    Ray Client (``'Worker' object has no attribute 'core_worker'`` half-way through the job). A cluster that
    cannot be reached is one :class:`~pipeline.config.ConfigError` line naming the address and the fixes."""
    if "ray" in sys.modules and sys.modules["ray"].is_initialized():
        return False
    address = cluster_address(address)
    if address and "ray" not in sys.modules:
        use_the_token_at_hand()
    import ray

    if address:
        try:
            ray.init(address=address)
        except ConnectionError as exc:
            from pipeline.config import ConfigError

            raise ConfigError(
                f"cannot join the Ray cluster at {address} ({exc}): check that `ray start --head` runs there and "
                "that this is its GCS address (HEAD:6379 unless --port said otherwise); a cluster with token "
                "authentication also needs its token here, in ~/.ray/auth_token or RAY_AUTH_TOKEN (`ray "
                "get-auth-token` on the head prints it)") from None
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
    started = init_ray(address)  # before `import ray`: see use_the_token_at_hand
    try:
        yield started
    finally:
        if started:
            import ray

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
