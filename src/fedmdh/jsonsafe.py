"""JSON read with bounds, whatever the interpreter's recursion limit is.

``json.loads`` recurses once per nesting level in C; some packages (the eth ones) raise Python's recursion
limit to 100,000, and then a document such as ``'[' * 200000 + ']' * 200000`` overflows the C stack and kills
the process (SIGSEGV) instead of raising. Every JSON document fedmdh reads from outside its own process (a
request body, a run folder's ``task.json``, a transaction log line, a blob) goes through :func:`loads` or
:func:`read_file`, which measure the nesting depth first, in one linear pass that does not recurse, and refuse
a document deeper than ``max_depth`` with :class:`JSONTooDeep` (a ``ValueError``, so callers that already catch
``json.JSONDecodeError``'s base class keep working).
"""

from __future__ import annotations

import json
import os
import re
import stat
from pathlib import Path
from typing import Any

#: deeper than any document fedmdh writes (a task manifest nests 5 levels); far below the C stack's limit
MAX_DEPTH = 64
#: the largest JSON file the tools read whole (a task.json or a blob manifest is kilobytes)
MAX_FILE_BYTES = 256 * 1024 * 1024

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_BRACKET = re.compile(r"[\[\]{}]")


class JSONTooDeep(ValueError):
    """A JSON document nests deeper than the bound."""

    def __init__(self, depth: int, max_depth: int) -> None:
        self.depth, self.max_depth = depth, max_depth
        super().__init__(f"JSON nested more than {max_depth} levels deep (at least {depth}); refused")


def depth(text: str | bytes) -> int:
    """The deepest nesting of ``[`` and ``{`` in ``text`` outside strings (0 for a scalar); no recursion."""
    if isinstance(text, (bytes, bytearray)):
        text = bytes(text).decode("utf-8", errors="replace")
    deepest = level = 0
    for m in _BRACKET.finditer(_STRING.sub('""', text)):
        if m.group() in "[{":
            level += 1
            deepest = max(deepest, level)
        else:
            level -= 1
    return deepest


def check_depth(text: str | bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`JSONTooDeep` where ``text`` nests deeper than ``max_depth``."""
    found = depth(text)
    if found > max_depth:
        raise JSONTooDeep(found, max_depth)


def loads(text: str | bytes, max_depth: int = MAX_DEPTH) -> Any:
    """``json.loads`` after :func:`check_depth`: never recurses deeper than ``max_depth``."""
    check_depth(text, max_depth)
    return json.loads(text)


def read_file(path: str | os.PathLike[str], max_depth: int = MAX_DEPTH, max_bytes: int = MAX_FILE_BYTES) -> Any:
    """Parse the JSON file at ``path``, refusing what is not a regular file (a FIFO would block the reader), a
    file larger than ``max_bytes`` and a document nested deeper than ``max_depth``.

    Raises ``OSError`` for a missing or unreadable file and ``ValueError`` (:class:`JSONTooDeep`,
    ``json.JSONDecodeError``, or one naming the kind of file) for the rest.
    """
    p = Path(path)
    st = os.stat(p)
    if not stat.S_ISREG(st.st_mode):
        raise ValueError(f"{p}: is not a regular file; refused")
    if st.st_size > max_bytes:
        raise ValueError(f"{p}: is {st.st_size:,} bytes, more than the {max_bytes:,} a JSON file may have")
    return loads(p.read_text(encoding="utf-8"), max_depth)


def open_regular(path: str | os.PathLike[str], mode: str = "r", **kwargs: Any):
    """``open(path, mode)`` that refuses what is not a regular file, checked on the opened descriptor (no race
    with a swap between a check and the open), and never blocks on a FIFO (opened non-blocking first)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ValueError(f"{path}: is not a regular file; refused")
        os.set_blocking(fd, True)
        return os.fdopen(fd, mode, **kwargs)
    except BaseException:
        os.close(fd)
        raise
