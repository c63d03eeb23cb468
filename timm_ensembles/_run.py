"""A ``train.py`` output folder: the one place that names its files and reads them.

The trainer writes a run through it, the Hub code publishes it and the analysis reads it, so a file renamed or a
format changed here changes for all three::

    <run>/config.json, model.safetensors   the final model, timm's format (``exported/``: a plain timm model of it)
    <run>/args.yaml                        every flag of the run
    <run>/results.json                     final-epoch metrics (and ``test`` with --holdout, ``best_epoch``)
    <run>/metrics.jsonl                    one line per epoch; summary.csv is made from it
    <run>/checkpoint.pt                    the resumable training state (never published)
    <run>/best/, ema/, snapshots/, tracking/
"""
import json
from pathlib import Path
from typing import Any

import yaml

from ._checkpoint import CHECKPOINT_NAME, atomic_write_text

__all__ = ['RunFolder', 'RUN_FILES']

# the files of a run that a Hub repo gets beside the weights: small, plain text, what the card is made of
RUN_FILES = ('results.json', 'metrics.jsonl', 'args.yaml')


class RunFolder:
    """The files of one ``train.py`` output folder.

    Reading never fails on a file the run has not written yet (``args``, ``results``: empty; ``metrics``: no
    lines); ``config`` and ``check_finished`` are strict, for callers that need a finished model.

    Args:
        path: The run's output folder.
        run_path: Where the run's own files are, when ``path`` is a model exported inside it (see ``of_model``).
    """
    CONFIG = 'config.json'
    WEIGHTS = 'model.safetensors'
    ARGS = 'args.yaml'
    RESULTS = 'results.json'
    METRICS = 'metrics.jsonl'
    SUMMARY = 'summary.csv'
    CHECKPOINT = CHECKPOINT_NAME

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

    def sub(self, name: str) -> Path:
        """A sub-folder of the run: ``best``, ``ema``, ``exported``, ``snapshots``, ``tracking``."""
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
