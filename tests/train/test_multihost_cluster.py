"""distributed.coordinator=auto: processes that take their ranks from the scheduler (here the
environment `srun` gives a two-task job step on one node, read by JAX's SLURM detection) run
every stage like processes given their ranks by hand; without a scheduler, or with ranks in the
config as well, the run refuses; a workdir that is not shared between the processes is refused
on every process."""

import json
import os
import random
import socket
import subprocess
import sys

import jax
import pytest

from pathjax import pipeline
from pathjax.errors import UsageError
from pathjax.runtime import cluster, sharding, shared_workdir
from tests import kill_resume
from tests.conftest import REPO, make_config

SLURM_FIRST_PORT = 65535 - 2**12 + 1  # JAX's SLURM coordinator port: this + SLURM_JOB_ID % 4096

# Variables of schedulers JAX detects (and its own overrides): none may leak into a test.
FOREIGN = ('SLURM_', 'SLURMD_', 'OMPI_', 'PMIX_', 'JAX_COORDINATOR', 'JAX_LOCAL_DEVICE_IDS',
           'KUBERNETES_SERVICE_HOST', 'TPU_WORKER_HOSTNAMES', 'TPU_PROCESS_ADDRESSES')


def without_schedulers(environment) -> dict:
    return {k: v for k, v in environment.items() if not k.startswith(FOREIGN)}


def slurm_job_id() -> int:
    """A job id whose coordinator port (as JAX's SLURM detection picks it) is free now."""
    for offset in random.sample(range(2**12), 2**12):
        with socket.socket() as s:
            try:
                s.bind(('localhost', SLURM_FIRST_PORT + offset))
            except OSError:
                continue
        return 2**12 * 1000 + offset  # a job id in the millions, as on a busy cluster
    raise RuntimeError('no free port in JAX\'s SLURM range')


def srun_environment(tasks: int, task: int, job_id: int) -> dict:
    """The SLURM variables `srun --ntasks=<tasks>` gives task `task` of a job step on one node
    (SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID are what JAX
    reads; the others srun sets too)."""
    return {'SLURM_JOB_ID': str(job_id), 'SLURM_JOBID': str(job_id), 'SLURM_STEP_ID': '0',
            'SLURM_NTASKS': str(tasks), 'SLURM_NPROCS': str(tasks),
            'SLURM_STEP_NUM_TASKS': str(tasks), 'SLURM_PROCID': str(task),
            'SLURM_LOCALID': str(task), 'SLURM_NODEID': '0', 'SLURM_NNODES': '1',
            'SLURM_JOB_NUM_NODES': '1', 'SLURM_STEP_NUM_NODES': '1',
            'SLURM_NODELIST': 'localhost', 'SLURM_JOB_NODELIST': 'localhost',
            'SLURM_STEP_NODELIST': 'localhost', 'SLURM_TASKS_PER_NODE': str(tasks),
            'SLURM_STEP_TASKS_PER_NODE': str(tasks), 'SLURMD_NODENAME': 'localhost'}


def srun(workdirs, logs, *flags, job_id: int | None = None) -> list[subprocess.Popen]:
    """launch.py with configs/test.py as the tasks of one SLURM job step (one per workdir, one
    CPU device each) with distributed.coordinator=auto, each writing into its log file (INFO
    records kept: --verbosity=0)."""
    job_id = slurm_job_id() if job_id is None else job_id
    command = [sys.executable, 'launch.py', '--config', 'configs/test.py', '--verbosity=0',
               '--config.distributed.coordinator=auto', *flags]
    return [subprocess.Popen(
        command + [f'--workdir={workdir}'], cwd=REPO, stdout=open(log, 'w'),
        stderr=subprocess.STDOUT,
        env={**without_schedulers(os.environ), **srun_environment(len(workdirs), i, job_id),
             'XLA_FLAGS': '--xla_force_host_platform_device_count=1'})
        for i, (workdir, log) in enumerate(zip(workdirs, logs))]


def outputs_of(processes, logs, timeout: float) -> list[str]:
    """Each process's log once all ended; one still running after `timeout` s is killed."""
    try:
        for process in processes:
            process.wait(timeout=timeout)
    finally:
        for process in processes:
            process.kill()
            process.wait()
    return [log.read_text() for log in logs]


