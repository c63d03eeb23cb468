"""A ``train.py`` output folder: the one place that names its files and reads them.

The trainer writes a run through it, the Hub code publishes it and the analysis reads it, so a file renamed or a
format changed here changes for all three::

    <run>/config.json, model.safetensors   the final model, timm's format (``exported/``: a plain timm model of it)
    <run>/args.yaml                        every flag of the run
    <run>/results.json                     final-epoch metrics (and ``test`` with --holdout, ``best_epoch``)
    <run>/metrics.jsonl                    one line per epoch; summary.csv is made from it
    <run>/checkpoint.pt                    the resumable training state (never published), checkpoint-prev.pt before it
    <run>/best/, ema/                      the best epoch's model (--eval-metric), the EMA of the weights (--model-ema)
    <run>/checkpoints/epoch-<E>/           the models of the kept epochs (--checkpoint-hist)
    <run>/snapshots/epoch_<E>.safetensors  per-epoch predictions (and weights) on a fixed subset (--snapshot-subset)
    <run>/tracking/                        the experiment trackers' files (--log-with)
    <run>/.timm-ensembles.lock             held by the one trainer writing the folder (``RunFolder.lock``)
    <output>/gen1..genK/                   a --generations run: one run folder per generation

The other modules take these names from ``RunFolder`` rather than spelling them.

A folder is owned by one run: a trainer holds its lock (an advisory ``fcntl.flock``, recording host, pid and since
when) for the life of the run, and a folder that holds a run's files (``RUN_MARKERS``) is never written by a new one
unless told to move them aside (``move_aside``).
"""
import errno
import json
import os
import socket
import time
from pathlib import Path
from typing import Any

import yaml

from ..utils.atomic import atomic_write_text, sweep_temporaries
from . import model_folder

try:
    import fcntl
except ImportError:  # Windows: the holder is still recorded, but nothing stops a second trainer
    fcntl = None

__all__ = ['RunFolder', 'RunLock', 'RunBusyError', 'RUN_FILES', 'output_problem', 'os_error_reason']


