"""Slide baselines: the train step of each baseline slide model (ABMIL, TransMIL, CLAM-SB, mean
pooling) in pathjax vs its authors' PyTorch code run as their training code runs it.

The work: one batch of `--slides` synthetic slides, each of between --nodes / 2 + 1 and --nodes
patches of `--feature-dim` random float32 features (at the defaults 8 slides, 8,192 nodes,
1,024-dim features, the papers' d_model 512, attention / MLP hidden 256, 8 heads, CLAM k_sample 8
and bag weight 0.7), 2 classes, float32, dropout 0; the train step is forward + backward + one
AdamW update (lr 1e-4, weight decay 1e-4; optax's and torch's AdamW are the same update).

pathjax, as the train_slide stage runs it: the model built by `factory.model_arguments` and
`factory.batched` (vmapped over the slides, each slide padded to --nodes), the
`slide_training.make_train_step` step (cross entropy; CLAM: bag_weight x it + (1 - bag_weight) x
the instance loss) with `create_optimizer`'s AdamW, jitted with the state donated, the batch split
over `--devices` XLA CPU devices (0: `cpu_devices.auto_count`, as config.cpu_devices = 0 gives)
and traced under the mesh; compile time measured on its own. Reference (torch_slide_baselines.py):
the authors' modules (MIL-Lab ABMIL, CLAM's CLAM_SB with inst_eval, TransMIL with lucidrains'
Nystrom attention, a torch mean-pool MLP), eager, one slide at a time with its unpadded patches
(MIL code trains at batch size 1): a loop over the slides, each slide's loss / slides
backpropagated (gradient accumulation: the gradient of the same mean loss), then one
torch.optim.AdamW step.

Parity first: the Flax parameters (random, no initializer compiled) are copied into the torch
module and the losses of two consecutive train steps (before and after one AdamW update) must
agree to rtol 1e-4. The timed steps then run interleaved (pathjax, torch, pathjax, ...), median of
`--steps`; the parity steps are the warm-up. A model whose torch parity steps take over
`--slow-step` seconds each is timed on at most 2 steps.

No N x N value: the pathjax step's jaxpr (sub-jaxprs included) is walked and no value may hold
--nodes^2 elements or more per slide (a value's element count, divided by --slides where a
dimension is the slide axis) -- checked in the script, it raises otherwise.

Peak memory of a train step, each side in this process, after the timed steps: glibc made to
return freed arrays to the OS (mallopt M_MMAP_THRESHOLD 64 KiB, malloc_trim), the kernel's
resident high-water mark reset (/proc/self/clear_refs '5'), one train step, then VmHWM minus
the VmRSS before the step: the activations, gradients and temporaries of a step over what both
sides hold between steps (parameters, AdamW moments, the batch). tracemalloc does not see
torch's or XLA's allocations; RSS does. Where clear_refs cannot be written, the memory rows are
left out (the speed rows remain). The resident state (parameters + AdamW moments; pathjax holds a
copy per CPU device) and XLA's compiled temporaries are reported beside.

Threads: the process is pinned to `--threads` cores before JAX starts its CPU client (XLA sizes
its thread pool from them) and torch.set_num_threads(--threads).

  python benchmarks/slide_baselines.py [--threads 2] [--slides 8] [--nodes 8192] [--steps 3]
                                       [--models abmil transmil clam_sb mean] [--quick]
  rows for the runner: run(quick) (python -m benchmarks --only slide_baselines [--quick])
"""

import argparse
import ctypes
import gc
import math
import os
import platform
import re
import statistics
import sys
import time
import types

import jax
import jax.extend
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import torch

import torch_slide_baselines as reference
from feature_net import compiled, interleaved, pin_threads
from machine_info import cpu_line
from pathjax import cpu_devices
from pathjax.data import graphs
from pathjax.models.slide import factory
from pathjax.runtime import sharding
from pathjax.train.slide_training import TrainState, create_optimizer, make_train_step
from rows import row
from slide_model import cpu_seconds, others_since

