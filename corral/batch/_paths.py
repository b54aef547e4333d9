"""Where a batch may write: checks made before anything is sent, so a slip never costs a run.

The output must be a regular file (or not exist yet) in a directory that exists and is
writable, and must not be the input: ``-o requests.jsonl`` would read every request as done,
``-o /dev/full`` would swallow results, ``-o /dev/stdout | cat`` would block the writer.
"""

from __future__ import annotations

import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO

from corral.core._errors import InvalidInput

__all__ = ["check_input", "check_output", "replace_atomically"]


def check_input(path: Path) -> None:
    """The input exists, is a file and can be read."""
    if not path.exists():
        raise InvalidInput(f"{path}: no such input file; check the path")
    if path.is_dir():
        raise InvalidInput(f"{path}: the input is a directory; give a JSONL file")
    if not os.access(path, os.R_OK):
        raise InvalidInput(f"{path}: the input is not readable (permission denied)")


def check_output(output: Path, *, input: Path | None = None) -> Path:
    """Refuse an output corral could not safely append to; return its resolved path.

    The resolved path (symlinks followed) is what gets written and locked, so a symlinked
    output stays a symlink and two spellings of one file share one lock.
    """
    try:
        st: os.stat_result | None = os.stat(output)  # follows links, /dev/stdout's too
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise InvalidInput(f"{output}: cannot use it as the output ({exc.strerror})") from None
    resolved = output.resolve()
    if st is None:
        parent = resolved.parent
        if not parent.is_dir():
            raise InvalidInput(f"{output}: the directory {parent} does not exist; create it first")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise InvalidInput(f"{output}: cannot create files in {parent} (permission denied)")
        return resolved
    if stat.S_ISDIR(st.st_mode):
        raise InvalidInput(f"{output}: -o is a directory; give a file name inside it")
    if not stat.S_ISREG(st.st_mode):
        raise InvalidInput(
            f"{output}: not a regular file (a device, pipe or socket); "
            "write results to a file and read it afterwards"
        )
    if not os.access(resolved, os.W_OK):
        raise InvalidInput(f"{output}: the output is not writable (permission denied)")
    if input is not None and input.exists() and os.path.samefile(input, resolved):
        raise InvalidInput(
            f"{output}: the output is the input file; give results their own file, "
            "e.g. -o results.jsonl"
        )
    return resolved


def replace_atomically(path: Path, write: Callable[[IO[bytes]], object]) -> None:
    """Write a new version of ``path`` beside it, fsync, then rename it into place.

    The temporary file gets a fresh random name opened with O_EXCL (``mkstemp``), so a file or
    symlink planted at a predictable ``OUT.tmp`` is never followed or overwritten.
    """
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(name, path)
    except BaseException:
        Path(name).unlink(missing_ok=True)
        raise
