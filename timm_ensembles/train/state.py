"""Where a training run stands between epochs: what its checkpoint carries beside the objects' own state dicts.

``TrainingState.state_dict()`` gives the checkpoint's entries under the keys train.py has always written (``epoch``,
``num_updates``, ``val_metrics``, ``mechanism``, ``best``, ``checkpoint_hist``, ``ema_val_metrics``), so that the
checkpoints of earlier runs resume, and those of this one are read the same by them.
"""
import dataclasses
from typing import Any

__all__ = ['TrainingState']


@dataclasses.dataclass
class TrainingState:
    """The run's progress, saved in every checkpoint and taken up by ``--resume``.

    Attributes:
        epoch: Epochs finished: the next epoch to train.
        num_updates: Optimizer updates done (the schedule is stepped per update).
        val_metrics: The last epoch's validation metrics.
        mechanism: The last epoch's diagnostics (``Task.mechanism``: ``{name: {'value', 'note'}}``).
        best: The best epoch so far, ``dict(metric, value, epoch)``, or None before the first.
        history: The epochs kept in ``checkpoints/`` by ``--checkpoint-hist``, best first
            (``[{'epoch': E, <metric>: value}]``).
        ema_metrics: The model EMA's validation metrics of the last epoch (None without an EMA).
    """
    epoch: int = 0
    num_updates: int = 0
    val_metrics: dict[str, Any] = dataclasses.field(default_factory=dict)
    mechanism: dict[str, Any] = dataclasses.field(default_factory=dict)
    best: dict[str, Any] | None = None
    history: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    ema_metrics: dict[str, Any] | None = None

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's entries (``ema_val_metrics`` only where an EMA was evaluated)."""
        state = dict(epoch=self.epoch, num_updates=self.num_updates, val_metrics=self.val_metrics,
                     mechanism=self.mechanism, best=self.best, checkpoint_hist=self.history)
        if self.ema_metrics is not None:
            state['ema_val_metrics'] = self.ema_metrics
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Take up a checkpoint's entries; ``epoch`` and ``num_updates`` are required, the others default as a
        checkpoint of an older version that lacks them needs."""
        self.epoch, self.num_updates = state['epoch'], state['num_updates']
        self.val_metrics = state.get('val_metrics', {})
        self.mechanism = state.get('mechanism', {})  # a run resumed after its last epoch reports it
        self.best = state.get('best')
        self.history = state.get('checkpoint_hist', [])
        self.ema_metrics = state.get('ema_val_metrics')

    def improves(self, value: float, metric: str) -> bool:
        """Whether ``value`` of ``metric`` beats the best epoch so far (lower for a loss, higher otherwise)."""
        return self.best is None or (value < self.best['value'] if metric == 'loss' else value > self.best['value'])
