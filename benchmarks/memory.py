"""Peak resident memory of a command and every process it starts (Linux /proc, no dependencies).

`run_measured(command)` runs a command and samples the summed resident set (RSS) of its whole
process tree (worker processes and threads included) every `interval` seconds; the peak is what
a machine must hold for it. Page-cache pages a process maps from files count in RSS, as the
kernel reports them.

  python benchmarks/memory.py -- python launch.py --config ... --workdir ...
"""

import dataclasses
import os
import subprocess
import sys
import threading
import time

PAGE = os.sysconf('SC_PAGE_SIZE')


@dataclasses.dataclass
class Measured:
    """returncode, wall seconds, peak summed RSS of the process tree in bytes, and the most
    processes seen at once."""

    returncode: int
    seconds: float
    peak_rss: int
    peak_processes: int


def _children() -> dict[int, list[int]]:
    """{parent pid: [child pids]} of every process on the machine."""
    children = {}
    for name in os.listdir('/proc'):
        if not name.isdigit():
            continue
        try:
            with open(f'/proc/{name}/stat') as stat:
                fields = stat.read().rsplit(')', 1)[1].split()
        except OSError:  # the process ended meanwhile
            continue
        children.setdefault(int(fields[1]), []).append(int(name))
    return children


def tree_rss(root: int) -> tuple[int, int]:
    """(summed RSS in bytes, number of processes) of `root` and all its descendants."""
    children, total, count, stack = _children(), 0, 0, [root]
    while stack:
        pid = stack.pop()
        stack.extend(children.get(pid, ()))
        try:
            with open(f'/proc/{pid}/statm') as statm:
                total += int(statm.read().split()[1]) * PAGE
            count += 1
        except OSError:
            continue
    return total, count


def run_measured(command: list[str], interval: float = 0.05, **popen_kwargs) -> Measured:
    """Runs `command` (subprocess.Popen arguments in popen_kwargs) to completion, sampling the
    process tree's RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(command, **popen_kwargs)
    peak, most, done = 0, 0, threading.Event()

    def sample():
        nonlocal peak, most
        while not done.is_set():
            rss, count = tree_rss(process.pid)
            peak, most = max(peak, rss), max(most, count)
            done.wait(interval)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    returncode = process.wait()
    done.set()
    sampler.join()
    return Measured(returncode, time.perf_counter() - start, peak, most)


if __name__ == '__main__':
    arguments = sys.argv[1:]
    if arguments[:1] == ['--']:
        arguments = arguments[1:]
    result = run_measured(arguments)
    sys.stderr.write(f'exit {result.returncode}, {result.seconds:.1f} s, peak RSS '
                     f'{result.peak_rss / 2 ** 20:.0f} MiB over up to {result.peak_processes} '
                     'processes\n')
    sys.exit(result.returncode)