class RunFolder:
    """The files of one ``train.py`` output folder.

    Reading never fails on a file the run has not written yet (``args``, ``results``: empty; ``metrics``: no
    lines); ``config`` and ``check_finished`` are strict, for callers that need a finished model.

    Args:
        path: The run's output folder.
        run_path: Where the run's own files are, when ``path`` is a model exported inside it (see ``of_model``).
    """
    # a model folder, timm's Hugging Face format (what save_for_hf writes, what a Hub repo holds)
    CONFIG = model_folder.CONFIG
    WEIGHTS = model_folder.WEIGHTS
    ARGS = 'args.yaml'
    RESULTS = 'results.json'
    METRICS = 'metrics.jsonl'
    SUMMARY = 'summary.csv'
    CHECKPOINT = 'checkpoint.pt'
    # the checkpoint before the last one, kept while it is readable: the one to resume from when the last is corrupt
    PREVIOUS_CHECKPOINT = 'checkpoint-prev.pt'
    LOCK = '.timm-ensembles.lock'
    # the sub-folders (``sub``): model folders (best, ema, exported, each epoch of checkpoints), snapshots, trackers
    BEST = 'best'
    EMA = 'ema'
    EXPORTED = 'exported'  # a collaborative run's plain head, the export its task names
    HISTORY = 'checkpoints'
    SNAPSHOTS = 'snapshots'
    TRACKING = 'tracking'
    # <run>/checkpoints/epoch-<E> (``history_name``)
    HISTORY_EPOCH = 'epoch-'
    # <run>/snapshots/ files of epoch E, with E as 000, 001, ... or init (``train.snapshots``)
    SNAPSHOT_LOGITS = 'epoch_{}.safetensors'
    SNAPSHOT_WEIGHTS = 'epoch_{}.weights.safetensors'
    # --generations K: <output>/gen1..genK (``generation``)
    GENERATION = 'gen'
    # where a run without --output is written: <root>/<time>-<model> (``default``), and --experiment's root
    DEFAULT_ROOT = 'output/train'
    TIME_FORMAT = '%Y%m%d-%H%M%S'
    # the files whose presence means that the folder holds a run: a new run never writes over them
    RUN_MARKERS = (CONFIG, WEIGHTS, METRICS, RESULTS, CHECKPOINT, PREVIOUS_CHECKPOINT)
    # every name the trainer writes in a run folder (what --overwrite moves aside), besides a task's own exports
    WRITTEN = (*RUN_MARKERS, ARGS, SUMMARY, BEST, EMA, EXPORTED, SNAPSHOTS, TRACKING, HISTORY)
    # the folder --overwrite moves an earlier run's files into: <run>/<prefix><time>
    MOVED_ASIDE_PREFIX = 'overwritten-'

    def __init__(self, path: str | Path, run_path: str | Path | None = None):
        self.path = Path(path)
        self.exported_from = Path(run_path) if run_path is not None else None
        self.run_path = self.exported_from or self.path

    @classmethod
    def of_model(cls, path: str | Path) -> 'RunFolder':
        """The run that a model folder comes from, for describing it (the Hub card): the folder itself, or for a model
        exported inside a run (``<run>/exported``: a folder with config.json and no results.json, beside the run's
        results.json) the run one level up. Only readers guess this way; the trainer writes to the folder it is
        given."""
        path = Path(path)
        exported = (path / cls.CONFIG).is_file() and not (path / cls.RESULTS).is_file() \
            and (path.parent / cls.RESULTS).is_file()
        return cls(path, path.parent if exported else None)

    @classmethod
    def default(cls, model: str) -> 'RunFolder':
        """The folder of a run given no ``--output``: ``output/train/<time>-<model>``."""
        return cls(f'{cls.DEFAULT_ROOT}/{time.strftime(cls.TIME_FORMAT)}-{model}')

    @classmethod
    def generation(cls, root: str | Path, k: int) -> 'RunFolder':
        """Generation ``k`` (from 1) of a ``--generations`` run in ``root``: ``root/gen<k>``."""
        return cls(Path(root) / f'{cls.GENERATION}{k}')

    @classmethod
    def history_name(cls, epoch: int) -> str:
        """The folder name of an epoch kept by ``--checkpoint-hist`` in ``checkpoints/``: ``epoch-<epoch>``."""
        return f'{cls.HISTORY_EPOCH}{epoch}'

    @classmethod
    def is_history_name(cls, name: str) -> bool:
        """Whether ``name`` is a ``history_name`` (of any epoch)."""
        return name.startswith(cls.HISTORY_EPOCH) and name.removeprefix(cls.HISTORY_EPOCH).isdigit()

    def __repr__(self) -> str:
        return f'RunFolder({str(self.path)!r})'

    # ---- where things are ----
    def file(self, name: str) -> Path:
        """A file of the run (``args.yaml``, ``results.json``, ``metrics.jsonl``, ...), in the run folder itself also
        for an ``exported/`` view."""
        return self.run_path / name

    @property
    def config_path(self) -> Path:
        return self.path / self.CONFIG

    @property
    def weights_path(self) -> Path:
        return self.path / self.WEIGHTS

    @property
    def checkpoint_path(self) -> Path:
        return self.run_path / self.CHECKPOINT

    @property
    def previous_checkpoint_path(self) -> Path:
        """The checkpoint before the last one, kept beside it (``checkpoint-prev.pt``)."""
        return self.run_path / self.PREVIOUS_CHECKPOINT

    def history_path(self, epoch: int) -> Path:
        """The folder of one epoch's model kept by ``--checkpoint-hist``: ``checkpoints/epoch-<epoch>``."""
        return self.sub(self.HISTORY) / self.history_name(epoch)

    def sub(self, name: str) -> Path:
        """A sub-folder of the run: ``BEST``, ``EMA``, ``EXPORTED``, ``HISTORY``, ``SNAPSHOTS``, ``TRACKING``, or an
        export a task names."""
        return self.run_path / name

    # ---- reading ----
    def is_finished(self) -> bool:
        """The final model is written (train.py writes config.json and the weights after the last epoch)."""
        return self.config_path.is_file() and self.weights_path.is_file()

    def check_finished(self) -> None:
        """Raises FileNotFoundError, saying what is missing, unless the folder holds a finished model."""
        if not self.path.is_dir():
            raise FileNotFoundError(f"'{self.path}' is not a folder: give the output folder of a train.py run.")
        for name in (self.CONFIG, self.WEIGHTS):
            if not (self.path / name).is_file():
                raise FileNotFoundError(
                    f"'{self.path}' has no {name}: it is not a finished train.py output folder (train.py writes"
                    f' {self.CONFIG} and {self.WEIGHTS} after the last epoch; a folder with only {self.CHECKPOINT} is'
                    f' still training).')

    def config(self) -> dict[str, Any]:
        """``config.json``, checked to be timm's format (a dict with ``architecture``)."""
        try:
            config = json.loads(self.config_path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"'{self.config_path}' is not valid JSON ({e}).") from e
        if not isinstance(config, dict) or 'architecture' not in config:
            raise ValueError(f"'{self.config_path}' has no 'architecture': it is not a timm model config.")
        return config

    def args(self) -> dict[str, Any]:
        """``args.yaml`` (every flag of the run), or {} where there is none."""
        path = self.file(self.ARGS)
        return (yaml.safe_load(path.read_text()) or {}) if path.is_file() else {}

    def results(self) -> dict[str, Any]:
        """``results.json``, or {} where there is none (a run still training)."""
        path = self.file(self.RESULTS)
        return json.loads(path.read_text()) if path.is_file() else {}

    def metrics(self) -> list[dict[str, Any]]:
        """The epochs of ``metrics.jsonl`` in order; a last line cut short by a crash is left out."""
        path = self.file(self.METRICS)
        if not path.is_file():
            return []
        records = []
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def last_logged_epoch(self) -> int | None:
        epochs = [r['epoch'] for r in self.metrics() if isinstance(r.get('epoch'), int)]
        return max(epochs) if epochs else None

    def read(self) -> dict[str, Any]:
        """The finished run as the Hub code describes it: ``config``, and where present ``results``, ``args``,
        ``metrics`` (the lines), ``exported_from`` (the run folder, for an ``exported/`` view)."""
        self.check_finished()
        run: dict[str, Any] = dict(config=self.config())
        if self.exported_from is not None:
            run['exported_from'] = str(self.exported_from)
        for key, name, read in (('results', self.RESULTS, self.results), ('args', self.ARGS, self.args),
                                ('metrics', self.METRICS, self.metrics)):
            if self.file(name).is_file():
                run[key] = read()
        return run

    def run_files(self) -> list[str]:
        """The names of ``RUN_MARKERS`` the folder holds: a run's files, which a new run must not write over."""
        return [name for name in self.RUN_MARKERS if (self.run_path / name).is_file()]

    # ---- owning (the trainer's) ----
    def lock(self, log=None) -> 'RunLock':
        """Take the folder's lock (making the folder) for the life of a run; see :class:`RunLock`."""
        return RunLock(self.run_path).acquire(log)

    def sweep(self) -> list[Path]:
        """Remove what a killed save or export left (the package's temporaries only) in the folder and in its
        sub-folders (best/, checkpoints/, snapshots/, ...). Only the lock's holder may."""
        swept = sweep_temporaries(self.run_path)
        if self.run_path.is_dir():
            for sub in self.run_path.iterdir():
                if sub.is_dir() and not sub.is_symlink() and not sub.name.startswith(self.MOVED_ASIDE_PREFIX):
                    swept += sweep_temporaries(sub)
        return swept

    def move_aside(self, extra: tuple[str, ...] = ()) -> Path | None:
        """Move the files a run wrote (``WRITTEN`` and ``extra``, a task's own export folders) into a new sub-folder
        ``overwritten-<time>``, and return it (None when there was nothing to move). Nothing is deleted; other
        files stay where they are."""
        names = [n for n in (*self.WRITTEN, *extra) if os.path.lexists(self.run_path / n)]
        if not names:
            return None
        stamp = time.strftime(self.TIME_FORMAT)
        aside = self.run_path / f'{self.MOVED_ASIDE_PREFIX}{stamp}'
        for i in range(2, 1000):
            if not aside.exists():
                break
            aside = self.run_path / f'{self.MOVED_ASIDE_PREFIX}{stamp}-{i}'
        aside.mkdir()
        for name in names:
            os.replace(self.run_path / name, aside / name)
        return aside

    # ---- writing (the trainer's; each file replaced whole, never half-written) ----
    def write_args(self, args: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.ARGS), yaml.safe_dump(args, sort_keys=False))

    def write_results(self, results: dict[str, Any]) -> None:
        atomic_write_text(self.file(self.RESULTS), json.dumps(results, indent=2))

    def append_metrics(self, record: dict[str, Any]) -> None:
        """One epoch's line; a crash mid-line leaves a cut line that ``metrics`` skips and a resume rewrites."""
        with open(self.file(self.METRICS), 'a') as f:
            f.write(json.dumps(record) + '\n')

    def truncate_metrics(self, start_epoch: int) -> None:
        """Drop the lines of epochs that a resumed run will redo (and a line cut short by the crash it resumes)."""
        if self.file(self.METRICS).is_file():
            keep = [r for r in self.metrics() if r.get('epoch', 0) < start_epoch]
            atomic_write_text(self.file(self.METRICS), ''.join(json.dumps(r) + '\n' for r in keep))


