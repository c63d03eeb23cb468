"""Progress bars that log lines do not break.

A bar is drawn on stderr only when stderr is a terminal (tqdm's ``disable=None``), and is cleared when it closes.
While one is shown, the console log handlers write through ``tqdm.write`` (tqdm's ``logging_redirect_tqdm``): a log
line lands on a line of its own, and the bar is redrawn below it. Without that, a record written to stderr while the
bar is drawn continues the bar's line.
"""
import logging
import sys
from contextlib import AbstractContextManager, nullcontext

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

__all__ = ['progress', 'logs_above_bars']


def _writes_to_console(handler: logging.Handler) -> bool:
    # as tqdm decides which handlers to replace
    return isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)


def logs_above_bars() -> AbstractContextManager:
    """While open, console log lines are written above the open bars (tqdm's and huggingface_hub's alike).

    Every logger with a console handler of its own (the root's, as ``logging.basicConfig`` sets it) is redirected;
    one without (whose records reach the root's) is left alone, as tqdm would give it a handler of its own and its
    records would be written twice. Nothing is redirected where no logger writes to the console.
    """
    loggers = [logger for logger in [logging.root, *list(logging.root.manager.loggerDict.values())]
               if isinstance(logger, logging.Logger) and any(_writes_to_console(h) for h in logger.handlers)]
    return logging_redirect_tqdm(loggers=loggers) if loggers else nullcontext()


class _Bar(tqdm):
    """A tqdm bar that redirects the console logging (``logs_above_bars``) for as long as it is shown."""

    def __init__(self, *args, **kwargs):
        self._redirect = None
        super().__init__(*args, **kwargs)
        if not self.disable:
            self._redirect = logs_above_bars()
            self._redirect.__enter__()

    def close(self) -> None:
        try:
            super().close()
        finally:
            # close runs again from __del__: the handlers are restored once
            redirect, self._redirect = getattr(self, '_redirect', None), None
            if redirect is not None:
                redirect.__exit__(None, None, None)


def progress(iterable=None, desc: str | None = None, total: int | None = None, enabled: bool = True,
             **kwargs) -> tqdm:
    """A progress bar over ``iterable`` (or of ``total`` steps, advanced by ``update``).

    It is shown when ``enabled`` and stderr is a terminal (so never in a log file or a captured test), and cleared
    when it closes: at the end of the iteration, or by ``close()``. Log lines written while it is shown land above it.

    Args:
        iterable: What to iterate over.
        desc: The text before the bar.
        total: The number of steps; default ``len(iterable)``.
        enabled: False: no bar (``--no-progress``, or a process other than the main one).
        **kwargs: Further ``tqdm`` arguments (``unit``, ...).
    """
    return _Bar(iterable, desc=desc, total=total, disable=None if enabled else True, leave=False, dynamic_ncols=True,
                **kwargs)
