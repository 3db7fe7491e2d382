"""Atomic writes and a job-folder lock, so a crash or a race never leaves half a file.

Every file we write goes through :func:`atomic_path`: written under a temporary name beside the
target, given the mode a plain ``open(path, 'w')`` would get under the caller's umask (facilities
share projects between users; ``mkstemp`` alone would make it 0600), then renamed onto the target.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator


def current_umask() -> int:
    """The process umask, read without changing it where Linux tells it (no window for other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode() -> int:
    return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds.

    The temporary name keeps the final suffix so writers that pick a format by extension work.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix if suffix is None else suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=f".tmp{suffix}", dir=path.parent)
    try:
        os.fchmod(fd, plain_mode())
    finally:
        os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        if tmp.exists():
            os.chmod(tmp, plain_mode())  # a writer may have replaced the file (np.save, savefig)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json(path: str | os.PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_with(path: str | os.PathLike, writer: Callable[[Path], None]) -> None:
    """Call ``writer(tmp_path)`` and move the result onto ``path`` atomically."""
    with atomic_path(path) as tmp:
        writer(tmp)


def copy_file(src: str | os.PathLike, dest: str | os.PathLike) -> None:
    """Copy ``src``'s bytes onto ``dest`` atomically (mode as a plain write; mtime kept)."""
    with atomic_path(dest) as tmp:
        shutil.copyfile(src, tmp)
        with contextlib.suppress(OSError):
            st = os.stat(src)
            os.utime(tmp, ns=(st.st_atime_ns, st.st_mtime_ns))


class LockedError(RuntimeError):
    pass


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, name: str = ".cryoal.lock") -> Iterator[Path]:
    """Exclusive lock on a job folder; a second process gets a clear error instead of a race.

    An OS lock (flock) held on the lock file: it dies with its process, so a killed run never
    leaves a lock behind.  The file only says who holds it.  A folder this call created is
    removed again if the run leaves nothing in it.
    """
    folder = Path(folder)
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    lock = folder / name
    while True:
        fd = os.open(lock, os.O_CREAT | os.O_RDWR, plain_mode())
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                raise
            owner = ""
            with contextlib.suppress(OSError):
                owner = lock.read_text().strip()
            raise LockedError(f"{folder} is in use by another cryoal process (pid {owner or '?'}); "
                              "wait for it to finish") from None
        try:  # the file we locked must still be the one at that name (a finishing holder unlinks it)
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, str(os.getpid()).encode())
        yield lock
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()
        os.close(fd)
        if created:
            with contextlib.suppress(OSError):
                folder.rmdir()  # only if empty: a failed first run leaves no empty folder behind
