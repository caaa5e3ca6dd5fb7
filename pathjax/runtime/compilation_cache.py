"""JAX's persistent compilation cache in the workdir, one folder per host instruction set.

A rerun in the same workdir (resuming, more slides, `predict`) loads its compiled programs
instead of compiling them again: 0.6 s for ViT-S/16's extraction network on 2 CPU cores, more
for VGG-16 and the train steps. XLA compiles CPU code for the host's own instruction set
(AVX-512 where the CPU has it), but JAX's cache key names only the platform ('cpu') and the
device kind: a workdir on a shared file system, run from hosts with different CPUs, would hand
one host's AVX-512 code to another without it, which dies on an illegal instruction. So each
instruction set has its own folder, <workdir>/jax_cache/<machine>-<digest of the CPU's flags>.
"""

import hashlib
import pathlib
import platform

import jax

from pathjax.host_cpu import first_cpu_fields

FOLDER = 'jax_cache'
# Compiles that took at least this long are cached (ViT-S/16's extraction network: 0.56 s on
# 2 cores); the many small ones (moving parameters, random keys) cost more to store than to redo.
MIN_COMPILE_SECONDS = 0.25


def host_key(cpu_fields: dict[str, str] | None = None) -> str:
    """'<machine>-<12 hex digits>' naming this host's instruction set: the digest of its CPU
    flags (x86 `flags`, Arm `Features` in /proc/cpuinfo, in any order), or of the processor's
    description where Linux gives none. `cpu_fields` stands in for /proc/cpuinfo's (tests)."""
    fields = first_cpu_fields() if cpu_fields is None else cpu_fields
    flags = fields.get('flags') or fields.get('Features')
    if flags:
        text = ' '.join(sorted(set(flags.split())))
    else:
        text = f'{platform.platform()} {platform.processor()}'
    return f'{platform.machine() or "unknown"}-{hashlib.sha256(text.encode()).hexdigest()[:12]}'


def folder(workdir, cpu_fields: dict[str, str] | None = None) -> pathlib.Path:
    """This host's cache folder in `workdir`."""
    return pathlib.Path(workdir) / FOLDER / host_key(cpu_fields)


def enable(workdir) -> pathlib.Path:
    """Points JAX's persistent compilation cache at this host's folder in `workdir` (before
    anything compiles); returns the folder."""
    path = folder(workdir)
    jax.config.update('jax_compilation_cache_dir', str(path))
    jax.config.update('jax_persistent_cache_min_compile_time_secs', MIN_COMPILE_SECONDS)
    return path