# the files of a run that a Hub repo gets beside the weights: small, plain text, what the card is made of
RUN_FILES = (RunFolder.RESULTS, RunFolder.METRICS, RunFolder.ARGS)


class RunBusyError(RuntimeError):
    """Another process holds the run folder's lock."""


class RunLock:
    """The advisory lock of a run folder: ``fcntl.flock`` on ``<run>/.timm-ensembles.lock``, which records its holder
    (host, pid, since when). The kernel drops the lock when its holder dies (a kill included), so a lock file left
    behind is stale and taken over, with a log line naming the run that left it. Released, the file is removed, and
    so is a folder made only to hold it (a run refused before writing anything leaves nothing).

    Args:
        folder: The run folder.
    """

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.path = self.folder / RunFolder.LOCK
        self._fd = None
        self._made: list[Path] = []

    def acquire(self, log=None) -> 'RunLock':
        """Take the lock or raise :class:`RunBusyError` naming its holder; ``log`` gets the line of a stale lock
        taken over. OSError (a file where the folder should be, a read-only or full disk) passes through."""
        self._made = [p for p in (self.folder, *self.folder.parents) if not p.exists()][::-1]
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            fd = self._open_locked(log)
        except BaseException:
            self._remove_made()
            raise
        self._fd = fd
        previous = _read_holder(fd)
        if previous and log is not None:
            log(f"{self.folder}: the lock left by {_describe(previous)} is stale (that run is gone: killed or"
                f' crashed); taken over')
        record = dict(host=socket.gethostname(), pid=os.getpid(), since=time.strftime('%Y-%m-%d %H:%M:%S %z'))
        try:
            os.ftruncate(fd, 0)
            os.lseek(fd, 0, os.SEEK_SET)
            os.write(fd, json.dumps(record).encode())
            os.fsync(fd)
        except BaseException:
            self.release()
            raise
        return self

    def _open_locked(self, log=None) -> int:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            if fcntl is None:
                return fd
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    if log is not None:
                        log(f'warning: {self.folder}: this file system takes no file locks ({e.strerror}); nothing'
                            f' stops a second trainer on this folder')
                    return fd
                holder = _read_holder(fd)
                os.close(fd)
                if e.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise RunBusyError(
                        f"'{self.folder}' is in use by another run ({_describe(holder)}): two trainers would"
                        f' interleave its files. Wait for that run to finish (or stop it), or choose another'
                        f' --output.') from None
                raise
            # its holder may have removed the file between our open and our lock: lock the one that is there now
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                return fd
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (the file first: a trainer waiting on it opens a new one)."""
        if self._fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(self._fd)
            self._fd = None
            self._remove_made()

    def _remove_made(self) -> None:
        for folder in reversed(self._made):
            try:
                folder.rmdir()  # only when empty: whatever was written there stays
            except OSError:
                break
        self._made = []

    def __enter__(self) -> 'RunLock':
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def _read_holder(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = os.read(fd, 4096)
    except OSError:
        return None
    if not data.strip():
        return None
    try:
        holder = json.loads(data)
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _describe(holder: dict | None) -> str:
    if not holder:
        return 'a holder that did not record itself'
    return f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, since {holder.get('since', '?')}"


def output_problem(path: str | Path) -> str | None:
    """Why ``path`` cannot be made an output folder, or None: a file stands at it or above it, or the nearest folder
    that exists cannot be written (a read-only disk, no permission)."""
    path = Path(path).expanduser()
    for p in (path, *path.parents):
        if not os.path.lexists(p):
            continue
        if not p.is_dir():
            return f"'{p}' is a file, not a folder" if p == path else f"'{p}' above it is a file, not a folder"
        if not os.access(p, os.W_OK | os.X_OK):
            return f"'{p}' cannot be written (a read-only disk, or no permission)"
        return None
    return None


def os_error_reason(e: OSError) -> str:
    """An OSError in the words a user acts on: a full disk said as such."""
    if e.errno in (errno.ENOSPC, getattr(errno, 'EDQUOT', errno.ENOSPC)):
        return f'the disk is full ({e.strerror or e})'
    if e.errno == errno.EROFS:
        return f'the disk is read-only ({e.strerror or e})'
    if e.errno in (errno.EACCES, errno.EPERM):
        return f'no permission to write there ({e.strerror or e})'
    return f'{type(e).__name__}: {e}'
