"""A device batch of the feature network run as several smaller passes, to bound memory.

On CPU, XLA runs the convolutions through Eigen (`xla_options`), which reserves an image-patch
buffer for the whole batch at once: 3 x 3 x 64 floats per pixel for VGG-16's second convolution,
0.56 GiB per 512-px image in a forward pass and twice that in training, so the default batches
(32 to train, 64 to extract) ask for 36 GiB of address space and the process aborts
(std::bad_alloc) on most hosts. Run as micro-batches that reserve at most `CPU_PASS_BYTES` per
process at a time (4 training or 8 extraction images of 512 px at full width, shared between the
process's CPU devices; small CPU configs keep the whole batch), memory is bounded at any batch
size. The train step averages the micro-batches' gradients, which is the whole batch's mean
gradient (the same batch, augmentation and loss; only the order of float additions differs).
XLA's own buffers shrink too: at the defaults, 18 GiB -> 2.2 GiB for a train step (one CPU
device; `AccumulatedStep`) and 8 GiB -> 4.5 GiB for extraction (two CPU devices; see `mapped`).

Why the micro-batches are not a `lax.scan` / `lax.map`: in a loop body XLA's CPU backend leaves
Eigen's convolutions for its generic ones, which ran a VGG-16 train step more than 15x slower
(BENCHMARKS.md). Unrolled in one program they run at full speed, but XLA keeps more temporaries
alive (a train step at batch 32, 512 px: 15.4 GiB unrolled vs 2.0 GiB scanned). So inference
unrolls (`mapped`: 4.5 GiB vs 1.0 GiB at batch 64) and training runs each micro-batch as its
own compiled call from the host (`AccumulatedStep`: one micro-batch's temporaries, full speed).
"""

import functools

import jax
import jax.numpy as jnp

from pathjax.errors import UsageError
from pathjax.models.patch.feature_net import VGG16_BACKBONE
from pathjax.models.patch.vgg import scaled
from pathjax.models.patch.vit_presets import get_preset

CPU_PASS_BYTES = 4.5 * 2 ** 30  # Eigen's patch buffers one pass may reserve on CPU


def patch_buffer_bytes(image_size: int, width: float, training: bool) -> float:
    """Eigen's image-patch buffer of one image in VGG-16's largest convolution (conv1_2: 3 x 3 x
    64 * width floats per pixel at full resolution), twice that with the weight gradient."""
    return image_size ** 2 * 9 * scaled(64, width) * 4 * (2 if training else 1)


def image_bytes(config, training: bool) -> float:
    """Host memory one image of a pass takes at its peak (sizes CPU micro-batches): VGG-16's
    `patch_buffer_bytes`, or a ViT's widest layer (its MLP with the attention inputs, or the
    attention logits), kept for every block when training."""
    net = config.feature_net
    if net.backbone == VGG16_BACKBONE:
        return patch_buffer_bytes(config.tile.patch_size, net.width, training)
    arch = get_preset(net.backbone).arch
    tokens = arch.grid ** 2 + arch.prefix_tokens
    widest = tokens * max(arch.mlp_hidden + 4 * arch.embed_dim, arch.num_heads * tokens) * 4
    return widest * (3 * arch.depth if training else 1)