NUM_CLASSES, LR, WEIGHT_DECAY = 2, 1e-4, 1e-4
RTOL = 1e-4
LIBC = ctypes.CDLL('libc.so.6')
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
PAGE = os.sysconf('SC_PAGE_SIZE')
REFERENCES = {
    'abmil': "MIL-Lab's ABMIL",
    'transmil': "TransMIL's authors' code (lucidrains' Nystrom attention)",
    'clam_sb': "CLAM's CLAM_SB with inst_eval",
    'mean': 'a torch mean-pool MLP',
}
BOUNDS = {
    'abmil': 'patch embedding [n, D] x [D, d_model] and its gradient',
    'transmil': 'QKV projections and Nystrom attention matmuls of the two layers',
    'clam_sb': 'patch embedding [n, D] x [D, d_model] and its gradient',
    'mean': 'one pass over the features (masked mean)',
}


# ---- the batch ----

def synthetic_batch(args, seed: int = 0) -> dict:
    """`args.slides` random slides of between nodes/2 + 1 and `nodes` patches (features only, no
    edges), padded to `nodes` and stacked as the stage's batches: {'graph': GraphsTuple [B, ...],
    'label' int32 [B], 'mask' bool [B], 'counts' [B]} (numpy)."""
    rng = np.random.default_rng(seed)
    counts = rng.integers(args.nodes // 2 + 1, args.nodes + 1, args.slides)
    empty, padded = np.zeros(0, np.int32), []
    for count in counts:
        features = rng.standard_normal((int(count), args.feature_dim), np.float32)
        graph = graphs.slide_graph(features, np.zeros((count, 2), np.int32), empty, empty)
        padded.append(graphs.pad_graph(graph, args.nodes, 1))
    return {'graph': graphs.stack_graphs(padded),
            'label': rng.integers(0, NUM_CLASSES, args.slides).astype(np.int32),
            'mask': np.ones(args.slides, bool), 'counts': counts}


# ---- pathjax (Flax) ----

def flax_model(args, name: str):
    """The batched model as the stage builds it (factory.model_arguments + factory.batched)."""
    net = types.SimpleNamespace(model=name, d_model=args.d_model, mlp_hidden=args.hidden,
                                heads=args.heads, instance_k=args.k_sample, dropout=0.0)
    module, arguments = factory.model_arguments(net, NUM_CLASSES, jnp.float32)
    return factory.batched(module)(**arguments)


def random_params(model, graph, seed: int = 0) -> dict:
    """Float32 parameters of the model's shapes, drawn with numpy (no initializer compiled):
    kernels normal / sqrt(fan in), LayerNorm scales 1 + 0.1 normal, biases 0.1 normal, the class
    token normal."""
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda g: model.init(jax.random.key(0), g, True, None), graph)

    def draw(path, leaf):
        name, noise = path[-1].key, rng.standard_normal(leaf.shape).astype(np.float32)
        if name == 'kernel':
            return noise / np.float32(math.sqrt(math.prod(leaf.shape[:-1])))
        if name == 'scale':
            return 1 + np.float32(0.1) * noise
        if name == 'bias':
            return np.float32(0.1) * noise
        return noise

    return jax.tree_util.tree_map_with_path(draw, shapes['params'])


def flax_state(model, params) -> TrainState:
    train = types.SimpleNamespace(optimizer='adamw', lr=LR, weight_decay=WEIGHT_DECAY)
    return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(train))


def flax_runner(executable, state, batch, rng):
    """A zero-argument call running one train step (the donated state carried over); returns
    the loss."""
    carry = [state]

    def run() -> float:
        carry[0], metrics = executable(carry[0], batch, rng)
        jax.block_until_ready(carry[0])
        return float(metrics['loss'])
    return run


def per_slide_elements(shape: tuple, slides: int) -> int:
    """A value's element count per slide: divided by `slides` where a dimension is the slide
    axis (vmap may move it), else the whole count."""
    size = math.prod(shape)
    return size // slides if slides in shape else size


def largest_per_slide(jaxpr, slides: int) -> int:
    """The largest per-slide element count of any value a closed jaxpr (sub-jaxprs included)
    makes."""
    largest = 0
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, per_slide_elements(tuple(getattr(var.aval, 'shape', ())),
                                                      slides))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, largest_per_slide(jax.extend.core.ClosedJaxpr(sub, ()),
                                                     slides))
    return largest


