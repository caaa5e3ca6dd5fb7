"""Runs every benchmark, prints one table and writes benchmarks/results/<machine>-<date>.json.

  pip install -e '.[bench]'     # torch, scikit-learn, scipy, threadpoolctl: the references
  python -m benchmarks [--quick] [--only patch_reading,tile_stage,...] [--out DIR]

Each script's `run(quick) -> list[dict]` runs in its own subprocess (scripts pin threads and set
XLA flags before JAX starts, so they cannot share a process), from the repository root with
benchmarks/ on sys.path. A row (rows.py) holds pathjax's figure, a reference measured in the same
run, and their ratio (> 1: pathjax better). A script that fails, returns an invalid row or runs
past its time limit leaves a failed row in the table and the JSON, and the exit status is 1.
--quick takes about 3 minutes on 2 cores (the test suite runs it); the full run about 40.
"""

import argparse
import datetime
import importlib
import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

import machine_info  # noqa: E402
import rows  # noqa: E402

SCRIPTS = ('patch_reading', 'tile_stage', 'feature_net', 'vit_encoders', 'extraction',
           'trident_pipeline', 'patch_input', 'slide_model', 'slide_input', 'slide_baselines')
TIME_LIMIT = {True: 240, False: 3600}  # seconds per script, quick or full
TAIL = 2000  # characters of a failed script's output kept in its row


def child(name: str, quick: bool, rows_file: str) -> None:
    """In the script's subprocess: its run(quick), as JSON in rows_file."""
    module = importlib.import_module(name)
    if not hasattr(module, 'run'):
        raise SystemExit(f'benchmarks/{name}.py has no run(quick) yet: skipped')
    pathlib.Path(rows_file).write_text(json.dumps(module.run(quick)))


def failed(name: str, error: str, output: str = '') -> dict:
    """The row standing for a script that gave no valid row: `error` in one line."""
    return {'benchmark': name, 'name': 'FAILED', 'error': error, 'output': output[-TAIL:]}


def last_line(text: str) -> str:
    lines = [line for line in text.splitlines() if line.strip()]
    return lines[-1].strip() if lines else '(no output)'


def run_script(name: str, quick: bool) -> tuple[list[dict], dict]:
    """(the script's rows, each checked, or one failed row; what the run took)."""
    limit = TIME_LIMIT[quick]
    with tempfile.TemporaryDirectory() as folder:
        rows_file, log_file = pathlib.Path(folder) / 'rows.json', pathlib.Path(folder) / 'log'
        command = [sys.executable, '-m', 'benchmarks', '--child', name, '--rows-file',
                   str(rows_file)] + ['--quick'] * quick
        start, timed_out = time.perf_counter(), False
        with open(log_file, 'w') as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                returncode = process.wait(limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)  # the script and any process it started
                returncode, timed_out = process.wait(), True
        took = {'seconds': round(time.perf_counter() - start, 1), 'returncode': returncode}
        output = log_file.read_text(errors='replace')
        if timed_out:
            return [failed(name, f'ran past its {limit} s limit', output)], took
        if returncode:
            return [failed(name, f'exit status {returncode}: {last_line(output)}', output)], took
        found = json.loads(rows_file.read_text())
    checked = []
    for candidate in found if isinstance(found, list) else [found]:
        if isinstance(candidate, dict):
            candidate = {**candidate, 'benchmark': name}
        wrong = rows.problems(candidate)
        checked.append(failed(name, f'invalid row {candidate.get("name")!r}: {"; ".join(wrong)}',
                              json.dumps(candidate)) if wrong else candidate)
    return checked or [failed(name, 'run(quick) returned no rows')], took


def table(all_rows: list[dict]) -> str:
    """A markdown table of the rows (failed rows show their error's first line)."""
    lines = ['| benchmark | row | unit | pathjax | reference | ratio | bound |',
             '|---|---|---|---|---|---|---|']
    for r in all_rows:
        if r['name'] == 'FAILED':
            lines.append(f'| {r["benchmark"]} | **FAILED** | | | | | {r["error"]} |')
        else:
            lines.append(f'| {r["benchmark"]} | {r["name"]} | {r["unit"]} | {r["pathjax"]:.4g} '
                         f'| {r["reference"]:.4g} ({r["reference_name"]}) | '
                         f'**{r["ratio"]:.2f}x** | {r["bound"]} |')
    return '\n'.join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='small sizes, about 5 minutes')
    parser.add_argument('--only', help=f'comma-separated scripts among {",".join(SCRIPTS)}')
    parser.add_argument('--out', default=str(HERE / 'results'), help='folder for the JSON')
    parser.add_argument('--child', help=argparse.SUPPRESS)
    parser.add_argument('--rows-file', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.quick, args.rows_file)
        return 0
    chosen = args.only.split(',') if args.only else list(SCRIPTS)
    unknown = sorted(set(chosen) - set(SCRIPTS))
    if unknown:
        parser.error(f'unknown benchmark(s) {", ".join(unknown)}; '
                     f'choose among {", ".join(SCRIPTS)}')
    load_before, started = os.getloadavg(), time.perf_counter()
    machine = machine_info.describe(str(REPO))
    all_rows, scripts = [], {}
    for name in chosen:
        print(f'{name} ...', end=' ', flush=True)
        found, scripts[name] = run_script(name, args.quick)
        all_rows += found
        bad = sum(r['name'] == 'FAILED' for r in found)
        print(f'{scripts[name]["seconds"]:.0f} s, {len(found) - bad} rows'
              + (f', {bad} FAILED' if bad else ''), flush=True)
    report = {'command': [sys.executable, '-m', 'benchmarks', *sys.argv[1:]],
              'quick': args.quick, 'date': datetime.datetime.now().isoformat(timespec='seconds'),
              'seconds': round(time.perf_counter() - started, 1), 'machine': machine,
              'load_average_before': load_before, 'load_average_after': os.getloadavg(),
              'scripts': scripts, 'rows': all_rows,
              'above_peak': machine_info.above_peak(all_rows, machine)}
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f'{machine_info.slug(machine)}-{datetime.date.today().isoformat()}.json'
    path.write_text(json.dumps(report, indent=1) + '\n')
    print('\n' + table(all_rows) + '\n')
    for warning in report['above_peak']:
        print(f'ABOVE PEAK: {warning}')
    for r in all_rows:
        if r['name'] == 'FAILED':
            print(f'{r["benchmark"]} FAILED: {r["error"]}\n{r["output"]}\n', file=sys.stderr)
    print(f'{report["seconds"]:.0f} s, load average {load_before[0]:.2f} before and '
          f'{report["load_average_after"][0]:.2f} after; wrote {path}')
    return int(any(r['name'] == 'FAILED' for r in all_rows))


if __name__ == '__main__':
    sys.exit(main())