@pytest.fixture
def no_scheduler(monkeypatch):
    """This process's environment without any scheduler's variables."""
    for name in list(os.environ):
        if name.startswith(FOREIGN):
            monkeypatch.delenv(name)


def test_auto_without_a_scheduler_refuses_naming_what_is_missing(no_scheduler, monkeypatch):
    def must_not_start(*args, **kwargs):
        raise AssertionError('jax.distributed.initialize called')

    monkeypatch.setattr(jax.distributed, 'initialize', must_not_start)
    assert cluster.detected_cluster() is None
    with pytest.raises(UsageError) as refusal:
        sharding.initialize_distributed(cluster.AUTO, 1, 0)
    message = str(refusal.value)
    assert message.startswith('distributed.coordinator=auto found no cluster: SLURM: none of '
                              'SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, '
                              'SLURM_LOCALID is set'), message
    assert 'Open MPI: no OMPI_MCA_orte_hnp_uri' in message
    assert 'distributed.coordinator=host:port with distributed.num_processes' in message
    # Inside a SLURM allocation but not started by srun (no job step): what srun would add.
    monkeypatch.setenv('SLURM_JOB_ID', '1234')
    monkeypatch.setenv('SLURM_NTASKS', '2')
    with pytest.raises(UsageError, match='SLURM: SLURM_JOB_ID, SLURM_NTASKS but not '
                                         'SLURM_STEP_NODELIST, SLURM_PROCID, SLURM_LOCALID'):
        sharding.initialize_distributed(cluster.AUTO, 1, 0)


def test_jax_detects_srun_and_prefers_mpirun_when_both_are_there(no_scheduler, monkeypatch):
    for name, value in srun_environment(2, 1, 4096 + 7).items():
        monkeypatch.setenv(name, value)
    assert cluster.detected_cluster() == 'SLURM'
    monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1531576320.0;tcp://10.96.0.1:34911')
    assert cluster.detected_cluster() == 'Open MPI'  # mpirun inside a SLURM job


def test_auto_with_ranks_in_the_config_is_a_config_error():
    def distributed_problems(**overrides):
        return [p for p in pipeline.check_config(make_config(**overrides)) if 'distributed' in p]

    assert distributed_problems(**{'distributed.coordinator': 'auto'}) == []
    for ranks in ({'distributed.num_processes': 2}, {'distributed.process_id': 1}):
        problems = distributed_problems(**{'distributed.coordinator': 'auto'}, **ranks)
        assert len(problems) == 1 and 'takes the process count and id from the scheduler' \
            in problems[0], problems
    # The explicit form as before: its ranks are its own.
    assert distributed_problems(**{'distributed.coordinator': 'localhost:1234',
                                   'distributed.num_processes': 2,
                                   'distributed.process_id': 1}) == []
    # CPU devices: with auto the process count is unknown before JAX starts: one process's
    # split is checked (learn.batch_size=32 over 3 devices fails whatever the count).
    problems = pipeline.check_config(make_config(**{'distributed.coordinator': 'auto',
                                                    'cpu_devices': 3}))
    assert any("cpu_devices=3 (x the scheduler's processes)" in p for p in problems), problems


def test_a_workdir_without_process_0s_marker_is_refused(tmp_path):
    leader = {'token': 'a1b2', 'host': 'node001'}
    marker = tmp_path / shared_workdir.FOLDER / 'a1b2.json'
    refusal = shared_workdir.marker_problem(tmp_path, marker, leader, 3, wait_seconds=0)
    assert str(refusal) == (
        f'the workdir {tmp_path} is not shared: process 3 on host {socket.gethostname()} does '
        f'not see the marker .pathjax-hosts/a1b2.json that process 0 wrote into its workdir on '
        'host node001; put the workdir on a file system that every host mounts (NFS, Lustre, '
        'GCS FUSE) and give every process the same --workdir')
    marker.parent.mkdir()
    marker.write_text(json.dumps({**leader, 'token': 'another run'}))
    assert shared_workdir.marker_problem(tmp_path, marker, leader, 3, wait_seconds=0) is not None
    marker.write_text(json.dumps(leader))
    assert shared_workdir.marker_problem(tmp_path, marker, leader, 3, wait_seconds=0) is None