def tree_bytes(tree) -> int:
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree) if hasattr(leaf, 'nbytes'))


# ---- memory ----

def proc_status_bytes(field: str) -> int:
    with open('/proc/self/status') as status:
        return int(re.search(rf'^{field}:\s+(\d+) kB', status.read(), re.M).group(1)) * 1024


def can_reset_peak() -> bool:
    try:
        with open('/proc/self/clear_refs', 'w') as refs:
            refs.write('5')
        return True
    except OSError:
        return False


def step_peak_bytes(run) -> int:
    """Resident high-water mark during one call of `run` above the resident size before it (at
    least one page, the resolution)."""
    gc.collect()
    LIBC.malloc_trim(0)
    with open('/proc/self/clear_refs', 'w') as refs:
        refs.write('5')  # VmHWM := VmRSS
    before = proc_status_bytes('VmRSS')
    run()
    return max(proc_status_bytes('VmHWM') - before, PAGE)


# ---- one model ----

def close(a: float, b: float) -> bool:
    return abs(a - b) <= RTOL * max(abs(a), abs(b))


def prepare_model(args, name: str, host_batch: dict, mesh) -> dict:
    """Both sides of one model, built, compiled, checked (N^2 values, parity) and warmed up."""
    model = flax_model(args, name)
    batch, rng = sharding.global_batch(
        {k: v for k, v in host_batch.items() if k != 'counts'}, mesh), jax.random.key(0)
    params = random_params(model, host_batch['graph'])
    torch.manual_seed(0)
    torch_model = reference.create(name, args.feature_dim, args.d_model, args.hidden, args.heads,
                                   args.k_sample, NUM_CLASSES)
    reference.load_flax_params(name, torch_model, params)
    optimizer = torch.optim.AdamW(torch_model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    features, counts = host_batch['graph'].nodes['features'], host_batch['counts']
    slides = [torch.from_numpy(features[b, :count]) for b, count in enumerate(counts)]
    labels = [torch.tensor(int(label)) for label in host_batch['label']]
    torch_run = reference.train_runner(name, torch_model, optimizer, slides, labels,
                                       args.bag_weight)

    step = make_train_step(model, np.ones(NUM_CLASSES, np.float32), args.bag_weight)
    state = jax.device_put(flax_state(model, params), sharding.replicated(mesh))
    state_bytes = tree_bytes(state) * mesh.devices.size  # a copy per device
    with jax.set_mesh(mesh):
        largest = largest_per_slide(jax.make_jaxpr(step)(state, batch, rng), args.slides)
        if largest >= args.nodes ** 2:
            raise AssertionError(f'{name}: a value of the pathjax train step holds {largest:,} '
                                 f'elements per slide, >= N^2 = {args.nodes ** 2:,}')
        executable, compile_seconds = compiled(step, state, batch, rng, donate=True, options={})
    memory = executable.memory_analysis()
    flax_run = flax_runner(executable, state, batch, rng)

    losses, torch_seconds = {'pathjax': [], 'torch': []}, []
    for _ in range(2):  # before and after one AdamW update
        losses['pathjax'].append(flax_run())
        start = time.perf_counter()
        losses['torch'].append(torch_run())
        torch_seconds.append(time.perf_counter() - start)
    if not all(close(a, b) for a, b in zip(losses['pathjax'], losses['torch'])):
        raise AssertionError(f'{name}: pathjax and torch losses disagree (rtol {RTOL}): {losses}')
    torch_state = sum(t.nbytes for t in torch_model.parameters()) + sum(
        t.nbytes for s in optimizer.state.values() for t in s.values()
        if isinstance(t, torch.Tensor))
    return {'name': name, 'runners': {'pathjax': flax_run, 'torch': torch_run},
            'compile': compile_seconds, 'losses': losses, 'torch first seconds': torch_seconds,
            'largest per slide': largest,
            'compiled temp': memory.temp_size_in_bytes * mesh.devices.size,
            'compiled arguments': memory.argument_size_in_bytes * mesh.devices.size,
            'state': {'pathjax': state_bytes, 'torch': torch_state},
            'param count': sum(t.numel() for t in torch_model.parameters())}


def measure(args) -> tuple[dict, list[dict]]:
    """(the batch's facts, one result per model): steps/s of each side and, where the peak
    can be reset, each side's step peak memory."""
    host_batch = synthetic_batch(args)
    mesh = sharding.make_mesh()
    results = []
    for name in args.models:
        start = time.perf_counter()
        result = prepare_model(args, name, host_batch, mesh)
        steps = args.steps if max(result['torch first seconds']) <= args.slow_step else min(
            args.steps, 2)
        begin = cpu_seconds()
        times = interleaved(result['runners'], args.warmup, steps)
        result.update(rates={side: 1.0 / statistics.median(t) for side, t in times.items()},
                      timed_steps=steps, others=others_since(begin))
        print(f'{name}: {time.perf_counter() - start:.0f} s, steps/s ' + ', '.join(
            f'{side} {rate:.3g}' for side, rate in result['rates'].items()), flush=True)
        results.append(result)
    if can_reset_peak():
        # From now on glibc returns freed arrays to the OS (timing ran with its defaults).
        LIBC.mallopt(M_MMAP_THRESHOLD, 64 * 1024)
        for result in results:
            result['peak'] = {side: step_peak_bytes(run)
                              for side, run in result['runners'].items()}
    facts = {'valid nodes': int(host_batch['counts'].sum()), 'devices': mesh.devices.size}
    return facts, results


# ---- report ----

def mib(value: float) -> str:
    return f'{value / 2 ** 20:.1f}'


def report(args, facts: dict, results: list[dict]) -> None:
    print(f'\n## Baseline train steps: {args.slides} slides padded to {args.nodes} nodes '
          f'({facts["valid nodes"]:,} valid in all), D = {args.feature_dim}, d_model '
          f'{args.d_model}, hidden {args.hidden}, {args.heads} heads, float32, dropout 0, AdamW; '
          f'pathjax on {facts["devices"]} CPU device(s); median of the timed steps\n')
    print('| model | params | pathjax steps/s | torch steps/s | pathjax / torch | timed steps '
          '| compile s | step peak MiB (pathjax, torch) | torch / pathjax memory '
          '| resident state MiB (pathjax, torch) | XLA temp MiB | largest value / N^2 per slide '
          '| losses (pathjax, torch) | other processes, cores |')
    print('|---' * 14 + '|')
    for r in results:
        rates, peak = r['rates'], r.get('peak')
        memory = (f'{mib(peak["pathjax"])}, {mib(peak["torch"])} '
                  f'| {peak["torch"] / peak["pathjax"]:.2f}x' if peak else 'n/a | n/a')
        losses = ', '.join(f'{a:.6f} / {b:.6f}' for a, b in zip(r['losses']['pathjax'],
                                                                 r['losses']['torch']))
        print(f'| {r["name"]} | {r["param count"]:,} | {rates["pathjax"]:.3g} '
              f'| {rates["torch"]:.3g} | {rates["pathjax"] / rates["torch"]:.2f}x '
              f'| {r["timed_steps"]} | {r["compile"]:.1f} | {memory} '
              f'| {mib(r["state"]["pathjax"])}, {mib(r["state"]["torch"])} '
              f'| {mib(r["compiled temp"])} | {r["largest per slide"] / args.nodes ** 2:.3f} '
              f'| {losses} | {r["others"]:.2f} |')
    print('\nstep peak: VmHWM during one train step minus VmRSS before it (high-water reset '
          'through /proc/self/clear_refs; glibc mmap threshold 64 KiB); it excludes what both '
          'sides hold between steps (resident state, the batch).')


def header(args) -> None:
    print(f'machine: {cpu_line()}, '
          f'{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores used, {args.threads} '
          f'threads (XLA via affinity, torch.set_num_threads)')
    print(f'jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, torch {torch.__version__}, '
          f'numpy {np.__version__}, python {platform.python_version()}, '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(f'load average at start: {os.getloadavg()[0]:.2f}')


# ---- command line and runner ----

def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true', help='the runner\'s small sizes')
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--devices', type=int, default=0,
                        help="pathjax's CPU devices; 0: as config.cpu_devices = 0 gives")
    parser.add_argument('--models', nargs='*', default=list(reference.MODELS),
                        choices=reference.MODELS)
    parser.add_argument('--slides', type=int, default=8)
    parser.add_argument('--nodes', type=int, default=8192, help='padded nodes per slide')
    parser.add_argument('--feature-dim', type=int, default=1024)
    parser.add_argument('--d-model', type=int, default=512)
    parser.add_argument('--hidden', type=int, default=256,
                        help='attention hidden (abmil, clam_sb), MLP hidden (mean)')
    parser.add_argument('--heads', type=int, default=8, help='TransMIL heads')
    parser.add_argument('--k-sample', type=int, default=8, help='CLAM instances per side')
    parser.add_argument('--bag-weight', type=float, default=0.7, help="CLAM's bag loss weight")
    parser.add_argument('--warmup', type=int, default=0,
                        help='untimed steps after the 2 parity steps')
    parser.add_argument('--steps', type=int, default=3, help='timed steps per side')
    parser.add_argument('--slow-step', type=float, default=60.0,
                        help='seconds of a torch step above which at most 2 steps are timed')
    argv = sys.argv[1:] if argv is None else argv
    return parser.parse_args(QUICK + argv if '--quick' in argv else argv)


