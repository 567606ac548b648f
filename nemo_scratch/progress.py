"""Progress in bytes for the long jobs (loads, quantize, make-random, inspect): a tqdm bar on a terminal.

The bar appears only when the job runs for more than a second (tqdm's ``delay``), and never under ``quiet``
(the CLI's --quiet) or when stderr is not a terminal (a pipe, a log file, CI): the counts are kept either
way, so a caller or a test can read ``total`` and ``n``.
"""

from __future__ import annotations

import sys


class Progress:
    """Counts bytes toward ``total``; draws a tqdm bar when one was asked for and can be shown."""

    def __init__(self, total, desc, quiet=False, stream=None):
        self.total, self.n, self.desc = int(total), 0, desc
        stream = sys.stderr if stream is None else stream
        self._bar = None
        if not quiet and getattr(stream, "isatty", lambda: False)():
            try:
                from tqdm import tqdm
            except ImportError:  # a minimal install without tqdm: the job still runs, silently
                tqdm = None
            if tqdm is not None:
                self._bar = tqdm(total=self.total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                                 delay=1.0, file=stream, leave=False)

    def update(self, nbytes):
        self.n += int(nbytes)
        if self._bar is not None:
            self._bar.update(int(nbytes))

    def close(self):
        if self._bar is not None:
            self._bar.close()


def progress_bar(total, desc, quiet=False, stream=None) -> Progress:
    return Progress(total, desc, quiet, stream)
