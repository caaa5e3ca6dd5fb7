"""One device mesh with a `data` axis, its shardings, and multi-host setup.

Training and inference are data parallel: the state is replicated, each batch is split along its
first axis over the mesh's `data` axis, and XLA inserts the gradient all-reduce. On several hosts
each process loads its own part of every global batch (`global_batch`) and runs the same code
after `initialize_distributed`.
"""

from typing import Any, Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from pathjax.errors import StageError, UsageError
from pathjax.runtime import cluster

DATA_AXIS = 'data'


def initialize_distributed(coordinator: str, num_processes: int, process_id: int) -> None:
    """jax.distributed.initialize for multi-host runs: from the config's host:port and ranks, or
    from the scheduler that started the processes (coordinator='auto', `cluster`); nothing when
    `coordinator` is empty."""
    if coordinator == cluster.AUTO:
        cluster.initialize_from_scheduler()
    elif coordinator:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id)


def barrier(name: str) -> None:
    """Waits until every process reaches the same named point (nothing on one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


MESSAGE_BYTES = 2048  # of each process's error message shared with the others


def raise_together(failure: StageError | UsageError | None) -> None:
    """Waits for every process, then raises on all of them if any failed: its own error on a
    failed process, an error naming the failed processes and their errors on the others (so
    none waits forever for a process that stopped)."""
    if jax.process_count() == 1:
        if failure is not None:
            raise failure
        return
    code = 0 if failure is None else 2 if isinstance(failure, UsageError) else 1
    message = str(failure or '').encode()[:MESSAGE_BYTES].ljust(MESSAGE_BYTES, b'\0')
    codes, messages = (np.asarray(x) for x in multihost_utils.process_allgather(
        (np.int32(code), np.frombuffer(message, np.uint8))))
    codes, messages = codes.reshape(-1), messages.reshape(len(codes.reshape(-1)), MESSAGE_BYTES)
    if failure is not None:
        raise failure
    failed = np.flatnonzero(codes).tolist()
    if failed:
        kind = UsageError if codes.max() == 2 else StageError
        errors = '; '.join(f'process {i}: '
                           + messages[i].tobytes().rstrip(b'\0').decode(errors='replace')
                           for i in failed)
        raise kind(f'process(es) {failed} stopped the run: {errors}')


def is_leader() -> bool:
    """Process 0 does the work that one process does for all (tiling, reports)."""
    return jax.process_index() == 0


def make_mesh(num_devices: int = -1) -> Mesh:
    """A 1-D mesh over the first `num_devices` devices (-1: all devices of all hosts)."""
    devices = jax.devices()
    if num_devices > len(devices):
        raise UsageError(f'mesh.data={num_devices} but only {len(devices)} devices are visible')
    if num_devices > 0:
        devices = devices[:num_devices]
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def make_local_mesh() -> Mesh:
    """A 1-D mesh over this process's devices (for work that each host does on its own)."""
    devices = jax.local_devices()
    return jax.make_mesh((len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,),
                         devices=devices)


def under_mesh(function: Callable, mesh: Mesh) -> Callable:
    """function, called (and so traced) with `mesh` as the ambient mesh: code inside it that
    splits work over `data` by hand (blocked_attention's per-slide loop on CPU) finds the axis."""

    def run(*args, **kwargs):
        with jax.set_mesh(mesh):
            return function(*args, **kwargs)

    return run


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


def batch_sharded(mesh: Mesh) -> NamedSharding:
    """Split along the first (batch) axis over `data`."""
    return NamedSharding(mesh, PartitionSpec(DATA_AXIS))


def local_batch_size(global_batch_size: int, mesh: Mesh, field: str) -> int:
    """This process's share of a global batch; the batch (config field `field`) must split
    evenly over the mesh's devices."""
    devices = mesh.devices.size
    if global_batch_size % devices:
        raise UsageError(f'{field}={global_batch_size} does not split evenly over the {devices} '
                         f'devices it runs on: make it a multiple of {devices} (or use fewer '
                         f'devices: mesh.data, cpu_devices)')
    return global_batch_size * len(mesh.local_devices) // devices


def global_batch(local_batch: Any, mesh: Mesh) -> Any:
    """Assembles each process's part of a batch (a pytree of arrays with a leading batch axis)
    into global arrays sharded over `data`."""
    sharding = batch_sharded(mesh)
    return jax.tree.map(lambda value: jax.make_array_from_process_local_data(sharding, value),
                        local_batch)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Places a pytree (e.g. a freshly initialised train state) replicated on the mesh."""
    return jax.device_put(tree, replicated(mesh))
