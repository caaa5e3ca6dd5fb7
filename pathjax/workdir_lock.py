"""One run per workdir: each process of a run holds an exclusive lock for the run's length.

Two runs in one workdir would skip, delete and overwrite each other's half-made work, so a run
takes `<workdir>/.lock.<rank>` (its process rank; a multi-host run takes one per process) with
`flock` and writes its pid, host and start time into it. The kernel drops the lock when the
process ends, however it ends (kill -9 too), so no stale lock is ever left; the file stays, and
a second run finds it locked and is refused at once, naming the holder. Locks on network file
systems work where the file system supports `flock` (Linux NFSv4 maps it to byte-range locks).
"""

import contextlib
import datetime
import fcntl
import json
import os
import pathlib
import socket
import sys
from typing import Iterator

from pathjax.errors import UsageError


def lock_path(workdir: str | os.PathLike, rank: int) -> pathlib.Path:
    return pathlib.Path(workdir) / f'.lock.{rank}'


def _holder(descriptor: int) -> str:
    """What the running holder wrote into the lock file ('' when it could not be read)."""
    try:
        holder = json.loads(os.pread(descriptor, 4096, 0) or b'{}')
        return (f'pid {holder["pid"]} on host {holder["host"]}, started {holder["started"]}: '
                f'{holder["command"]}')
    except (OSError, ValueError, KeyError, TypeError):
        return 'a process that has not written its name yet'


@contextlib.contextmanager
def hold(workdir: str | os.PathLike, rank: int = 0) -> Iterator[None]:
    """Holds the workdir's lock for process `rank` while the block runs.

    Raises:
        UsageError: another run holds it (the message names its pid and host).
        OSError: the lock file cannot be created (an unwritable workdir, a full disk).
    """
    path = lock_path(workdir, rank)
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise UsageError(f'{pathlib.Path(workdir)} is in use by another pathjax run '
                             f'({_holder(descriptor)}); wait for it to end or use another '
                             '--workdir') from None
        me = {'pid': os.getpid(), 'host': socket.gethostname(),
              'started': datetime.datetime.now().isoformat(timespec='seconds'),
              'command': ' '.join(sys.argv)[:1024]}
        os.ftruncate(descriptor, 0)
        os.pwrite(descriptor, json.dumps(me).encode(), 0)
        yield
    finally:
        os.close(descriptor)  # releases the lock
