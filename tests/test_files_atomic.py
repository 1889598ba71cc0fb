"""A process killed (-9) while it writes leaves the previous version or the new one, never half of one:
the writes a node's state folder and a run's best models go through (real processes, real kills)."""

from __future__ import annotations

import random
import signal
import subprocess
import sys
import time

WRITER = r"""
import itertools, sys
from pathlib import Path
from fedmdh.files import atomic_write_bytes, replace_dir

target, kind = Path(sys.argv[1]), sys.argv[2]
SIZE = 4 << 20
for i in itertools.count(1):
    mark = bytes([i % 251])
    if kind == "file":
        atomic_write_bytes(target, mark * SIZE)
    else:
        def build(folder, mark=mark):
            folder.mkdir()
            for name in ("state.npz", "model.pt", "info.json"):
                (folder / name).write_bytes(mark * SIZE)
        replace_dir(target, build)
    print(i, flush=True)
"""

SIZE = 4 << 20


def _kill_while_writing(target, kind: str, trials: int = 6) -> list[int]:
    """Start the writer, let it finish at least one version, kill it at a random moment; returns
    how many versions each run reported finished."""
    rng = random.Random(7)
    finished = []
    for _ in range(trials):
        proc = subprocess.Popen([sys.executable, "-c", WRITER, str(target), kind], stdout=subprocess.PIPE, text=True)
        try:
            first = proc.stdout.readline()  # one whole version exists
            assert first.strip(), "the writer did not write"
            time.sleep(rng.uniform(0.0, 0.3))
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=30)
        finished.append(int(first))
        _check_whole(target, kind)
    return finished


def _check_whole(target, kind: str) -> None:
    if kind == "file":
        data = target.read_bytes()
        assert len(data) == SIZE and data.count(data[:1]) == SIZE, "a half-written file"
    else:
        files = sorted(p.name for p in target.iterdir())
        assert files == ["info.json", "model.pt", "state.npz"]
        marks = set()
        for p in target.iterdir():
            data = p.read_bytes()
            assert len(data) == SIZE and data.count(data[:1]) == SIZE, f"{p.name} half written"
            marks.add(data[:1])
        assert len(marks) == 1, "files of two versions in one folder"


def test_a_file_write_killed_midway_leaves_a_whole_version(tmp_path):
    target = tmp_path / "state.npz"
    assert len(_kill_while_writing(target, "file")) == 6


def test_a_folder_replacement_killed_midway_leaves_a_whole_version(tmp_path):
    target = tmp_path / "best"
    _kill_while_writing(target, "folder")
    # what a kill leaves behind besides the current version is only hidden leftovers, never the target
    visible = [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")]
    assert visible == ["best"] and target.is_symlink()


def test_a_plain_write_killed_midway_is_caught_by_the_check(tmp_path):
    """The check above can fail: a non-atomic writer killed mid-write leaves a short file."""
    target = tmp_path / "plain.bin"
    script = ("import sys, itertools\nfrom pathlib import Path\np = Path(sys.argv[1])\n"
              "for i in itertools.count(1):\n"
              "    with p.open('wb') as fh:\n"
              "        for _ in range(64):\n"
              "            fh.write(bytes([i % 251]) * (SIZE // 64)); fh.flush()\n"
              "    print(i, flush=True)\n").replace("SIZE", str(SIZE))
    caught = 0
    for _ in range(6):
        proc = subprocess.Popen([sys.executable, "-c", script, str(target)], stdout=subprocess.PIPE, text=True)
        proc.stdout.readline()
        time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        try:
            _check_whole(target, "file")
        except AssertionError:
            caught += 1
    assert caught >= 1
