"""Feature network: the Flax VGG-16 + AM-softmax train step and inference vs a plain PyTorch VGG-16.

Both run in this one process, on the same batch of uint8 images, at the same image sizes, batch
sizes, compute dtype (float32 on CPU) and thread count. Reference (torch_vgg.py): VGG-16
written with torch.nn (torchvision's conv trunk, ReLU, 2x2 max-pool, global average pool, a
linear head, cross entropy), ImageNet normalization in its forward like pathjax's, the same
optimizer (SGD with momentum 0.9, or Adam), eager mode. pathjax: `FeatureNet` (trunk +
AM-softmax head and loss), one jitted train step with the state donated; inference is the jitted
forward. Each measurement runs warm-up steps, then reports the median images/s over the timed
steps; the Flax compile time is measured on its own (`jit(...).lower(...).compile()`). On CPU the Flax side is measured twice:
`flax` with pathjax's own options (`xla_options.patch_network_options`) and `flax-xla-defaults`
without.

Threads: the process is pinned to `--threads` cores before JAX starts its CPU client (XLA sizes
its intra-op pool from the cores it may run on) and `torch.set_num_threads(--threads)`.
On a GPU (jax.default_backend() == 'gpu') the Flax side computes in bfloat16 and the table adds
the fraction of `--peak-flops` reached; the PyTorch side runs only where torch sees CUDA.

`run(quick)` gives the rows of `python -m benchmarks` (Flax vs PyTorch only).

  python benchmarks/feature_net.py [--threads 2] [--sizes 224 512] [--batch 4 2] [--steps 3]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import optax
from flax.training import train_state

from pathjax.models.patch.am_softmax import am_softmax_loss
from pathjax.models.patch.feature_net import FeatureNet
from pathjax.models.patch.vgg import BLOCKS, scaled
from pathjax.train.xla_options import patch_network_options
from machine_info import cpu_line
from rows import row

try:  # the PyTorch reference; gpu.py uses the Flax helpers here without it
    import torch
    import torch_vgg
except ImportError:
    torch = torch_vgg = None

AM_S, AM_M, MOMENTUM = 30.0, 0.35, 0.9


def pin_threads(threads: int) -> None:
    """Restrict this process (so XLA's CPU pool) to `threads` cores; set torch's pool to match."""
    cores = sorted(os.sched_getaffinity(0))[:threads]
    os.sched_setaffinity(0, cores)
    if torch is not None:
        torch.set_num_threads(threads)


def conv_shapes(size: int, width: float) -> list[tuple[int, int, int]]:
    """(spatial size, in channels, out channels) of every 3x3 convolution of the trunk."""
    shapes, channels = [], 3
    for block in BLOCKS:
        for out in block:
            shapes.append((size, channels, scaled(out, width)))
            channels = scaled(out, width)
        size //= 2
    return shapes


def model_flops(size: int, width: float, train: bool) -> float:
    """Convolution FLOPs per image: forward, or forward + weight and input gradients (no input
    gradient for the first convolution, whose input is the image)."""
    forward = [2 * 9 * s * s * cin * cout for s, cin, cout in conv_shapes(size, width)]
    return sum(forward) + (sum(forward) + sum(forward[1:]) if train else 0)


# ---- pathjax (Flax) ----

def random_params(init, *inputs) -> dict:
    """Parameters shaped by `jax.eval_shape(init, key, *inputs)`, drawn with numpy: He-normal
    kernels, unit scales, zero biases. Compiling a Flax init (threefry) takes about 20 s on a
    2-core CPU for VGG-16 whatever the image size, and parameter values do not change the speed."""
    rng = np.random.default_rng(0)

    def draw(path, leaf):
        if len(leaf.shape) >= 2:
            scale = np.sqrt(2.0 / np.prod(leaf.shape[:-1]))
            return jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype)
        fill = jnp.ones if jax.tree_util.keystr(path).endswith("['scale']") else jnp.zeros
        return fill(leaf.shape, leaf.dtype)

    shapes = jax.eval_shape(init, jax.random.key(0), *inputs)['params']
    return jax.tree_util.tree_map_with_path(draw, shapes)


def flax_state(model: FeatureNet, images: np.ndarray, optimizer: str, lr: float):
    params = random_params(model.init, images)
    tx = optax.sgd(lr, momentum=MOMENTUM) if optimizer == 'sgd' else optax.adam(lr)
    return train_state.TrainState.create(apply_fn=model.apply, params=params, tx=tx)


def flax_train_step(state, images, labels):
    """Forward, AM-softmax loss, backward, optimizer update; the state is donated by the caller."""
    def loss_fn(params):
        _, cosines = state.apply_fn({'params': params}, images)
        return am_softmax_loss(cosines, labels, AM_S, AM_M)
    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    return state.apply_gradients(grads=grads), loss


def flax_infer(state, images):
    """Features and cosines of a batch (the extract stage's forward, plus the head)."""
    return state.apply_fn({'params': state.params}, images)


def compiled(function, *args, donate: bool, options: dict):
    """(compiled executable, compile seconds) of `jax.jit(function)` for these arguments."""
    start = time.perf_counter()
    jitted = jax.jit(function, donate_argnums=0 if donate else ())
    executable = jitted.lower(*args).compile(compiler_options=options)
    return executable, time.perf_counter() - start


def flax_train_runner(executable, state, images, labels):
    """A zero-argument call running one train step (the donated state is carried over)."""
    carry = [state]

    def run():
        carry[0], loss = executable(carry[0], images, labels)
        jax.block_until_ready((carry[0], loss))
    return run


def flax_infer_runner(executable, state, images):
    return lambda: jax.block_until_ready(executable(state, images))


# ---- measurement and report ----

def interleaved(runners: dict, warmup: int, steps: int) -> dict:
    """Seconds of each timed call per runner; the runners alternate call by call, so a change
    in machine load (shared hosts) hits them alike. Warm-up calls are not timed."""
    times = {name: [] for name in runners}
    for step in range(warmup + steps):
        for name, run in runners.items():
            start = time.perf_counter()
            run()
            if step >= warmup:
                times[name].append(time.perf_counter() - start)
    return times


def rate(batch: int, times: list[float]) -> float:
    return batch / statistics.median(times)


def flax_variants(gpu: bool, with_defaults: bool) -> dict:
    """Name -> XLA compiler options of each Flax variant measured."""
    if gpu:
        return {'flax': {}}
    return ({'flax-xla-defaults': {}} if with_defaults else {}) | {'flax': patch_network_options()}


def add_flax_runners(runners: dict, compile_seconds: dict, args, images, labels, gpu: bool,
                     with_defaults: bool):
    """Compile the Flax train step and forward of each variant; add their runners."""
    model = FeatureNet(num_classes=args.classes, width=args.width,
                       dtype=jnp.bfloat16 if gpu else jnp.float32)
    x, y = jax.device_put(images), jax.device_put(labels)
    for name, options in flax_variants(gpu, with_defaults).items():
        state = flax_state(model, x, args.optimizer, args.lr)
        infer, compile_seconds[f'{name} infer'] = compiled(flax_infer, state, x, donate=False,
                                                           options=options)
        train, compile_seconds[f'{name} train'] = compiled(flax_train_step, state, x, y,
                                                           donate=True, options=options)
        infer_state = jax.tree.map(jnp.copy, state)  # the train steps donate `state`
        runners[f'{name} infer'] = flax_infer_runner(infer, infer_state, x)
        runners[f'{name} train'] = flax_train_runner(train, state, x, y)


def measure_size(args, size: int, batch: int, device: str | None, gpu: bool,
                 with_defaults: bool) -> list[dict]:
    """Train and inference rows (images/s per framework, Flax compile seconds) for one size."""
    rng = np.random.default_rng(size)
    images = rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8)  # [B, H, W, 3]
    labels = rng.integers(0, args.classes, batch).astype(np.int32)
    runners, compile_seconds = {}, {}
    add_flax_runners(runners, compile_seconds, args, images, labels, gpu, with_defaults)
    if device is not None:
        runners.update(torch_vgg.runners(args.width, args.classes, args.optimizer, args.lr,
                                         MOMENTUM, images, labels, device, args.torch_compile))
    rows = []
    for mode in ('train', 'infer'):
        times = interleaved({name.rsplit(' ', 1)[0]: run for name, run in runners.items()
                             if name.endswith(mode)}, args.warmup, args.steps)
        rates = {name: rate(batch, seconds) for name, seconds in times.items()}
        rows.append(dict(size=size, batch=batch, mode=mode, rates=rates,
                         compile=compile_seconds[f'flax {mode}'],
                         flops=model_flops(size, args.width, mode == 'train')))
    return rows


def report(rows: list[dict], peak: float | None) -> None:
    """One line per (size, mode): images/s of each variant, ratios to torch, Flax GFLOP/s."""
    names = list(rows[0]['rates'])
    ratios = [n for n in names if n != 'torch'] if 'torch' in names else []
    print(f'{"size":>4s} {"batch":>5s} {"mode":5s}' + ''.join(f' {n:>17s}' for n in names)
          + ''.join(f' {n + "/torch":>23s}' for n in ratios)
          + f' {"flax GFLOP/s":>12s} {"compile s":>9s}' + (' % peak' if peak else ''))
    for r in rows:
        rates = r['rates']
        print(f'{r["size"]:4d} {r["batch"]:5d} {r["mode"]:5s}'
              + ''.join(f' {rates[n]:17.2f}' for n in names)
              + ''.join(f' {rates[n] / rates["torch"]:22.2f}x' for n in ratios)
              + f' {rates["flax"] * r["flops"] / 1e9:12.1f} {r["compile"]:9.1f}'
              + (f' {100 * rates["flax"] * r["flops"] / peak:6.1f}' if peak else ''))
    print('images/s: median of the timed steps. flax: the options pathjax compiles with on CPU; '
          'flax-xla-defaults: none. GFLOP/s: convolution FLOPs (train: forward + weight and '
          'input gradients). compile s: flax, jit(...).lower(...).compile().')


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line, with the platform's defaults filled in (see --help)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--sizes', type=int, nargs='+', default=[224, 512])
    parser.add_argument('--batch', type=int, nargs='+',
                        help='one batch size per image size (default: 4 2 on CPU, 128 32 on GPU)')
    parser.add_argument('--warmup', type=int, help='default: 1 on CPU, 5 on GPU')
    parser.add_argument('--steps', type=int, help='timed steps (default: 3 on CPU, 30 on GPU)')
    parser.add_argument('--width', type=float, default=1.0)
    parser.add_argument('--classes', type=int, default=2)
    parser.add_argument('--optimizer', choices=('sgd', 'adam'), default='sgd')
    parser.add_argument('--lr', type=float, default=1e-3)
    parser.add_argument('--peak-flops', type=float, default=989e12,
                        help='accelerator peak (dense bf16 FLOP/s; default: H100 SXM)')
    parser.add_argument('--no-torch', action='store_true')
    parser.add_argument('--torch-compile', action='store_true',
                        help='also time a torch.compile\'d PyTorch forward (inductor; minutes to '
                        'compile on a CPU)')
    parser.add_argument('--no-xla-defaults', action='store_true',
                        help='skip the Flax variant compiled with XLA\'s default CPU options')
    args = parser.parse_args(argv)
    gpu = jax.default_backend() == 'gpu'
    for name, cpu_default, gpu_default in (('batch', [4, 2], [128, 32]), ('warmup', 1, 5),
                                           ('steps', 3, 30)):
        if getattr(args, name) is None:
            setattr(args, name, gpu_default if gpu else cpu_default)
    if len(args.batch) != len(args.sizes):
        parser.error('give one --batch per --sizes entry')
    return args


