"""What machine a benchmark run used: a description for its JSON and a short slug for file names.

A model string alone is not a machine (a VM may call itself "AMD EPYC"): the CPU is recorded with
its vendor, family, model and stepping (hence its microarchitecture), the ISA features that decide
the speed of dense math, the clock it reports and, from these, an upper bound of its float32 peak
(FLOP/s of fused multiply-adds on every usable core); a figure above that peak is flagged.

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

from pathjax.host_cpu import first_cpu_fields

PACKAGES = ('jax', 'jaxlib', 'flax', 'numpy', 'torch', 'timm', 'openslide-python', 'openslide-bin',
            'pillow', 'imagecodecs')
ISA = ('sse4_2', 'fma', 'avx2', 'avx512f', 'avx512_bf16', 'avx512_fp16', 'avx_vnni', 'amx_tile',
       'amx_bf16')
_PROBE = ('import json, jax; d = jax.devices(); '
          'print(json.dumps({"platform": d[0].platform, "kind": d[0].device_kind, '
          '"count": len(d)}))')


def cpu_model() -> str:
    with open('/proc/cpuinfo') as info:
        for line in info:
            if line.startswith('model name'):
                return line.split(':', 1)[1].strip()
    return platform.processor() or platform.machine()


def fp32_flops_per_cycle(vendor: str, family: int, model: int, isa: set[str]) -> int:
    """An upper bound of float32 FLOPs per cycle per core: 2 FMA pipes x vector lanes x 2.

    AMD: Zen 5 (family 26) executes AVX-512 at full 512-bit width (64); Zen 2-4 have two 256-bit
    FMA pipes (32; Zen 4 runs AVX-512 as two halves); Zen 1 (family 23, model < 0x30) 16. Intel:
    two 512-bit FMA units with AVX-512 (64, the Xeon Gold / Platinum case; one-unit parts reach
    half), two 256-bit with AVX2 + FMA (32). Others: 16.
    """
    if vendor == 'AuthenticAMD':
        if family >= 26:
            return 64 if 'avx512f' in isa else 32
        if family == 23 and model < 0x30:
            return 16
        return 32 if 'fma' in isa else 16
    if 'avx512f' in isa:
        return 64
    return 32 if {'avx2', 'fma'} <= isa else 16


def microarchitecture(vendor: str, family: int, model: int, isa: set[str]) -> str:
    """A name for the core (AMD by family and model; Intel by its widest ISA)."""
    if vendor == 'AuthenticAMD':
        if family == 23:
            return 'Zen 2' if model >= 0x30 else 'Zen / Zen+'
        if family == 25:
            return 'Zen 4' if 'avx512f' in isa else 'Zen 3'
        if family == 26:
            return 'Zen 5'
    if vendor == 'GenuineIntel':
        if 'amx_tile' in isa:
            return 'Intel with AMX (Sapphire Rapids or later)'
        if 'avx512f' in isa:
            return 'Intel with AVX-512'
        return 'Intel with AVX2' if 'avx2' in isa else 'Intel'
    return 'unknown'


def cpu_detail() -> dict:
    """Vendor, family / model / stepping, microarchitecture, ISA features, reported clock, and the
    float32 peak bound (FLOP/s on the cores this process may use)."""
    fields = first_cpu_fields()
    vendor = fields.get('vendor_id', platform.processor() or platform.machine())
    family, model = int(fields.get('cpu family', '0')), int(fields.get('model', '0'))
    isa = set(fields.get('flags', '').split()) & set(ISA)
    mhz = float(fields.get('cpu MHz', '0') or 0)
    try:  # the maximum (turbo) clock where the kernel exposes it; VMs usually do not
        with open('/sys/devices/system/cpu/cpu0/cpufreq/cpuinfo_max_freq') as f:
            mhz = max(mhz, int(f.read()) / 1000)
    except (OSError, ValueError):
        pass
    per_cycle = fp32_flops_per_cycle(vendor, family, model, isa)
    cores = len(os.sched_getaffinity(0))
    return {'vendor': vendor, 'family': family, 'model': model,
            'stepping': int(fields.get('stepping', '0') or 0),
            'microcode': fields.get('microcode'),
            'microarchitecture': microarchitecture(vendor, family, model, isa),
            'isa': [f for f in ISA if f in isa], 'clock_mhz': mhz,
            'fp32_flops_per_cycle_per_core': per_cycle,
            'fp32_peak_flops': per_cycle * mhz * 1e6 * cores}


def cpu_line() -> str:
    """One line for a script's header, e.g. 'AMD EPYC (family 26 model 2 stepping 1, Zen 5;
    fma avx2 avx512f avx512_bf16; 2596 MHz; fp32 peak 332 GFLOP/s on 2 cores)'."""
    d = cpu_detail()
    return (f'{cpu_model()} (family {d["family"]} model {d["model"]} stepping {d["stepping"]}, '
            f'{d["microarchitecture"]}; {" ".join(d["isa"]) or "no AVX"}; '
            f'{d["clock_mhz"]:.0f} MHz; '
            f'fp32 peak {d["fp32_peak_flops"] / 1e9:.0f} GFLOP/s on '
            f'{len(os.sched_getaffinity(0))} cores)')


