"""`distributed.coordinator=auto`: the processes of a multi-host run take their ranks from the
scheduler that started them, through JAX's own cluster detection.

`jax.distributed.initialize()` without arguments asks its detectors, in this order, and uses the
first whose environment is present (JAX 0.10, `jax/_src/clusters/`):
- Open MPI (`mpirun`/`mpiexec` of Open MPI 4 and older): OMPI_MCA_orte_hnp_uri is set; ranks
  from OMPI_COMM_WORLD_SIZE/_RANK/_LOCAL_RANK, the coordinator is the launcher's address. Open
  MPI 5 (PRRTE) does not set it and is not detected.
- SLURM (`srun`): SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID
  are all set; the coordinator is the step's first node, port 61440 + SLURM_JOB_ID % 4096.
- Cloud TPU VM (a TPU pod slice) and Cloud TPU on GKE: libtpu finds TPU chips, and the VM's
  metadata server gives the worker number (or TPU_WORKER_HOSTNAMES / TPU_PROCESS_ADDRESSES on
  GKE); port 8482.
- Kubernetes: KUBERNETES_SERVICE_HOST and the `kubernetes` package (an Indexed Job behind a
  headless service); port 55527.
JAX_COORDINATOR_PORT (an environment variable) replaces the port of any of them. On GPUs, SLURM
and Open MPI processes each see one GPU, the one numbered by their local rank (one process per
GPU). With Open MPI's and SLURM's variables both present (mpirun inside a SLURM job), Open MPI's
win. Nothing detected: JAX itself fails with 'coordinator_address should be defined'; pathjax
refuses first, naming what each scheduler would have set.
"""

import os

import jax
from absl import logging

from pathjax import console
from pathjax.errors import UsageError

AUTO = 'auto'  # config.distributed.coordinator's value that asks the scheduler

# What the detectors need, for the refusal (JAX 0.10).
SLURM_VARIABLES = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
                   'SLURM_LOCALID')
OPEN_MPI_VARIABLE = 'OMPI_MCA_orte_hnp_uri'
KUBERNETES_VARIABLE = 'KUBERNETES_SERVICE_HOST'

# JAX's detector names (ClusterEnv.name; the class name where it has none) as users know them.
KINDS = {'ompi': 'Open MPI', 'slurm': 'SLURM', 'gcetpu': 'Cloud TPU VM',
         'gketpu': 'Cloud TPU on GKE', 'K8sCluster': 'Kubernetes'}
UNKNOWN = 'a cluster'  # what the log says when this JAX's detectors cannot be asked beforehand


def detected_cluster() -> str | None:
    """The cluster that `jax.distributed.initialize()` will detect (KINDS' names; UNKNOWN when
    this JAX's detectors could not be asked), or None when there is none."""
    detectors = _jax_detectors()
    if detectors is None:
        return UNKNOWN
    for detector in detectors:
        try:
            present = detector.is_env_present()
        except Exception as error:  # noqa: BLE001 (JAX's own detection below reports it)
            logging.warning('coordinator=auto: asking JAX whether this is %s failed: %r',
                            detector.__name__, error)
            return UNKNOWN
        if present:
            name = getattr(detector, 'name', '') or detector.__name__
            return KINDS.get(name, name)
    return None


def no_cluster_message(environ=None) -> str:
    """Why coordinator=auto found no cluster: what each scheduler would have set."""
    environ = os.environ if environ is None else environ
    slurm_set = [v for v in SLURM_VARIABLES if v in environ]
    slurm = ('none of ' + ', '.join(SLURM_VARIABLES) if not slurm_set else
             ', '.join(slurm_set) + ' but not '
             + ', '.join(v for v in SLURM_VARIABLES if v not in environ))
    kubernetes = (f'{KUBERNETES_VARIABLE} is set but JAX could not use it (it needs the '
                  '`kubernetes` package: pip install "jax[k8s]")' if KUBERNETES_VARIABLE in environ
                  else f'no {KUBERNETES_VARIABLE}')
    return (f'distributed.coordinator=auto found no cluster: SLURM: {slurm} is set (srun sets '
            f'them all); Open MPI: no {OPEN_MPI_VARIABLE} (mpirun of Open MPI 4 sets it); '
            f'Cloud TPU: not a TPU VM of a pod slice; Kubernetes: {kubernetes}. Give '
            'distributed.coordinator=host:port with distributed.num_processes and '
            'distributed.process_id, or start the processes with srun or mpirun')


def initialize_from_scheduler() -> None:
    """jax.distributed.initialize() with every argument from the detected cluster; logs what it
    found (on every process).

    Raises:
        UsageError: no cluster detected, or JAX found the cluster's variables unusable.
    """
    kind = detected_cluster()
    if kind is None:
        raise UsageError(no_cluster_message())
    try:
        jax.distributed.initialize()
    except (ValueError, TypeError) as error:  # e.g. a rank that is not a number
        raise UsageError(f'distributed.coordinator=auto: JAX could not start from the {kind} '
                         f'environment: {error}') from error
    console.say(f'distributed.coordinator=auto: {kind}: process {jax.process_index()} of '
                f'{jax.process_count()}, coordinator {_coordinator_address()}, '
                f'{jax.local_device_count()} local device(s) of {jax.device_count()}')


def scheduled_processes() -> int:
    """The process count a scheduler gives (SLURM_NTASKS, OMPI_COMM_WORLD_SIZE), before JAX
    starts; 1 when neither is set (a TPU pod's or Kubernetes' count is known only after)."""
    for variable in ('OMPI_COMM_WORLD_SIZE', 'SLURM_NTASKS'):  # JAX's order: Open MPI first
        value = os.environ.get(variable, '')
        if value.isdigit() and int(value) >= 1:
            return int(value)
    return 1


# JAX internals (jax._src): the only two places pathjax reads them, each with a fallback.

def _jax_detectors() -> list | None:
    """JAX's cluster detectors (ClusterEnv subclasses) in the order initialize() asks them,
    less the opt-in ones (mpi4py); None when this JAX has them elsewhere."""
    try:
        from jax._src.clusters import ClusterEnv
        return [detector for detector in ClusterEnv._cluster_types
                if not getattr(detector, 'opt_in_only_method', False)]
    except (ImportError, AttributeError):
        return None


def _coordinator_address() -> str:
    """The coordinator's host:port that initialize() chose ('unknown' when not found)."""
    try:
        from jax._src.distributed import global_state
        return global_state.coordinator_address or 'unknown'
    except (ImportError, AttributeError):
        return 'unknown'
