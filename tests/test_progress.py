"""Progress bars and log lines on one terminal: a log record written while a bar is shown lands on its own line."""
import contextlib
import io
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from timm_ensembles.train.engine import evaluate, train_one_epoch
from timm_ensembles.utils.progress import progress

pytestmark = pytest.mark.usefixtures('one_torch_thread')


class _Terminal(io.StringIO):
    """What tqdm writes to, as a terminal would take it (tqdm draws only on a terminal)."""

    def isatty(self) -> bool:
        return True


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows after ``raw``: '\\r' goes back to the line's start, '\\n' to the next line, any
    other character overwrites the one under the cursor."""
    assert '\x1b' not in raw  # tqdm moves the cursor up only for bars at positions > 0: none here
    lines, row, col = [''], 0, 0
    for ch in raw:
        if ch == '\r':
            col = 0
        elif ch == '\n':
            row, col = row + 1, 0
            if row == len(lines):
                lines.append('')
        else:
            line = lines[row].ljust(col)
            lines[row] = line[:col] + ch + line[col + 1:]
            col += 1
    return [line.rstrip() for line in lines]


class _Task(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x, target):
        output = self.fc(x)
        return dict(loss=F.cross_entropy(output, target), output=output)


@contextlib.contextmanager
def _on_terminal(stream=None):
    """stderr a terminal (or ``stream``), with a console log handler on it, as train.py's logging.basicConfig sets
    one. Entered in the test itself: pytest sets its own sys.stderr again between a fixture and the test."""
    term = _Terminal() if stream is None else stream
    saved = sys.stderr, list(logging.root.handlers), logging.root.level
    sys.stderr = term
    logging.root.addHandler(logging.StreamHandler(term))
    logging.root.setLevel(logging.INFO)
    try:
        yield term
    finally:
        sys.stderr, logging.root.handlers, logging.root.level = saved


def _epoch(show_progress: bool = True):
    task = _Task()
    batches = [(torch.randn(8, 4), torch.randint(0, 3, (8,))) for _ in range(5)]
    optimizer = torch.optim.SGD(task.parameters(), lr=0.1)
    log = logging.getLogger('timm_ensembles.test')
    train_one_epoch(task, batches, optimizer, Accelerator(cpu=True), 0, show_progress=show_progress, log_interval=1,
                    log=lambda values: log.info(f"logged at update {values['update']}"))
    return task, batches


def test_log_lines_land_above_the_bar():
    with _on_terminal() as terminal:
        handlers = list(logging.root.handlers)
        task, batches = _epoch()
        raw = terminal.getvalue()
        assert 'train 0:' in raw  # the bar was drawn, and the records written while it was
        # each record on a line of its own, none continuing the bar's line; the bar cleared when the epoch ended
        assert [line for line in _screen(raw) if line] == [f'logged at update {u}' for u in range(1, 6)]
        assert logging.root.handlers == handlers  # the console handler back once the bar closed
        # the evaluation's bar likewise
        terminal.seek(0)
        terminal.truncate()
        quiet = evaluate(task.fc, batches, Accelerator(cpu=True))
        assert terminal.getvalue() == ''
        shown = evaluate(task.fc, batches, Accelerator(cpu=True), progress='val 0')
        assert 'val 0:' in terminal.getvalue() and not any(_screen(terminal.getvalue()))
        assert shown == quiet and logging.root.handlers == handlers


def test_no_bar_off_a_terminal_or_with_no_progress():
    with _on_terminal() as terminal:
        _epoch(show_progress=False)
        assert terminal.getvalue() == ''.join(f'logged at update {u}\n' for u in range(1, 6))
    # stderr a file or a pipe: the log lines only, as they are written without a bar
    with _on_terminal(io.StringIO()) as log_file:
        _epoch()
        assert log_file.getvalue() == ''.join(f'logged at update {u}\n' for u in range(1, 6))


def test_progress_restores_the_logging_when_stopped_early():
    with _on_terminal():
        handlers = list(logging.root.handlers)
        bar = progress(range(10), desc='early')
        assert logging.root.handlers != handlers  # redirected while the bar is shown
        for i in bar:
            if i == 3:
                break
        bar.close()
        assert logging.root.handlers == handlers
        bar.close()  # again (as tqdm's __del__ does): nothing more to restore
        assert logging.root.handlers == handlers
