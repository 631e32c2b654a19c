"""The README's quick start, run as a user types it: the commands are read from the README's quick-start
``console`` block (not a copy of it), run one after another in an empty folder with the installed ``jointdiff``,
and each one's output is compared line by line with the lines the README shows under it.

What may differ, and only that, is masked on both sides before comparing:

- numbers (PSNR, times, sizes, counts' digits), run and ingest ids (``run-…``), timestamps, and the folder the
  block ran in (the README shows it as ``…``);
- progress bars (their last state stays on a terminal; their speeds vary): lines with ``NN%|``;
- the estimated-time line ``clean run-…: about …``, which a run prints only when it expects to take 30 s or more
  (the README's run at 50 steps may, the test's at 2 steps may not).

The test runs ``clean`` at 2 sampler steps, with the weights the tuned table gives the README's run at 50 steps
(``lambda_x`` 20, ``kappa_n`` 20), so that no note about untuned weights is printed. Each command also writes its
result as one JSON line on stdout when stdout is not a terminal (the README shows a terminal, where it does not):
the test reads it back (``corrupt`` writes none).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
from pathlib import Path

from PIL import Image

from tests.raycluster import VENV_BIN

ROOT = Path(__file__).resolve().parents[1]
JOINTDIFF = str(VENV_BIN / "jointdiff")
START, END = "<!-- --8<-- [start:quickstart] -->", "<!-- --8<-- [end:quickstart] -->"
TINY = ["--set", "sampler.steps=2", "--set", "sampler.lambda_x=20", "--set", "sampler.kappa_n=20"]
PROGRESS = re.compile(r"\d+%\|")
ESTIMATE = re.compile(r"^clean run-\S+ (about|at most) ")


def quickstart() -> list[tuple[str, list[str]]]:
    """``(command, the lines the README shows under it)`` for each ``$`` line of the quick-start block."""
    text = (ROOT / "README.md").read_text()
    block = text[text.index(START):text.index(END)]
    body = block.split("```console\n", 1)[1].split("\n```", 1)[0]
    steps: list[tuple[str, list[str]]] = []
    lines = iter(body.splitlines())
    for line in lines:
        if line.startswith("$ "):
            command = line[2:]
            while command.endswith("\\"):
                command = command[:-1] + next(lines).strip()
            steps.append((command, []))
        else:
            steps[-1][1].append(line)
    return steps


def mask(line: str, folder: str = "\0") -> str:
    line = line.replace(folder, "…")
    line = re.sub(r"\b(run|ingest)-[0-9a-f]{12}\b", r"\1-…", line)
    line = re.sub(r"\d{8}T\d+Z", "…", line)
    return re.sub(r"\d+(\.\d+)?", "N", line).rstrip()


def shown(lines: list[str]) -> list[str]:
    """The lines to compare: no progress bars, no estimate line, none empty."""
    return [line for line in lines if line.strip() and not PROGRESS.search(line) and not ESTIMATE.match(line)]


def test_the_readme_quick_start_runs_and_prints_what_the_readme_shows(tmp_path):
    steps = quickstart()
    assert steps[0][0].startswith("make install"), "the block starts by setting up .venv (the test has one)"
    assert [shlex.split(c)[1] for c, _ in steps[1:]] == ["corrupt", "ingest", "clean", "export"]
    for command, expected in steps[1:]:
        argv = shlex.split(command)
        assert argv[0] == "jointdiff"
        argv = [JOINTDIFF, *argv[1:], *(TINY if argv[1] == "clean" else [])]
        proc = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, f"{command}:\n{proc.stderr}"
        got = [mask(line, str(tmp_path)) for line in shown(proc.stderr.replace("\r", "\n").splitlines())]
        want = [mask(line) for line in shown(expected)]
        assert got == want, f"{command}: the output differs from the README's"
        if argv[1] != "corrupt":  # the result for scripts, on stdout
            assert json.loads(proc.stdout.strip().splitlines()[-1])

    photos = sorted((tmp_path / "photos").glob("*.png"))
    cleaned = sorted((tmp_path / "cleaned").glob("*.png"))
    assert len(photos) == len(cleaned) == 4
    assert len(list((tmp_path / "cleaned" / "noise").glob("*.png"))) == 4
    for a, b in zip(photos, cleaned, strict=True):
        assert a.name == b.name and Image.open(a).size == Image.open(b).size == (56, 56)
        assert Image.open(b).mode == "RGB"
