"""Two processes (2 CPU devices each, jax.distributed over localhost) train the feature network
like one process with 4 devices: same global batches, same losses, same parameters; and tile a
cohort, each its share of the slides, into the same files as one process."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from pathjax import artifacts
from pathjax.slides import synthetic_cohort
from pathjax.train import feature_learning
from pathjax.runtime.checkpoint import Checkpoints
from pathjax.train.feature_learning import FeatureTrainer
from tests.conftest import LEARNING_COHORT, REPO, make_config, workdir_with_patches

# SGD rather than Adam: Adam divides by the gradient's own scale, so summation-order noise in
# near-zero gradients becomes step-sized differences.
SETTINGS = {**LEARNING_COHORT, 'learn.epochs': 1, 'learn.batch_size': 16, 'learn.optimizer': 'sgd',
            'learn.lr': 0.01, 'learn.log_every': 4}
FLAGS = [f'--config.{k}={v}' for k, v in SETTINGS.items()]


def launch(workdir, devices, *extra, program=(str(REPO / 'launch.py'),)):
    """launch.py (or `program`: arguments for python that run it) as a subprocess."""
    environment = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}'}
    command = [sys.executable, *program, '--config', str(REPO / 'configs/test.py'),
               '--workdir', str(workdir), '--stages=learn_features', *FLAGS, *extra]
    return subprocess.Popen(command, cwd=REPO, env=environment, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def final_params(workdir):
    config = make_config(**SETTINGS)
    trainer = FeatureTrainer(config, workdir)
    abstract = feature_learning.abstract_state(trainer.model, trainer.tx, config.tile.patch_size)
    with Checkpoints(workdir / 'feature_net') as checkpoints:
        state, metadata = checkpoints.restore(abstract)
    return state.params, metadata


def free_port():
    with socket.socket() as s:
        s.bind(('localhost', 0))
        return s.getsockname()[1]


def outputs_of(processes, timeout: float) -> list[str]:
    """Each process's output once it ended; a process still running after `timeout` seconds is
    killed (a hung process must not outlive the test)."""
    try:
        return [p.communicate(timeout=timeout)[0] for p in processes]
    finally:
        for process in processes:
            process.kill()


def test_two_processes_train_like_one(patch_workdir, tmp_path):
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    single.mkdir(), multi.mkdir()
    workdir_with_patches(patch_workdir, single)
    workdir_with_patches(patch_workdir, multi)
    coordinator = f'localhost:{free_port()}'
    processes = [launch(multi, 2, f'--config.distributed.coordinator={coordinator}',
                        '--config.distributed.num_processes=2',
                        f'--config.distributed.process_id={i}') for i in range(2)]
    reference = launch(single, 4)
    for process in processes + [reference]:
        output, _ = process.communicate(timeout=400)
        assert process.returncode == 0, output[-3000:]
    # The same batches in the same order: identical losses until the all-reduce's summation
    # order (gloo across processes vs in-process) shows, then rounding noise grows slowly.
    logged = [[json.loads(line) for line in (w / 'feature_net' / 'metrics.jsonl').open()]
              for w in (single, multi)]
    assert [r.get('step') for r in logged[0]] == [r.get('step') for r in logged[1]]
    assert logged[0][0]['loss'] == pytest.approx(logged[1][0]['loss'], rel=1e-6)
    single_params, single_meta = final_params(single)
    multi_params, multi_meta = final_params(multi)
    assert single_meta['epoch'] == multi_meta['epoch'] == 1
    assert single_meta['train_loss'] == pytest.approx(multi_meta['train_loss'], rel=1e-4)
    flat = [np.concatenate([np.ravel(x) for x in jax.tree.leaves(p)])
            for p in (single_params, multi_params)]
    assert np.linalg.norm(flat[0] - flat[1]) <= 1e-4 * np.linalg.norm(flat[0])


def test_a_failure_on_the_leader_stops_every_process(patch_workdir, tmp_path):
    """The leader refuses to tile a workdir tiled with another tile.mpp (its provenance check):
    the other process stops too, with an error naming it, instead of waiting for it forever."""
    workdir_with_patches(patch_workdir, tmp_path)
    (tmp_path / 'settings').mkdir(exist_ok=True)
    (tmp_path / 'settings' / 'tile.json').write_text(json.dumps({'tile.mpp': 1.0}))
    coordinator = f'localhost:{free_port()}'
    processes = [launch(tmp_path, 1, '--stages=tile',
                        f'--config.distributed.coordinator={coordinator}',
                        '--config.distributed.num_processes=2',
                        f'--config.distributed.process_id={i}') for i in range(2)]
    outputs = outputs_of(processes, timeout=120)
    assert [p.returncode for p in processes] == [2, 2], outputs
    assert 'tile.mpp' in outputs[0]
    assert 'process(es) [0] stopped the run' in outputs[1]


# launch.py with a bug planted in process 0: its provenance check raises a RuntimeError.
WITH_A_BUG_ON_PROCESS_0 = """
import runpy, sys
from pathjax import provenance
def planted_bug(*args):
    raise RuntimeError('planted bug')