def torch_device(args, gpu: bool) -> str | None:
    """Where the PyTorch reference runs: 'cpu', 'cuda', or None (not measured)."""
    if args.no_torch or torch is None:
        return None
    return ('cuda' if torch.cuda.is_available() else None) if gpu else 'cpu'


def run(quick: bool) -> list[dict]:
    """Rows: train and inference images/s, the Flax FeatureNet vs the PyTorch VGG-16, on every
    usable core. quick: 128 px, batch 4, 1 warm-up + 2 timed steps; else 224 px (batch 4) and
    512 px (batch 2), 3 timed steps (GPU: 128 and 32, 30 steps), and a torch.compile row."""
    args = parse(['--sizes', '128', '--batch', '4', '--steps', '2'] if quick
                 else ['--torch-compile'])
    pin_threads(args.threads)
    gpu = jax.default_backend() == 'gpu'
    device = torch_device(args, gpu)
    if device is None:
        raise RuntimeError('the PyTorch reference needs torch (pip install -e \'.[bench]\')'
                           + (' with CUDA' if gpu else ''))
    rows = []
    for size, batch in zip(args.sizes, args.batch):
        for r in measure_size(args, size, batch, device, gpu, with_defaults=False):
            rate = r['rates']['flax']
            bound = (f'convolution FLOPs: {rate * r["flops"] / 1e9:.0f} GFLOP/s reached '
                     f'({"bfloat16" if gpu else "float32"}, {args.threads} threads)')
            where = ', CUDA' if gpu else ', same threads'
            rows.append(row(
                f'{r["mode"]}, {size} px, batch {batch}', 'images/s', rate, r['rates']['torch'],
                'the same VGG-16 in PyTorch, eager, channels_last'
                + (', inference_mode' if r['mode'] == 'infer' else '') + where,
                True, bound, compile_seconds=r['compile'], flops_per_s=rate * r['flops']))
            if 'torch-compile' in r['rates']:
                rows.append(row(
                    f'{r["mode"]} vs torch.compile, {size} px, batch {batch}', 'images/s', rate,
                    r['rates']['torch-compile'], 'the same VGG-16, torch.compile (inductor), '
                    'channels_last, inference_mode' + where, True, bound,
                    compile_seconds=r['compile'], flops_per_s=rate * r['flops']))
    return rows