def libraries() -> dict:
    """The codec and slide libraries' own versions: OpenSlide, libjpeg-turbo as Pillow and
    imagecodecs link it."""
    found = {}
    try:
        import openslide
        found['openslide'] = openslide.__library_version__
    except Exception as error:  # no library, or no binary: recorded, not fatal
        found['openslide'] = f'unavailable: {error}'
    try:
        from PIL import features
        found['libjpeg_turbo_pillow'] = features.version_feature('libjpeg_turbo')
    except Exception as error:
        found['libjpeg_turbo_pillow'] = f'unavailable: {error}'
    try:
        import imagecodecs
        found['libjpeg_turbo_imagecodecs'] = next(
            (part.split('-', 1)[1] for part in imagecodecs.version().split(', ')
             if part.startswith('libjpeg_turbo-')), None)
    except Exception as error:
        found['libjpeg_turbo_imagecodecs'] = f'unavailable: {error}'
    return found


def threads() -> dict:
    """What decides the threads each side uses: usable cores and the thread settings."""
    return {'cores_usable': len(os.sched_getaffinity(0)),
            **{name: os.environ.get(name) for name in ('OMP_NUM_THREADS', 'MKL_NUM_THREADS',
                                                        'XLA_FLAGS')}}


def above_peak(rows: list[dict], machine: dict) -> list[str]:
    """Rows whose `flops_per_s` (a CPU figure) exceeds the float32 peak bound of the cores they
    ran on (`threads` of the row, else every usable core), with the clock that figure implies."""
    if machine['accelerator'].get('platform') not in ('cpu', 'unknown'):
        return []
    detail = machine['cpu_detail']
    per_core = detail['fp32_flops_per_cycle_per_core'] * detail['clock_mhz'] * 1e6
    found = []
    for r in rows:
        cores = r.get('threads') or machine['cores_usable']
        if per_core and r.get('flops_per_s', 0) > per_core * cores:
            implied = r['flops_per_s'] / (detail['fp32_flops_per_cycle_per_core'] * cores) / 1e9
            found.append(f'{r.get("benchmark")}: {r["name"]}: {r["flops_per_s"] / 1e9:.0f} '
                         f'GFLOP/s is above the float32 peak of {cores} core(s) at the reported '
                         f'{detail["clock_mhz"]:.0f} MHz ({per_core * cores / 1e9:.0f} GFLOP/s): '
                         f'it needs at least {implied:.2f} GHz (a turbo clock), or the FLOP count '
                         'or the machine record is wrong')
    return found


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
    """CPU model and detail, cores, threads, memory, accelerator, package and library versions,
    Python, git commit."""
    return {'cpu': cpu_model(), 'cpu_detail': cpu_detail(), 'cores': os.cpu_count(),
            'cores_usable': len(os.sched_getaffinity(0)), 'threads': threads(),
            'memory_bytes': memory_bytes(), 'accelerator': accelerator(),
            'python': platform.python_version(),
            'packages': {name: version(name) for name in PACKAGES}, 'libraries': libraries(),
            'commit': git_commit(folder)}


def _slug(text: str) -> str:
    return re.sub(r'[^a-z0-9]+', '-', text.lower()).strip('-')


def cpu_slug() -> str:
    """This CPU and its core count, e.g. 'xeon-platinum-8480-16c'; a model string without a
    number (a VM's 'AMD EPYC') gains the microarchitecture: 'epyc-zen-5-2c'."""
    model = cpu_model()
    cpu = _slug(re.sub(r'\((r|tm)\)|@.*|\bcpu\b|\bintel\b|\bamd\b|\d+-core|\bprocessor\b', ' ',
                       model.lower())) or _slug(model)
    core = cpu_detail()['microarchitecture']
    if not re.search(r'\d', cpu) and core != 'unknown':
        cpu += '-' + _slug(core.split(' (')[0])
    return f'{cpu}-{os.cpu_count()}c'


def slug(description: dict) -> str:
    """This machine: its CPU (`cpu_slug`) and accelerator, e.g. 'xeon-platinum-8480-16c-h200'."""
    name = cpu_slug()
    device = description['accelerator']
    if device['platform'] not in ('cpu', 'unknown'):
        name += '-' + _slug(re.sub(r'nvidia|\d+gb|hbm\w*', ' ', device['kind'].lower()))
    return name
