"""How many XLA devices a CPU process has (`config.cpu_devices`), set before JAX starts.

XLA's CPU backend runs one program at a time per device and gives each operation either all
cores (convolutions, large matmuls) or one (small operations: blocked attention's tiles and the
slide model's per-slide loops, which leave the other cores idle). With several CPU devices, data
parallelism splits every batch between them and their programs run side by side (BENCHMARKS.md:
the slide model's train step on 2 cores, 1 -> 2 devices). The count goes into `XLA_FLAGS`
(`--xla_force_host_platform_device_count`), which XLA reads once, when JAX starts its backend; a
count already in XLA_FLAGS (the tests', a user's own) is kept. Runs on a GPU or TPU use their
accelerators and ignore the CPU devices.

Results are bit-identical between runs with the same device count; a different count changes
the order of float additions (the gradient all-reduce), so fix `cpu_devices` to compare runs
across machines with different core counts.
"""

import os

import jax
from absl import logging
from jax._src import xla_bridge

from pathjax.runtime import cluster

FLAG = '--xla_force_host_platform_device_count'


def usable_cores() -> int:
    """Cores this process may run on."""
    return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count() or 1


def batch_sizes(config) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(global batch sizes, split over every process's devices; per-process batch sizes, split
    over this process's devices) of the config's device stages."""
    return (config.learn.batch_size, config.train.batch_slides), (config.extract.batch_size,)


def auto_count(cores: int, global_batches: tuple[int, ...], process_batches: tuple[int, ...],
               processes: int) -> int:
    """The most devices per process, at most `cores`, that split every batch evenly (1 when
    none does: the batch-size check names the problem)."""
    fits = [count for count in range(1, cores + 1)
            if all(batch % (count * processes) == 0 for batch in global_batches)
            and all(batch % count == 0 for batch in process_batches)]
    return max(fits, default=1)


def configured_count(config) -> int:
    """config.cpu_devices, or with 0 (auto) one device per usable core, as many as split every
    batch evenly."""
    if config.cpu_devices > 0:
        return config.cpu_devices
    processes = config.distributed.num_processes
    if config.distributed.coordinator == cluster.AUTO:
        processes = cluster.scheduled_processes()
    return auto_count(usable_cores(), *batch_sizes(config), processes)


def expose(config) -> int | None:
    """Puts this process's CPU device count (`configured_count`) into XLA_FLAGS; returns it, or
    None when XLA_FLAGS already sets one, JAX has already started its backend (the count is then
    what it was, with a warning), or the config's values are not usable (its check names them)."""
    sizes = [config.cpu_devices, config.distributed.num_processes, *sum(batch_sizes(config), ())]
    if not all(isinstance(n, int) and not isinstance(n, bool) for n in sizes) \
            or config.cpu_devices < 0 or config.distributed.num_processes < 1:
        return None
    count = set_count(configured_count(config))
    if count is None and xla_bridge.backends_are_initialized() and not _in_flags():
        logging.warning('JAX started its backend before the CPU device count was set: this '
                        'process runs on %d CPU device(s), not %d', len(jax.local_devices()),
                        configured_count(config))
    return count


def _in_flags() -> bool:
    """Whether XLA_FLAGS sets a CPU device count."""
    return any(flag.partition('=')[0] == FLAG for flag in os.environ.get('XLA_FLAGS', '').split())


def set_count(count: int) -> int | None:
    """`count` CPU devices from the start of JAX's backend, unless XLA_FLAGS already sets a count
    or the backend has started (then None)."""
    if _in_flags() or xla_bridge.backends_are_initialized():
        return None
    os.environ['XLA_FLAGS'] = ' '.join(os.environ.get('XLA_FLAGS', '').split() + [f'{FLAG}={count}'])
    return count
