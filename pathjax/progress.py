"""One progress display per long stage: on a terminal a tqdm bar (count, rate, ETA); otherwise
(a log file, CI) one line when the stage's part ends, so logs stay readable.

  with progress.Progress('extract', total=n, unit='patches') as bar:
      bar.update(batch)
"""

import sys
import time

from tqdm import tqdm


def on_terminal() -> bool:
    return sys.stderr.isatty()


class Progress:
    """Counts work towards `total` in `unit` (plural: 'slides', 'patches', 'steps');
    `postfix` (e.g. the epoch) shows on the bar."""

    def __init__(self, desc: str, total: int, unit: str, initial: int = 0):
        self.desc, self.total, self.unit = desc, total, unit
        self.count = self.initial = initial
        self.start = time.perf_counter()
        self.bar = (tqdm(total=total, initial=initial, desc=desc, unit=unit, dynamic_ncols=True,
                         file=sys.stderr) if on_terminal() else None)

    def __enter__(self) -> 'Progress':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, count: int = 1) -> None:
        self.count += count
        if self.bar is not None:
            self.bar.update(count)

    def postfix(self, **values) -> None:
        if self.bar is not None:
            self.bar.set_postfix(values, refresh=False)

    def close(self) -> None:
        """Closes the bar, or writes the one line: 'desc: count/total units in s (rate)'."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        elif self.desc is not None:
            seconds = time.perf_counter() - self.start
            done = self.count - self.initial
            rate = f' ({done / seconds:.3g} {self.unit}/s)' if seconds > 0 and done else ''
            sys.stderr.write(f'{self.desc}: {self.count}/{self.total} {self.unit} in '
                             f'{seconds:.1f} s{rate}\n')
            sys.stderr.flush()
        self.desc = None  # closed: a second close writes nothing
