"""Kill harness: SIGKILL `launch.py --config configs/test.py` inside every stage, rerun, and
check that the resumed run ends where an uninterrupted one does.

One reference run goes straight through. The killed chain starts the same command in its own
workdir and kills it (SIGKILL, the whole process group: slide workers too) at each kill point in
turn: a point is reached when its stage is the one running (the last 'stage <name>' line of the
log) and its condition on the workdir holds (e.g. the 3rd features file written); then the same
command starts again, resuming, until the next point. A point whose stage was over before it was
reached counts as missed. After the last point the chain runs to the end, and its outputs must
equal the reference's: every split's predictions.csv and metrics.json, the train_slide report
(training summary and metrics), feature learning's metrics log (each line once, timings aside)
and the features files' arrays (bit for bit: CPU runs are deterministic on the same number of
devices). Too long for the test suite (about 10 minutes on 2 cores); run it before
resolving a change to resume or artifacts:

  python -m tests.kill_resume [--workdir /tmp/kill_resume] [--only tile,extract] [--processes 2]

With --processes 2 both runs are two processes (jax.distributed on localhost, one CPU device
each); a kill point SIGKILLs one of them (process 0 and 1 in turn) and a second later the other,
as a job scheduler stops a job whose task died, and the chain resumes with both. Process 0 builds
the patch dataset alone, in about 0.4 s at test sizes: when process 1 is killed first, process 0
finishes it within that second, and the stage's later points are missed (16 of 18 land).

Exit status 0 when every stage had at least 3 kills land and the outputs match.
"""

import argparse
import json
import os
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = pathlib.Path(__file__).resolve().parent.parent
POLL_SECONDS = 0.005


def count(folder: pathlib.Path, pattern: str) -> int:
    return len(list(folder.glob(pattern))) if folder.is_dir() else 0


def lines(path: pathlib.Path) -> int:
    return len(path.read_text().splitlines()) if path.exists() else 0


def steps(folder: pathlib.Path) -> int:
    """Finished Orbax checkpoints (step folders) in folder."""
    return len([p for p in folder.iterdir() if p.name.isdigit()]) if folder.is_dir() else 0


# (stage, what, condition on the workdir): at least three per stage, each mid-work.
KILL_POINTS = [
    ('tile', '1st slide scanned', lambda w: count(w / 'tiles' / '.scan', '*.npz') >= 1),
    ('tile', '3rd slide scanned', lambda w: count(w / 'tiles' / '.scan', '*.npz') >= 3),
    ('tile', '6th slide scanned', lambda w: count(w / 'tiles' / '.scan', '*.npz') >= 6),
    ('patches', '1st slide staged', lambda w: count(w / 'patches' / 'staged', '*.npz') >= 1),
    ('patches', '2nd slide staged', lambda w: count(w / 'patches' / 'staged', '*.npz') >= 2),
    ('patches', '4th slide staged', lambda w: count(w / 'patches' / 'staged', '*.npz') >= 4),
    ('learn_features', 'a step logged in epoch 1',
     lambda w: lines(w / 'feature_net' / 'metrics.jsonl') >= 1),
    ('learn_features', 'epoch 1 checkpointed', lambda w: steps(w / 'feature_net' / 'latest') >= 1),
    ('learn_features', 'epoch 2 checkpointed', lambda w: steps(w / 'feature_net' / 'latest') >= 2),
    ('extract', '1st slide extracted', lambda w: count(w / 'features', '*.npz') >= 1),
    ('extract', '3rd slide extracted', lambda w: count(w / 'features', '*.npz') >= 3),
    ('extract', '6th slide extracted', lambda w: count(w / 'features', '*.npz') >= 6),
    ('train_slide', '1st graph file', lambda w: count(w / 'graphs', '*.npz') >= 1),
    ('train_slide', '1st checkpoint', lambda w: steps(w / 'slide_net' / 'latest') >= 1),
    ('train_slide', '2nd checkpoint', lambda w: steps(w / 'slide_net' / 'latest') >= 2),
    ('evaluate', '1st heatmap', lambda w: count(w / 'eval', '*/heatmaps/*.png') >= 1),
    ('evaluate', '2nd heatmap', lambda w: count(w / 'eval', '*/heatmaps/*.png') >= 2),
    ('evaluate', '1st split written', lambda w: count(w / 'eval', '*/metrics.json') >= 1),
]


class Run:
    """`processes` launch.py processes of one run (1 CPU device each when there are several,
    jax.distributed over localhost), output appended to log (process 0's) and log.<i>."""

    def __init__(self, workdir: pathlib.Path, log: pathlib.Path, processes: int):
        environment = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
        command = [sys.executable, 'launch.py', '--config', 'configs/test.py',
                   f'--workdir={workdir}', '--verbosity=0']  # its 'stage <name>' records
        if processes > 1:
            environment['XLA_FLAGS'] = '--xla_force_host_platform_device_count=1'
            with socket.socket() as s:
                s.bind(('localhost', 0))
                coordinator = f'localhost:{s.getsockname()[1]}'
            command += [f'--config.distributed.coordinator={coordinator}',
                        f'--config.distributed.num_processes={processes}']
        self.processes = [subprocess.Popen(
            command + ([f'--config.distributed.process_id={i}'] if processes > 1 else []),
            cwd=REPO, env=environment, stdout=open(log if i == 0 else f'{log}.{i}', 'ab'),
            stderr=subprocess.STDOUT, start_new_session=True) for i in range(processes)]

    def running(self) -> bool:
        return all(p.poll() is None for p in self.processes)

    def kill(self, which: int) -> None:
        """SIGKILL process `which` (its whole process group: slide workers too); one second
        later the others, as a job scheduler stops a job one of whose tasks died."""
        os.killpg(self.processes[which].pid, signal.SIGKILL)
        time.sleep(1.0 if len(self.processes) > 1 else 0.0)
        for process in self.processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
        for process in self.processes:
            process.wait()

    def wait(self) -> int:
        """The first nonzero exit status, or 0."""
        return max(abs(p.wait()) for p in self.processes)