def test_a_slurm_step_with_a_workdir_per_host_stops_on_every_process(tmp_path):
    """Two srun tasks, each given its own workdir (a local disk per host): both start from
    SLURM's variables, then both stop (exit 2) naming process 1's unshared workdir."""
    workdirs = [tmp_path / 'host0', tmp_path / 'host1']
    job_id = slurm_job_id()
    logs = [tmp_path / 'task0.log', tmp_path / 'task1.log']
    processes = srun(workdirs, logs, '--stages=tile', job_id=job_id)
    outputs = outputs_of(processes, logs, timeout=180)
    assert [p.returncode for p in processes] == [2, 2], outputs
    port = SLURM_FIRST_PORT + job_id % 2**12  # on the step's first node
    for task, output in enumerate(outputs):
        assert f'distributed.coordinator=auto: SLURM: process {task} of 2, coordinator ' \
               f'localhost:{port}, 1 local device(s) of 2' in output, output
        assert f'the workdir {workdirs[1]} is not shared: process 1 on host ' in output, output
    assert 'process(es) [1] stopped the run' in outputs[0]
    assert not (workdirs[0] / 'tiles').exists()  # refused before any stage
    assert not (workdirs[0] / shared_workdir.FOLDER).exists()  # process 0 removed its marker


# One kill per stage, mid-work (tests/kill_resume.py has three per stage and runs outside the
# suite): (stage, point) from its KILL_POINTS.
KILLED_AT = {'tile': '3rd slide scanned', 'patches': '2nd slide staged',
             'learn_features': 'epoch 1 checkpointed', 'extract': '3rd slide extracted',
             'train_slide': '1st checkpoint', 'evaluate': '1st heatmap'}


def test_a_slurm_step_runs_every_stage_as_ranks_by_hand_resumed_after_a_kill_in_each(tmp_path):
    """configs/test.py end to end three ways, on two CPU devices in all: as two srun tasks
    with coordinator=auto (one device each); as one process (two devices); and as two processes
    given coordinator, num_processes and process_id by hand (tests/kill_resume.py), SIGKILLed
    once in every stage (process 0 and process 1 in turn, the other a second later) and rerun.
    Their predictions, metrics, training logs and features files are equal bit for bit: auto
    starts the same run as one process and as the explicit form, and a killed 2-process run
    resumes to the same end."""
    points = [point for point in kill_resume.KILL_POINTS if KILLED_AT[point[0]] == point[1]]
    assert len(points) == len(KILLED_AT)
    reference, single = tmp_path / 'reference', tmp_path / 'single'
    logs = [tmp_path / 'task0.log', tmp_path / 'task1.log', tmp_path / 'single.log']
    processes = srun([reference] * 2, logs[:2]) + [subprocess.Popen(
        [sys.executable, 'launch.py', '--config', 'configs/test.py', f'--workdir={single}'],
        cwd=REPO, stdout=open(logs[2], 'w'), stderr=subprocess.STDOUT,
        env={**without_schedulers(os.environ),
             'XLA_FLAGS': '--xla_force_host_platform_device_count=2'})]
    outputs = outputs_of(processes, logs, timeout=400)
    assert [p.returncode for p in processes] == [0, 0, 0], [o[-3000:] for o in outputs]
    for task, output in enumerate(outputs[:2]):
        assert f'distributed.coordinator=auto: SLURM: process {task} of 2' in output
    assert not (reference / shared_workdir.FOLDER).exists()
    results = kill_resume.run_with_kills(tmp_path / 'killed', points, processes=2)
    expected = kill_resume.outputs(reference)
    assert len(expected) > 10  # features files, predictions and metrics of every split
    for other in (single, tmp_path / 'killed'):
        got = kill_resume.outputs(other)
        assert sorted(k for k in expected.keys() | got.keys()
                      if expected.get(k) != got.get(k)) == [], other.name
    landed = [r['stage'] for r in results if r['landed']]
    assert len(landed) >= 5, results  # the patches stage may end within the kill's second