if '--config.distributed.process_id=0' in sys.argv:
    provenance.check_and_record = planted_bug
sys.argv[0] = 'launch.py'
runpy.run_path('launch.py', run_name='__main__')
"""


def test_an_unexpected_error_on_one_process_stops_every_process(patch_workdir, tmp_path):
    """Not a StageError or UsageError (a bug): process 0 logs its traceback, and both processes
    stop at once (exit 1), process 1 naming process 0 and its error."""
    workdir_with_patches(patch_workdir, tmp_path)
    coordinator = f'localhost:{free_port()}'
    processes = [launch(tmp_path, 1, '--stages=tile',
                        f'--config.distributed.coordinator={coordinator}',
                        '--config.distributed.num_processes=2',
                        f'--config.distributed.process_id={i}',
                        program=('-c', WITH_A_BUG_ON_PROCESS_0)) for i in range(2)]
    outputs = outputs_of(processes, timeout=120)
    assert [p.returncode for p in processes] == [1, 1], outputs
    assert 'Traceback' in outputs[0] and 'planted bug' in outputs[0]
    assert ('process(es) [0] stopped the run: process 0: tile: unexpected RuntimeError on '
            'process 0: planted bug') in outputs[1], outputs[1]


def run_together(processes):
    """Waits for the processes; asserts they succeeded."""
    outputs = outputs_of(processes, timeout=400)
    assert [p.returncode for p in processes] == [0] * len(processes), outputs


def test_two_processes_tile_their_shares_into_one_process_files(tmp_path):
    classes = tuple(make_config().data.classes)
    manifest = synthetic_cohort.make_cohort(tmp_path / 'cohort', 6, classes, seed=0, width=2048,
                                            height=1536)
    # A corrupt file second, on process 1: its error reaches process 0's report.
    broken = tmp_path / 'cohort' / 'broken.svs'
    broken.write_bytes(b'not a slide')
    header, *rows = manifest.read_text().splitlines()
    rows.insert(1, f'broken,{broken},{classes[0]},broken')
    manifest.write_text('\n'.join([header, *rows]) + '\n')
    single, multi = tmp_path / 'single', tmp_path / 'multi'
    tile = ('--stages=tile', f'--config.data.manifest={manifest}',
            '--config.stain.method=histogram')  # the stain reference is compared too

    def two_processes():
        coordinator = f'localhost:{free_port()}'
        return [launch(multi, 1, *tile, f'--config.distributed.coordinator={coordinator}',
                       '--config.distributed.num_processes=2',
                       f'--config.distributed.process_id={i}') for i in range(2)]

    run_together(two_processes() + [launch(single, 1, *tile)])
    reports = [json.loads((w / 'reports' / 'tile.json').read_text())['slides']
               for w in (single, multi)]
    slide_ids = [line.split(',')[0] for line in manifest.read_text().splitlines()[1:]]
    assert [e['slide_id'] for e in reports[0]] == [e['slide_id'] for e in reports[1]] == slide_ids
    assert [e['status'] for e in reports[1]] == ['ok', 'error'] + ['ok'] * 5
    assert reports[1][1]['message'] == reports[0][1]['message']
    assert 'broken.svs' in reports[1][1]['message']
    # Slide i was scanned by process i % 2, and by process 0 alone in the one-process run.
    assert [e['process'] for e in reports[1]] == [i % 2 for i in range(len(slide_ids))]
    assert [e['process'] for e in reports[0]] == [0] * len(slide_ids)
    tiled = [s for s in slide_ids if s != 'broken']
    for name in [f'tiles/{s}.npz' for s in tiled] + ['stain/reference.npz']:
        expected, actual = (artifacts.load_npz(w / name) for w in (single, multi))
        assert sorted(expected) == sorted(actual), name
        for key in expected:
            np.testing.assert_array_equal(actual[key], expected[key], err_msg=f'{name}: {key}')
    assert not list((multi / 'tiles' / '.scan').glob('process-*.json'))  # merged, then gone
    # A rerun skips every finished slide and still reports them all.
    finished = {p: p.stat().st_mtime_ns for p in (multi / 'tiles').glob('*.npz')}
    run_together(two_processes())
    assert {p: p.stat().st_mtime_ns for p in (multi / 'tiles').glob('*.npz')} == finished
    rerun = json.loads((multi / 'reports' / 'tile.json').read_text())['slides']
    assert [(e['slide_id'], e['status'], e['patches'], e['message']) for e in rerun] == [
        (e['slide_id'], e['status'], e['patches'], e['message']) for e in reports[1]]

