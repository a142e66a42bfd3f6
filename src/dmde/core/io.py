"""Small I/O helpers shared by every stage: atomic writes, JSON, file hashes, and the lock that
keeps two processes out of one run directory."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

from dmde.core.errors import DmdeFileError, DmdeValueError

_UMASK = os.umask(0)
os.umask(_UMASK)


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``: a crash never leaves half a file."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.", suffix=".tmp", dir=p.parent)
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
        os.replace(tmp, p)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> None:
    """Atomically write ``text``; an identical file is left untouched (its mtime too)."""
    p = Path(path)
    if p.is_file() and p.read_text() == text:
        return

    def _w(tmp: str) -> None:
        with open(tmp, "w") as fh:
            fh.write(text)

    atomic_write(p, _w)


def write_json(path: str | os.PathLike, obj: Any) -> None:
    write_text(path, json.dumps(obj, indent=1) + "\n")


def read_json(path: str | os.PathLike, what: str = "file") -> Any:
    p = Path(path)
    if not p.is_file():
        raise DmdeFileError(f"{what} {p} does not exist")
    try:
        with open(p) as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise DmdeValueError(f"{what} {p} is not valid JSON ({exc})") from None


def sha256_of(obj: Any) -> str:
    """Stable short hash of JSON-able data."""
    blob = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def ensure_directory(path: str | os.PathLike, what: str = "output directory") -> Path:
    """``path`` as a directory we can write in, created if needed; one clear error otherwise
    (a file in the way, a file above it, no permission, a read-only place)."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise DmdeFileError(f"{what} {p} is a file, not a directory")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except (NotADirectoryError, FileExistsError):
        raise DmdeFileError(f"{what} {p} lies under a file, not a directory") from None
    except OSError as exc:
        raise DmdeFileError(f"cannot create {what} {p}: {exc.strerror.lower()}") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise DmdeFileError(f"cannot write in {what} {p}: permission denied (read-only?)")
    return p


def check_format(data: Any, fmt: str, version: int, kind: str, where: str) -> None:
    """``data`` (a parsed JSON file) carries dmde's ``format`` tag ``fmt`` at ``version``, or one
    line names the file: the check every dmde file reader makes before reading its fields."""
    if not isinstance(data, dict) or data.get("format") != fmt:
        raise DmdeValueError(f"{where} is not a dmde {kind} file (format != {fmt!r})")
    if data.get("version") != version:
        raise DmdeValueError(f"{where} has {kind} format version {data.get('version')}, expected {version}")


def check_output_file(path: str | os.PathLike, fmt: str, what: str) -> Path:
    """Before any work: ``path`` can be written as a ``what`` file (JSON with ``"format": fmt``).
    Refuses a directory, a path under a file, a place we cannot write, and an existing file that
    is not already a ``what`` file (so an unrelated file is never overwritten)."""
    p = Path(path)
    if p.is_dir():
        raise DmdeFileError(f"--out {p} is a directory; give a file name for the {what}")
    if p.parent.exists() and not p.parent.is_dir():
        raise DmdeFileError(f"--out {p} lies under a file ({p.parent}), not a directory")
    ensure_directory(p.parent, "directory of --out")
    if p.exists():
        try:
            with open(p) as fh:
                ours = json.load(fh).get("format") == fmt
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DmdeFileError(f"--out {p} exists and is not a dmde {what} file: refusing to overwrite it "
                                "(remove it or choose another --out)")
    return p


#: What :func:`atomic_write` names its temporary files: ``.<name>.<random>.tmp`` beside the target.
TMP_PATTERN = ".*.tmp"


def remove_stale_temporaries(root: str | os.PathLike) -> int:
    """Remove the temporary files a killed :func:`atomic_write` left under ``root`` (call it only
    while holding the directory's :class:`DirectoryLock`: then no write of ours is in flight).
    Returns how many were removed."""
    n = 0
    for p in Path(root).rglob(TMP_PATTERN):
        if p.is_file():
            p.unlink(missing_ok=True)
            n += 1
    return n


_HELD: dict[str, list] = {}  # directory → [open lock file, depth]: re-entrant within one process


class DirectoryLock:
    """An exclusive lock on a directory (``<dir>/.lock``, ``flock``) for as long as the ``with``
    block runs. A second process that asks for it fails at once with one line naming the holder's
    pid; the lock goes with its process, so a killed run never leaves a stale one. Re-entrant
    within one process (``dmde train`` evaluates inside its own lock)."""

    def __init__(self, directory: str | os.PathLike) -> None:
        self.dir = Path(directory)
        self.key = str(self.dir.resolve())

    def __enter__(self) -> "DirectoryLock":
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        created = not self.dir.exists()
        ensure_directory(self.dir, "run directory")
        path = self.dir / ".lock"
        try:
            fh = open(path, "a+")
        except OSError as exc:
            raise DmdeFileError(f"cannot write in {self.dir}: {exc.strerror}") from None
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip() or "unknown"
            fh.close()
            raise DmdeFileError(f"{self.dir} is in use by another dmde process (pid {holder}); "
                                "wait for it to finish or choose another --out") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"{os.getpid()}\n")
        fh.flush()
        _HELD[self.key] = [fh, 1, created]
        return self

    def __exit__(self, *exc: Any) -> None:
        held = _HELD[self.key]
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            fh = held[0]
            fh.seek(0)
            fh.truncate()
            fcntl.flock(fh, fcntl.LOCK_UN)
            fh.close()
            if held[2] and [p.name for p in self.dir.iterdir()] == [".lock"]:  # we made it, nothing came
                (self.dir / ".lock").unlink(missing_ok=True)
                self.dir.rmdir()