def micro_batch_count(batch_size: int, devices: int, micro_batch: int, field: str,
                      image_bytes: float) -> int:
    """How many passes a global batch of `batch_size` images over `devices` devices takes with
    `micro_batch` images per device per pass. 0 (auto): the whole batch on GPU/TPU; on CPU the
    most images (a divisor of the per-device batch) whose patch buffers, `image_bytes` each,
    fit in this device's share of CPU_PASS_BYTES (the process's CPU devices run side by side).
    `field` names the batch size in errors."""
    per_device = batch_size // devices
    if micro_batch == 0:
        if jax.default_backend() != 'cpu':
            return 1
        share = CPU_PASS_BYTES / jax.local_device_count()
        fits = max(1, min(per_device, int(share // image_bytes)))
        micro_batch = max(d for d in range(1, fits + 1) if per_device % d == 0)
    if per_device % micro_batch:
        raise UsageError(f'micro_batch={micro_batch} does not divide the {per_device} images per '
                         f'device of a batch ({field}={batch_size} over {devices} devices)')
    return per_device // micro_batch


def split(tree, count: int):
    """Leaves [B, ...] -> [count, B / count, ...]: micro-batch i holds rows i, i + count, ...,
    so with B sharded over devices in blocks each micro-batch keeps every device's share."""
    return jax.tree.map(lambda x: jnp.moveaxis(x.reshape(x.shape[0] // count, count,
                                                         *x.shape[1:]), 1, 0), tree)


def merge(tree):
    """The inverse of `split`: leaves [count, B / count, ...] -> [B, ...] in the batch's order."""
    return jax.tree.map(lambda x: jnp.moveaxis(x, 0, 1).reshape(-1, *x.shape[2:]), tree)


def mapped(function, count: int):
    """function(params, inputs) -> outputs [B, ...], where `inputs` is an array [B, ...] or a
    tree of them (images with their lookup tables), computed `count` micro-batches at a time,
    one after another in one program: unrolled, each micro-batch waiting for the previous
    one's output through an optimization barrier, so XLA runs them in order (not a `lax.map`:
    see the module's docstring)."""
    if count == 1:
        return function

    def run(params, inputs):
        chunks, outputs = split(inputs, count), []
        for i in range(count):
            chunk = jax.tree.map(lambda x: x[i], chunks)
            if outputs:
                _, chunk = jax.lax.optimization_barrier((outputs[-1], chunk))
            outputs.append(function(params, chunk))
        return merge(jax.tree.map(lambda *xs: jnp.stack(xs), *outputs))

    return run


class AccumulatedStep:
    """A train step (state, batch, rng) -> (state, metrics) whose gradient is the mean of `count`
    micro-batches' gradients, each computed by its own compiled call issued from the host.

    prepare(batch, rng) -> inputs {name: [B, ...]} runs once on the whole batch (so augmentation
    is drawn as for the whole batch); gradient(params, inputs of B / count rows) -> (grads,
    metrics {name: scalar mean over the rows}). The calls are chained through the gradient sum
    (donated from call to call), so they run one after another and only one micro-batch's
    temporaries exist at a time. The update and the metrics are those of the whole batch: the
    micro-batches are equal in size, so the mean of their means is the batch's mean. With the
    batch sharded over `batched`'s devices, each micro-batch keeps every device's rows (`split`).
    """

    def __init__(self, prepare, gradient, count: int, replicated, batched, compiler_options=None):
        self.count = count
        jit = functools.partial(jax.jit, compiler_options=compiler_options)

        def split_inputs(batch, rng):
            chunks = split(prepare(batch, rng), count)
            return tuple(jax.tree.map(lambda x: x[i], chunks) for i in range(count))

        def add(total, params, inputs):
            grads, metrics = gradient(params, inputs)
            return jax.tree.map(jnp.add, total, grads), metrics

        def update(state, total, metrics):
            grads = jax.tree.map(lambda g: g / count, total)
            means = jax.tree.map(lambda *xs: jnp.mean(jnp.stack(xs)), *metrics)
            return state.apply_gradients(grads=grads), means

        self.split_inputs = jit(split_inputs, in_shardings=(batched, replicated),
                                out_shardings=batched)
        self.first = jit(gradient, in_shardings=(replicated, batched),
                         out_shardings=replicated)
        self.add = jit(add, in_shardings=(replicated, replicated, batched),
                       out_shardings=replicated, donate_argnums=0)
        self.update = jit(update, out_shardings=replicated, donate_argnums=0)

    def __call__(self, state, batch, rng):
        chunks = self.split_inputs(batch, rng)
        total, first_metrics = self.first(state.params, chunks[0])
        metrics = [first_metrics]
        for inputs in chunks[1:]:
            total, chunk_metrics = self.add(total, state.params, inputs)
            metrics.append(chunk_metrics)
        return self.update(state, total, metrics)