def main() -> None:
    args = parse()
    pin_threads(args.threads)
    gpu = jax.default_backend() == 'gpu'
    device = torch_device(args, gpu)
    print(f'machine: {jax.devices()[0].device_kind if gpu else cpu_line()}, '
          f'{len(os.sched_getaffinity(0))} of {os.cpu_count()} cores used, '
          f'{args.threads} threads (XLA via affinity, torch.set_num_threads)')
    print(f'jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, '
          f'torch {torch.__version__ if torch else "-"}, python {platform.python_version()}, '
          f'XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(f'width {args.width}, {args.classes} classes, optimizer {args.optimizer}, '
          f'compute {"bfloat16" if gpu else "float32"}, {args.warmup} warm-up + '
          f'{args.steps} timed steps (median); torch on {device or "-"}'
          + (f'; peak {args.peak_flops:.4g} FLOP/s' if gpu else '') + '\n')
    print(f'load average at start: {os.getloadavg()[0]:.2f}')
    measured = []
    for size, batch in zip(args.sizes, args.batch):
        measured += measure_size(args, size, batch, device, gpu, not args.no_xla_defaults)
    print(f'load average at end: {os.getloadavg()[0]:.2f} (other processes share these cores)\n')
    report(measured, args.peak_flops if gpu else None)


if __name__ == '__main__':
    main()
