"""Dense attention over a slide's valid nodes in blocks, without an N x N buffer (plain JAX).

softmax(Q K^T / sqrt(d_k)) V for one slide whose `valid` nodes come first (padding after them),
computed as FlashAttention-2 does (Dao 2023): query blocks against key blocks with an online
softmax, saving only the output and each row's log-sum-exp for the backward pass, which recomputes
the probabilities block by block (custom VJP). Memory is O(N x block) instead of O(N^2), and only
the blocks that hold valid nodes are computed: a slide with n valid nodes costs ceil(n / block)^2
tiles, whatever its padded size.

On CPU, slides of a batch (`vmap`) run one after another (`one_slide_at_a_time`), so each slide
stops at its own valid blocks and the small tiles stay in cache; when the caller runs under a mesh
(`jax.set_mesh`) whose `data` axis splits the batch, each device loops over its own slides only
(XLA's partitioner cannot split such a loop: it would gather every slide onto every device).
Elsewhere the batch is computed together with larger tiles (fewer, bigger kernels), stopping when
the largest slide is done. Query rows past the valid ones are either attention outputs or zeros;
callers mask them.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.sharding import PartitionSpec, get_abstract_mesh

SLIDE_AXIS = 'data'  # the mesh axis a batch of slides is split over (runtime.sharding.DATA_AXIS)


class Blocks(NamedTuple):
    """Tile sizes (query rows, key rows) and whether slides of a batch run one at a time."""

    query: int
    key: int
    sequential: bool


# CPU: 64 x 128 tiles (4 heads: 128 KB of float32 logits, in L2) measured fastest at 1,024 and
# 2,048 nodes (BENCHMARKS.md). Accelerators: few large kernels, a whole batch at a time.
CPU_BLOCKS = Blocks(64, 128, sequential=True)
ACCELERATOR_BLOCKS = Blocks(1024, 1024, sequential=False)


def default_blocks() -> Blocks:
    return CPU_BLOCKS if jax.default_backend() == 'cpu' else ACCELERATOR_BLOCKS


def blocked_attention(query: jax.Array, key: jax.Array, value: jax.Array, valid: jax.Array,
                      blocks: Blocks | None = None) -> jax.Array:
    """Attention of every query over the first `valid` keys. query, key, value [N, H, d_k]
    (any float dtype; logits, softmax and accumulation in float32), valid int32 [] ->
    [N, H, d_k]. Rows past `valid` are unspecified."""
    blocks = blocks or default_blocks()
    count = query.shape[0]
    query_block, key_block = min(blocks.query, count), min(blocks.key, count)
    step = max(query_block, key_block)
    padded = -(-count // step) * step
    if padded != count:  # tiles must divide the rows (node budgets are powers of two: rarely)
        query, key, value = (jnp.pad(x, ((0, padded - count), (0, 0), (0, 0)))
                             for x in (query, key, value))
    heads_first = [jnp.swapaxes(x, 0, 1) for x in (query, key, value)]  # [H, N, d_k]
    out = _attention(*heads_first, jnp.asarray(valid, jnp.int32),
                     Blocks(query_block, key_block, blocks.sequential))
    return jnp.swapaxes(out, 0, 1)[:count]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(query, key, value, valid, blocks: Blocks):
    return _forward(query, key, value, valid, blocks)[0]


def _forward(query, key, value, valid, blocks: Blocks):
    query = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    out, logsumexp = _kernel(_forward_kernel, blocks)(query, key, value, valid)
    return out, (query, key, value, valid, out, logsumexp)


def _backward(blocks: Blocks, residuals, out_grad):
    query, key, value, valid, out, logsumexp = residuals
    query_grad, key_grad, value_grad = _kernel(_backward_kernel, blocks)(
        query, key, value, valid, out, logsumexp, out_grad)
    scale = query.shape[-1] ** -0.5
    return ((query_grad * scale).astype(query.dtype), key_grad.astype(key.dtype),
            value_grad.astype(value.dtype), None)


_attention.defvjp(_forward, _backward)


def _kernel(kernel, blocks: Blocks):
    """kernel with the tile sizes bound; under vmap, one slide at a time if blocks.sequential."""
    bound = functools.partial(kernel, query_block=blocks.query, key_block=blocks.key)
    return one_slide_at_a_time(bound) if blocks.sequential else bound


def one_slide_at_a_time(kernel):
    """kernel(*arrays), which under vmap runs on the slides one after another (`lax.map`); with
    an ambient mesh whose `data` axis splits the slides, each device maps over its own share."""

    @custom_vmap
    def run(*arrays):
        return kernel(*arrays)

    @run.def_vmap
    def each_slide(slides: int, batched: list[bool], *arrays):
        arrays = [x if is_batched else jnp.broadcast_to(x, (slides, *x.shape))
                  for x, is_batched in zip(arrays, batched)]

        def loop(*arrays):
            return lax.map(lambda one: kernel(*one), arrays)

        mesh = get_abstract_mesh()
        devices = dict(mesh.shape).get(SLIDE_AXIS, 1) if not mesh.empty else 1
        if devices > 1 and slides % devices == 0:
            loop = jax.shard_map(loop, in_specs=PartitionSpec(SLIDE_AXIS),
                                 out_specs=PartitionSpec(SLIDE_AXIS), check_vma=False)
        out = loop(*arrays)
        return out, jax.tree.map(lambda _: True, out)

    return run


def _tiles(valid, size: int):
    """How many tiles of `size` rows hold the first `valid` rows."""
    return (valid + size - 1) // size


def _rows(array, tile, size: int):
    """Rows tile * size ... of a [H, N, ...] array."""
    return lax.dynamic_slice_in_dim(array, tile * size, size, axis=1)


def _forward_kernel(query, key, value, valid, query_block: int, key_block: int):
    """(out [H, N, d_k], logsumexp float32 [H, N]) for pre-scaled query rows."""
    heads, count, dim = query.shape

    def query_tile(i, carry):
        out, logsumexp = carry
        rows = _rows(query, i, query_block)

        def key_tile(j, state):
            maximum, total, acc = state
            logits = jnp.einsum('hqd,hkd->hqk', rows, _rows(key, j, key_block),
                                preferred_element_type=jnp.float32)
            keys = j * key_block + jnp.arange(key_block)
            logits = jnp.where(keys < valid, logits, -jnp.inf)
            new_maximum = jnp.maximum(maximum, logits.max(axis=-1))
            weights = jnp.exp(logits - new_maximum[..., None])
            correction = jnp.exp(maximum - new_maximum)
            acc = acc * correction[..., None] + jnp.einsum(
                'hqk,hkd->hqd', weights.astype(value.dtype), _rows(value, j, key_block),
                preferred_element_type=jnp.float32)
            return new_maximum, total * correction + weights.sum(axis=-1), acc

        start = (jnp.full((heads, query_block), -jnp.inf, jnp.float32),
                 jnp.zeros((heads, query_block), jnp.float32),
                 jnp.zeros((heads, query_block, dim), jnp.float32))
        maximum, total, acc = lax.fori_loop(0, _tiles(valid, key_block), key_tile, start)
        out = lax.dynamic_update_slice_in_dim(out, (acc / total[..., None]).astype(out.dtype),
                                              i * query_block, axis=1)
        logsumexp = lax.dynamic_update_slice_in_dim(logsumexp, maximum + jnp.log(total),
                                                    i * query_block, axis=1)
        return out, logsumexp

    start = (jnp.zeros_like(query), jnp.zeros((heads, count), jnp.float32))
    return lax.fori_loop(0, _tiles(valid, query_block), query_tile, start)


def _backward_kernel(query, key, value, valid, out, logsumexp, out_grad, query_block: int,
                     key_block: int):
    """float32 (query, key, value) gradients [H, N, d_k] (query's w.r.t. the scaled query)."""
    heads, count, dim = query.shape
    # delta_i = sum_d dO_id O_id = sum_k P_ik dP_ik, the softmax backward's row term.
    delta = jnp.einsum('hnd,hnd->hn', out_grad.astype(jnp.float32), out.astype(jnp.float32))

    def key_tile(j, carry):
        query_grad, key_grad, value_grad = carry
        keys, values = _rows(key, j, key_block), _rows(value, j, key_block)
        valid_keys = (j * key_block + jnp.arange(key_block) < valid)[:, None]

        def query_tile(i, state):
            query_grad, keys_grad, values_grad = state
            rows, rows_grad = _rows(query, i, query_block), _rows(out_grad, i, query_block)
            # Transposed tiles [H, key, query]: both weight-gradient products contract over the
            # query rows without a transposed operand (2x slower on XLA CPU).
            logits_t = jnp.einsum('hkd,hqd->hkq', keys, rows, preferred_element_type=jnp.float32)
            weights_t = jnp.where(valid_keys, jnp.exp(logits_t - _rows(logsumexp, i, query_block)[:, None]),
                                  0.0)
            values_grad += jnp.einsum('hkq,hqd->hkd', weights_t.astype(rows_grad.dtype), rows_grad,
                                      preferred_element_type=jnp.float32)
            weights_grad_t = jnp.einsum('hkd,hqd->hkq', values, rows_grad,
                                        preferred_element_type=jnp.float32)
            logits_grad_t = weights_t * (weights_grad_t - _rows(delta, i, query_block)[:, None])
            keys_grad += jnp.einsum('hkq,hqd->hkd', logits_grad_t.astype(rows.dtype), rows,
                                    preferred_element_type=jnp.float32)
            # An explicit transpose (kept by the barrier) is cheaper than a transposed operand.
            logits_grad = lax.optimization_barrier(jnp.swapaxes(logits_grad_t, 1, 2))
            rows_query_grad = _rows(query_grad, i, query_block) + jnp.einsum(
                'hqk,hkd->hqd', logits_grad.astype(keys.dtype), keys,
                preferred_element_type=jnp.float32)
            query_grad = lax.dynamic_update_slice_in_dim(query_grad, rows_query_grad,
                                                         i * query_block, axis=1)
            return query_grad, keys_grad, values_grad

        zeros = jnp.zeros((heads, key_block, dim), jnp.float32)
        query_grad, keys_grad, values_grad = lax.fori_loop(
            0, _tiles(valid, query_block), query_tile, (query_grad, zeros, zeros))
        key_grad = lax.dynamic_update_slice_in_dim(key_grad, keys_grad, j * key_block, axis=1)
        value_grad = lax.dynamic_update_slice_in_dim(value_grad, values_grad, j * key_block, axis=1)
        return query_grad, key_grad, value_grad

    zeros = jnp.zeros((heads, count, dim), jnp.float32)
    return lax.fori_loop(0, _tiles(valid, key_block), key_tile, (zeros, zeros, zeros))
