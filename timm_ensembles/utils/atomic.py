"""Files written so that a crash never leaves a half-written one, and the sweep of what a kill leaves behind.

Every file is written to a temporary name beside its destination, flushed to disk, then renamed over the
destination (``os.replace`` is atomic on POSIX and Windows). Every temporary file or folder this package makes starts
with ``TEMPORARY_PREFIX``, so that what a kill leaves behind is told apart from a user's own files (``.notes.tmp``
stays). Files get the permissions of the process's umask, as any other file it writes.
"""
import os
import shutil
import tempfile
from pathlib import Path

__all__ = ['TEMPORARY_PREFIX', 'atomic_replace', 'atomic_write_text', 'follow_umask', 'fsync_dir', 'sweep_temporaries']

# the start of every temporary name this package gives a file or folder; nothing else is ever swept
TEMPORARY_PREFIX = '.timm-ensembles-tmp.'


def fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # directories cannot be opened on some platforms; the rename is still atomic there
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask_mode(mode: int = 0o666) -> int:
    """``mode`` less the process's umask: what ``open`` gives a new file (``mkstemp`` gives 0600 whatever the
    umask)."""
    umask = os.umask(0)
    os.umask(umask)
    return mode & ~umask


def follow_umask(*paths: Path) -> None:
    for path in paths:
        os.chmod(path, _umask_mode())


def atomic_replace(write_fn, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f'{TEMPORARY_PREFIX}{dest.name}.', dir=dest.parent)
    try:
        if hasattr(os, 'fchmod'):
            os.fchmod(fd, _umask_mode())
        with os.fdopen(fd, 'wb') as f:
            write_fn(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dest)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(dest.parent)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_replace(lambda f: f.write(text.encode('utf-8')), Path(path))


def sweep_temporaries(folder: str | Path) -> list[Path]:
    """Remove what a save or an export killed half-way leaves in ``folder``: the files and folders whose name starts
    with ``TEMPORARY_PREFIX`` (the package's own temporaries, nothing else). Only the one process that holds a run's
    folder writes it (``RunFolder.lock``), so none of them is being written when it sweeps. Returns what it
    removed."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.name.startswith(TEMPORARY_PREFIX)]
    for path in stale:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    return stale
