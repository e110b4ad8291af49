"""No tracked file holds a merge-conflict block (the README once carried one through several commits)."""
from __future__ import annotations

import subprocess

from conftest import ROOT

# built from halves so that this file holds no marker line itself
MARKER_PREFIXES = ("<" * 7 + " ", ">" * 7 + " ")
SEPARATOR = "=" * 7


def marker_lines(text: str) -> list[int]:
    """1-based numbers of the lines that git's conflict markers start (or that are its separator)."""
    return [number for number, line in enumerate(text.splitlines(), 1)
            if line.startswith(MARKER_PREFIXES) or line == SEPARATOR]


def test_marker_lines_by_example():
    block = ["ours", MARKER_PREFIXES[0] + "HEAD", "a", SEPARATOR, "b", MARKER_PREFIXES[1] + "teacher", "after"]
    assert marker_lines("\n".join(block)) == [2, 4, 6]
    # a longer rule, an indented or mid-line marker, or a bare run of "<" are ordinary text
    assert marker_lines("\n".join(["=" * 8, " " + SEPARATOR, "x " + MARKER_PREFIXES[0], "<" * 7])) == []


def test_no_tracked_file_holds_a_merge_conflict_marker():
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
    found = []
    for name in filter(None, tracked.stdout.split("\0")):
        path = ROOT / name
        if name.endswith(".rst") or not path.is_file():  # reST titles may be underlined with exactly 7 "="
            continue
        data = path.read_bytes()
        if b"\0" in data:  # binary
            continue
        found += [f"{name}:{line}" for line in marker_lines(data.decode("utf-8", errors="replace"))]
    assert not found, f"merge-conflict markers at {', '.join(found)}: resolve the conflict"
