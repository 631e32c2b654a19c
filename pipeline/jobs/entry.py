"""The entry point of a job submitted with ``jointdiff submit``: ``python3 -m pipeline.jobs.entry KIND ARGS``.

Standard library only, so that it runs, and says what is wrong, on a cluster whose Python lacks jointdiff's
requirements. ``jointdiff submit`` ships the ``pipeline`` package itself (runtime env ``py_modules``), so the
code is always there; its requirements (torch, Ray, pyarrow...) must come from the cluster. Ray runs a job's
entry point with the ``python3`` on the head's ``PATH``, which need not be the Python that runs Ray (a head
started as ``.venv/bin/ray start --head`` without activating the venv finds the system Python first). So:

1. if this Python has the requirements, run the job: :func:`pipeline.jobs.clean.main` (``jointdiff clean ARGS``
   on Ray), :func:`pipeline.jobs.train_prior.main` (``jointdiff train ARGS`` on Ray Train, two workers unless
   ``--workers`` says otherwise) or :func:`pipeline.jobs.learn.main` (``jointdiff learn-prior ARGS``, without
   Prefect);
2. else, on Linux, find the Python that runs Ray's workers on this node (the raylet's
   ``--python_worker_command``) and run the job with it, once;
3. else print one line naming the Python and the missing packages, and what to do; exit 2.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

# import name -> distribution name (what to install)
REQUIREMENTS = {"numpy": "numpy", "torch": "torch", "pyarrow": "pyarrow", "fsspec": "fsspec", "pydantic": "pydantic",
                "yaml": "PyYAML", "PIL": "pillow", "safetensors": "safetensors", "skimage": "scikit-image",
                "ray": "ray", "tqdm": "tqdm"}
KINDS = ("clean", "train", "learn-prior")
_REEXEC = "JOINTDIFF_ENTRY_REEXEC"


def missing_requirements() -> list[str]:
    """The distributions of jointdiff's requirements that this Python cannot import."""
    return [dist for mod, dist in REQUIREMENTS.items() if importlib.util.find_spec(mod) is None]


def ray_worker_python(proc: Path = Path("/proc")) -> str | None:
    """The Python that this node's raylet starts workers with (Linux; None where it cannot be found)."""
    try:
        pids = [p for p in proc.iterdir() if p.name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        try:
            args = (pid / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        for a in args:
            if a.startswith(b"--python_worker_command="):
                exe = a.split(b"=", 1)[1].split(b" ", 1)[0].decode(errors="replace")
                if os.access(exe, os.X_OK):
                    return exe
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in KINDS:
        print(f"usage: python3 -m pipeline.jobs.entry {{{','.join(KINDS)}}} ARGS", file=sys.stderr)
        return 2
    missing = missing_requirements()
    if missing:
        other = ray_worker_python()
        # paths, not their targets: a virtualenv's python3 is a link to the very interpreter that lacks them
        if other and os.environ.get(_REEXEC) != "1" and os.path.abspath(other) != os.path.abspath(sys.executable):
            print(f"jointdiff job: {sys.executable} lacks {', '.join(missing)}; running the job with Ray's own Python, "
                  f"{other}", file=sys.stderr)
            os.environ[_REEXEC] = "1"
            os.execv(other, [other, "-m", "pipeline.jobs.entry", *argv])
        print(f"jointdiff job: the cluster's Python ({sys.executable}) lacks {', '.join(missing)}: install jointdiff's "
              "requirements on every node (pip install jointdiff) and start Ray from that environment, or run the "
              "cluster from the jointdiff image (deploy/docker/Dockerfile)", file=sys.stderr)
        return 2
    kind, args = argv[0], argv[1:]
    if kind == "learn-prior":
        from pipeline.jobs.learn import main as learn_main

        return learn_main(args)  # the EM job (pipeline.jobs.learn), without Prefect
    if kind == "train":
        from pipeline.jobs.train_prior import main as train_main

        return train_main(args)  # always on Ray Train
    from pipeline.jobs.clean import main as clean_main

    return clean_main(args)


if __name__ == "__main__":
    sys.exit(main())