class StageWatch:
    """The stage a run is in: the last 'stage <name>' line of its log, read as it grows."""

    def __init__(self, log: pathlib.Path):
        self._file = open(log, 'rb')
        self._file.seek(0, os.SEEK_END)  # this run's lines only
        self._pending, self.stage = b'', None

    def update(self) -> str | None:
        *complete, self._pending = (self._pending + self._file.read()).split(b'\n')
        for line in complete:
            found = re.search(rb'\] stage (\w+)', line)
            if found:
                self.stage = found.group(1).decode()
        return self.stage


def run_with_kills(workdir: pathlib.Path, points: list, processes: int) -> list[dict]:
    """The killed chain; returns what happened at each kill point. With several processes the
    point's index picks the process killed first (0, 1, 0, ...)."""
    log = workdir.parent / f'{workdir.name}.log'
    log.write_bytes(b'')
    results, run, watch = [], None, None
    for index, (stage, what, condition) in enumerate(points):
        if run is None:
            watch = StageWatch(log)
            run = Run(workdir, log, processes)
        landed = False
        while run.running():
            stage_now = watch.update()
            if stage_now == stage and condition(workdir):
                run.kill(index % processes)
                landed, run = True, None
                break
            if stage_now is not None and _order(stage_now) > _order(stage):
                break  # this point's stage is over
            time.sleep(POLL_SECONDS)
        if run is not None and not run.running():
            if run.wait():
                raise SystemExit(f'a run failed before {stage}: {what}; see {log}')
            run = None  # it finished before the point
        results.append({'stage': stage, 'at': what, 'landed': landed,
                        'killed_first': index % processes if landed else None})
        print(f'{stage:15s} {what:28s} {"killed" if landed else "missed"}', flush=True)
    if run is None:
        run = Run(workdir, log, processes)
    if run.wait():
        raise SystemExit(f'the resumed run failed; see {log}')
    return results


STAGES = ('tile', 'patches', 'learn_features', 'extract', 'train_slide', 'evaluate')


def _order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else -1


def outputs(workdir: pathlib.Path) -> dict:
    """What must not depend on the kills: predictions, metrics and features."""
    found = {}
    for path in sorted((workdir / 'eval').glob('*/predictions.csv')):
        found[str(path.relative_to(workdir))] = path.read_text()
    for path in sorted((workdir / 'eval').glob('*/metrics.json')):
        found[str(path.relative_to(workdir))] = json.loads(path.read_text())
    found['train_slide report'] = json.loads(
        (workdir / 'reports' / 'train_slide.json').read_text())
    found['feature_net/metrics.jsonl'] = [  # each line once, timings aside
        {k: v for k, v in json.loads(line).items() if k != 'images_per_second'}
        for line in (workdir / 'feature_net' / 'metrics.jsonl').read_text().splitlines()]
    for path in sorted((workdir / 'features').glob('*.npz')):
        with np.load(path) as data:
            found[str(path.relative_to(workdir))] = {k: data[k].tobytes() for k in data.files}
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workdir', type=pathlib.Path, default=pathlib.Path('/tmp/kill_resume'))
    parser.add_argument('--only', default='', help='comma-separated stages to kill in')
    parser.add_argument('--processes', type=int, default=1,
                        help='processes per run (jax.distributed on localhost, 1 CPU device '
                             'each); the reference runs with as many')
    args = parser.parse_args()
    points = [p for p in KILL_POINTS if not args.only or p[0] in args.only.split(',')]
    shutil.rmtree(args.workdir, ignore_errors=True)
    args.workdir.mkdir(parents=True)
    reference, killed = args.workdir / 'reference', args.workdir / 'killed'
    started = time.perf_counter()
    print('reference run ...', flush=True)
    if Run(reference, args.workdir / 'reference.log', args.processes).wait():
        raise SystemExit(f'the reference run failed; see {args.workdir / "reference.log"}')
    reference_seconds = time.perf_counter() - started
    results = run_with_kills(killed, points, args.processes)
    expected, got = outputs(reference), outputs(killed)
    different = sorted(k for k in expected.keys() | got.keys() if expected.get(k) != got.get(k))
    landed = {s: sum(r['landed'] for r in results if r['stage'] == s) for s in STAGES}
    summary = {'processes': args.processes, 'kills': sum(landed.values()),
               'points': len(results), 'per_stage': landed,
               'outputs_compared': len(expected), 'different': different,
               'reference_seconds': round(reference_seconds, 1),
               'total_seconds': round(time.perf_counter() - started, 1)}
    print(json.dumps(summary, indent=1))
    (args.workdir / 'summary.json').write_text(json.dumps({**summary, 'results': results},
                                                          indent=1))
    wanted = {p[0] for p in points}
    if different or any(landed[s] < 3 for s in wanted):
        raise SystemExit(1)


if __name__ == '__main__':
    main()
