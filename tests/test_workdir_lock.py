"""One run per workdir, with real processes: a second run is refused at once naming the first;
a run killed with SIGKILL leaves no stale lock."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from pathjax import workdir_lock
from pathjax.errors import UsageError
from tests.conftest import REPO

SMALL = ['--config.data.synthetic.num_slides=2', '--config.data.synthetic.width=1024',
         '--config.data.synthetic.height=1024']
# A real run of configs/test.py that stays in its tile stage until killed.
RUN_THAT_STAYS_IN_TILE = '''
import sys, time
from pathjax import pipeline
from tests.conftest import make_config

def tile_forever(config, workdir, cohort):
    print('tiling', flush=True)
    time.sleep(600)

pipeline.STAGES = tuple(s._replace(run=tile_forever) if s.name == 'tile' else s
                        for s in pipeline.STAGES)
pipeline.run(make_config(**{'data.synthetic.num_slides': 2, 'data.synthetic.width': 1024,
                            'data.synthetic.height': 1024}), sys.argv[1], ['tile'])
'''


def launch(workdir):
    return subprocess.run([sys.executable, str(REPO / 'launch.py'), '--config',
                           str(REPO / 'configs/test.py'), '--workdir', str(workdir),
                           '--stages=tile', *SMALL],
                          capture_output=True, text=True, timeout=300, cwd=REPO)


def start_a_run_that_stays_in_tile(workdir):
    run = subprocess.Popen([sys.executable, '-c', RUN_THAT_STAYS_IN_TILE, str(workdir)],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO)
    assert run.stdout.readline() == 'tiling\n', run.communicate()
    return run


def test_a_second_run_is_refused_naming_the_first_and_kill_9_leaves_no_stale_lock(tmp_path):
    first = start_a_run_that_stays_in_tile(tmp_path)
    try:
        started = time.monotonic()
        second = launch(tmp_path)
        assert second.returncode == 2 and 'Traceback' not in second.stderr, second.stderr
        assert f'in use by another pathjax run (pid {first.pid} on host ' \
               f'{socket.gethostname()}' in second.stderr
        assert time.monotonic() - started < 60  # at once: no waiting for the lock
        assert not (tmp_path / 'tiles').exists()  # the second run touched nothing
        with pytest.raises(UsageError, match=f'pid {first.pid}'):
            with workdir_lock.hold(tmp_path):
                pass
    finally:
        os.kill(first.pid, signal.SIGKILL)
        first.wait()
    assert first.returncode == -signal.SIGKILL
    third = launch(tmp_path)  # the kernel released the killed run's lock
    assert third.returncode == 0, third.stderr
    assert len(list((tmp_path / 'tiles').glob('*.npz'))) == 2
    with workdir_lock.hold(tmp_path):
        assert json.loads(workdir_lock.lock_path(tmp_path, 0).read_text())['pid'] == os.getpid()


def test_each_process_rank_has_its_own_lock(tmp_path):
    with workdir_lock.hold(tmp_path, 0), workdir_lock.hold(tmp_path, 1):
        with pytest.raises(UsageError):
            with workdir_lock.hold(tmp_path, 1):
                pass
