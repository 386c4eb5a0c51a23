"""Progress bars over samples and steps, and messages that never land in the
middle of a bar: while the bars are open, lines go through tqdm.write, which
clears the bars, writes the line and redraws them below it. The step bar is
reset per batch (one bar, not one per batch). Python warnings raised while
the bars are open (torch's, during sampling) are written the same way."""

from __future__ import annotations

import sys
import warnings
from typing import TextIO


class Progress:
    """Use as a context manager; `log` works before, during and after."""

    def __init__(self, enabled: bool, total: int, steps: int, initial: int = 0,
                 file: TextIO | None = None):
        self.enabled, self.total, self.steps, self.initial = enabled, total, steps, initial
        self.file = file
        self._samples = self._steps = None
        self._showwarning = None

    def _out(self) -> TextIO:
        return self.file if self.file is not None else sys.stderr

    def __enter__(self) -> Progress:
        if self.enabled:
            from tqdm import tqdm

            self._samples = tqdm(total=self.total, initial=self.initial, desc="samples",
                                 unit="img", file=self._out(), dynamic_ncols=True)
            self._steps = tqdm(total=self.steps, desc="steps", unit="step", leave=False,
                               file=self._out(), dynamic_ncols=True)
            self._showwarning = warnings.showwarning
            warnings.showwarning = self._warning
        return self

    def _warning(self, message, category, filename, lineno, file=None, line=None) -> None:
        self.log(warnings.formatwarning(message, category, filename, lineno, line).rstrip())

    def __exit__(self, *exc) -> None:
        if self._showwarning is not None:
            warnings.showwarning, self._showwarning = self._showwarning, None
        # the step bar first: it sits below the samples bar and leaves nothing behind
        for bar in (self._steps, self._samples):
            if bar is not None:
                bar.close()
        self._samples = self._steps = None

    def log(self, message: str) -> None:
        if self._samples is not None:
            from tqdm import tqdm

            tqdm.write(message, file=self._out())
        else:
            print(message, file=self._out(), flush=True)

    def start_batch(self) -> None:
        if self._steps is not None:
            self._steps.reset()

    def step(self) -> None:
        if self._steps is not None:
            self._steps.update()

    def end_batch(self, images: int) -> None:
        if self._samples is not None:
            self._samples.update(images)
