"""Every process of a multi-host run works in one workdir: process 0 tiles, builds the patch
dataset and writes the reports there, and the others read them. A workdir on each host's own
disk would make them wait for files that never come, so the run checks it first: process 0
writes a marker named by a random token into `<workdir>/.pathjax-hosts/`, and every other
process must find it in its own `--workdir`.
"""

import json
import os
import pathlib
import secrets
import socket
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from pathjax import artifacts
from pathjax.errors import UsageError, describe_os_error
from pathjax.runtime import sharding

FOLDER = '.pathjax-hosts'
WAIT_SECONDS = 5.0  # a network file system may show another host's new file a moment late
IDENTITY_BYTES = 512  # process 0's token and host name, as every process receives them


def check(workdir: str | os.PathLike) -> None:
    """Refuses, on every process, a workdir that some process does not share with process 0
    (nothing on one process).

    Raises:
        UsageError: the message names the process, its host and the path it was given.
    """
    if jax.process_count() == 1:
        return
    workdir = pathlib.Path(workdir)
    leader = _leader_identity()
    marker = workdir / FOLDER / f'{leader["token"]}.json'
    failure = None
    if sharding.is_leader():
        try:
            for stale in (workdir / FOLDER).glob('*.json'):  # of killed runs (the lock is ours)
                stale.unlink(missing_ok=True)
            marker.parent.mkdir(exist_ok=True)
            artifacts.save_text(marker, json.dumps(leader))
        except OSError as error:
            failure = UsageError(f'cannot write to the workdir {workdir}: '
                                 f'{describe_os_error(error)}')
    sharding.barrier('shared workdir: marker written')
    if not sharding.is_leader():
        failure = marker_problem(workdir, marker, leader, jax.process_index())
    try:
        sharding.raise_together(failure)  # every process has looked when it returns
    finally:
        if sharding.is_leader():
            try:
                marker.unlink(missing_ok=True)
                marker.parent.rmdir()
            except OSError:
                pass  # a marker left behind is removed by the next run


def marker_problem(workdir: pathlib.Path, marker: pathlib.Path, leader: dict, process: int,
                   wait_seconds: float = WAIT_SECONDS) -> UsageError | None:
    """None once process `process` reads process 0's `marker` (with its token) in its own
    `workdir`, waiting up to `wait_seconds` for it; else the refusal."""
    deadline = time.monotonic() + wait_seconds
    while True:
        try:
            if marker.stat().st_size <= IDENTITY_BYTES and \
                    json.loads(marker.read_text()).get('token') == leader['token']:
                return None
        except (OSError, ValueError, AttributeError):  # absent, half written, or not ours
            pass
        if time.monotonic() >= deadline:
            break
        try:
            os.listdir(marker.parent)  # revalidates a network file system's cached listing
        except OSError:
            pass
        time.sleep(0.25)
    return UsageError(
        f'the workdir {workdir} is not shared: process {process} on host {socket.gethostname()} '
        f'does not see the marker {FOLDER}/{marker.name} that process 0 wrote into its workdir '
        f'on host {leader["host"]}; put the workdir on a file system that every host mounts '
        '(NFS, Lustre, GCS FUSE) and give every process the same --workdir')


def _leader_identity() -> dict:
    """{'token', 'host'} of process 0, on every process."""
    mine = json.dumps({'token': secrets.token_hex(16), 'host': socket.gethostname()[:256]})
    buffer = np.frombuffer(mine.encode().ljust(IDENTITY_BYTES, b'\0'), np.uint8)
    received = np.asarray(multihost_utils.broadcast_one_to_all(buffer))
    return json.loads(received.astype(np.uint8).tobytes().rstrip(b'\0').decode())
