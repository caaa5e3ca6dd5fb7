"""What machine a benchmark run used: a description for its JSON and a short slug for file names.

The accelerator is probed in a subprocess, so that the calling process never starts a JAX backend
(on a GPU that would hold most of its memory while the benchmarks run in other processes).
"""

import importlib.metadata
import json
import os
import platform
import re
import subprocess
import sys

PACKAGES = ('jax', 'jaxlib', 'flax', 'numpy', 'torch', 'openslide-python', 'openslide-bin')
_PROBE = ('import json, jax; d = jax.devices(); '
          'print(json.dumps({"platform": d[0].platform, "kind": d[0].device_kind, '
          '"count": len(d)}))')


def cpu_model() -> str:
    with open('/proc/cpuinfo') as info:
        for line in info:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def memory_bytes() -> int:
    with open('/proc/meminfo') as info:
        for line in info:
            if line.startswith('MemTotal:'):
                return int(line.split()[1]) * 1024
    return 0


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def accelerator() -> dict:
    """{'platform', 'kind', 'count'} of JAX's default devices, from a subprocess."""
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE='false', TF_CPP_MIN_LOG_LEVEL='3')
    probe = subprocess.run([sys.executable, '-c', _PROBE], capture_output=True, text=True,
                           env=env, timeout=300)
    if probe.returncode:
        return {'platform': 'unknown', 'kind': 'unknown', 'count': 0,
                'error': probe.stderr.strip().splitlines()[-1:]}
    return json.loads(probe.stdout.strip().splitlines()[-1])


def git_commit(folder: str) -> str | None:
    """HEAD's commit, with '+dirty' when tracked files differ from it."""
    try:
        head = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=folder, capture_output=True,
                              text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'],
                               cwd=folder, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ('+dirty' if dirty.strip() else '')) or None


def describe(folder: str) -> dict:
    """CPU model, cores, memory, accelerator, package versions, Python, git commit."""
    return {'cpu': cpu_model(), 'cores': os.cpu_count(),
            'cores_usable': len(os.sched_getaffinity(0)), 'memory_bytes': memory_bytes(),
            'accelerator': accelerator(), 'python': platform.python_version(),
            'packages': {name: version(name) for name in PACKAGES},
            'commit': git_commit(folder)}


def _slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def slug(description: dict) -> str:
    """e.g. 'xeon-processor-2c', 'xeon-platinum-8480-16c-h200'."""
    cpu = re.sub(r'\((r|tm)\)|@.*|\bcpu\b|\bintel\b|\bamd\b|\d+-core|\bprocessor\b', ' ',
                 description['cpu'].lower())
    name = f'{_slug(cpu) or _slug(description["cpu"])}-{description["cores"]}c'
    device = description['accelerator']
    if device['platform'] not in ('cpu', 'unknown'):
        name += '-' + _slug(re.sub(r'nvidia|\d+gb|hbm\w*', ' ', device['kind'].lower()))
    return name