QUICK = ['--slides', '2', '--nodes', '256', '--feature-dim', '128', '--d-model', '64',
         '--hidden', '32', '--heads', '4', '--steps', '2']


def prepare(args) -> None:
    """Before JAX starts its CPU backend: the cores, and pathjax's CPU devices."""
    pin_threads(args.threads)
    cpu_devices.set_count(args.devices or cpu_devices.auto_count(args.threads, (args.slides,),
                                                                  (), 1))


def run(quick: bool) -> list[dict]:
    """Rows (ratio > 1: pathjax better) per model: train steps/s vs the authors' PyTorch code
    run one slide at a time, and the step's peak memory vs it. quick: 2 slides x 256 nodes,
    D = 128, d_model 64; else 8 x 8,192, D = 1,024, d_model 512."""
    args = parse(['--quick'] if quick else [])
    prepare(args)
    facts, results = measure(args)
    report(args, facts, results)
    setting = (f'{args.slides} slides x {args.nodes} nodes, D = {args.feature_dim}, d_model '
               f'{args.d_model}')
    threads = f'{args.threads} threads, {facts["devices"]} CPU device(s), float32'
    rows = []
    for r in results:
        name = r['name']
        extra = {'compile_seconds': r['compile'], 'losses': r['losses'],
                 'largest_value_per_slide': r['largest per slide'],
                 'timed_steps': r['timed_steps'], 'other_processes_cores': r['others']}
        rows.append(row(f'{name} train step, {setting}', 'steps/s', r['rates']['pathjax'],
                        r['rates']['torch'],
                        f'{REFERENCES[name]} in PyTorch, one unpadded slide at a time, '
                        'gradients accumulated, torch.optim.AdamW', True,
                        f'{BOUNDS[name]}; pathjax computes the padded budget ({threads})',
                        **extra))
        if 'peak' in r:
            rows.append(row(f'{name} train step peak memory, {setting}', 'bytes',
                            r['peak']['pathjax'], r['peak']['torch'],
                            f'the same PyTorch step ({REFERENCES[name]})', False,
                            'RSS high-water of one step above RSS before it (state and batch '
                            'excluded); pathjax holds all slides at once, torch one',
                            resident_state_bytes=r['state'],
                            pathjax_compiled_temp_bytes=r['compiled temp'],
                            pathjax_compiled_argument_bytes=r['compiled arguments']))
    return rows


def main() -> None:
    args = parse()
    prepare(args)
    header(args)
    facts, results = measure(args)
    print(f'load average at end: {os.getloadavg()[0]:.2f}')
    report(args, facts, results)


if __name__ == '__main__':
    main()
