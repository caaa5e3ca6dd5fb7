"""Blocked (flash-style) attention vs dense float64 numpy: values, gradients, padding, memory."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models.slide.blocked_attention import Blocks, blocked_attention


def numpy_attention(query, key, value, valid, out_grad):
    """Dense float64 attention over the first `valid` keys and its gradients by the textbook
    formulas: (out [N, H, d], (dQ, dK, dV)) for query, key, value, out_grad [N, H, d]."""
    q, k, v, g = (np.asarray(x, np.float64) for x in (query, key, value, out_grad))
    scale = q.shape[-1] ** -0.5
    logits = np.einsum('qhd,khd->hqk', q, k) * scale
    logits[:, :, valid:] = -np.inf
    weights = np.exp(logits - logits.max(-1, keepdims=True))
    weights /= weights.sum(-1, keepdims=True)  # [H, N, N]
    out = np.einsum('hqk,khd->qhd', weights, v)
    weights_grad = np.einsum('qhd,khd->hqk', g, v)
    logits_grad = weights * (weights_grad - (weights_grad * weights).sum(-1, keepdims=True))
    query_grad = np.einsum('hqk,khd->qhd', logits_grad, k) * scale
    key_grad = np.einsum('hqk,qhd->khd', logits_grad, q) * scale
    value_grad = np.einsum('hqk,qhd->khd', weights, g)
    return out, (query_grad, key_grad, value_grad)


def random_inputs(count, heads=2, dim=8, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [rng.normal(size=(count, heads, dim)).astype(dtype) for _ in range(4)]


def value_and_grads(blocks, query, key, value, valid, out_grad):
    """out and the gradients of sum(out[:valid] * out_grad[:valid]) w.r.t. query, key, value,
    as numpy."""
    out, grads = traced_value_and_grads(blocks, query, key, value, valid, out_grad)
    return np.asarray(out), [np.asarray(g) for g in grads]


def traced_value_and_grads(blocks, query, key, value, valid, out_grad):
    rows = (jnp.arange(query.shape[0]) < valid)[:, None, None]

    def objective(q, k, v):
        out = blocked_attention(q, k, v, valid, blocks)
        return jnp.sum(jnp.where(rows, out * out_grad, 0.0)), out

    (_, out), grads = jax.value_and_grad(objective, argnums=(0, 1, 2), has_aux=True)(
        query, key, value)
    return out, grads


@pytest.mark.parametrize('count,valid,blocks', [
    (64, 64, Blocks(16, 32, True)),   # several tiles, all valid
    (64, 37, Blocks(16, 32, True)),   # valid ends inside a tile
    (64, 1, Blocks(16, 16, True)),    # one valid node
    (48, 30, Blocks(32, 16, False)),  # rows not a multiple of the query tile: padded inside
    (20, 13, Blocks(64, 128, True)),  # tiles larger than the slide
])
def test_matches_dense_numpy(count, valid, blocks):
    query, key, value, out_grad = random_inputs(count)
    out, grads = value_and_grads(blocks, query, key, value, valid, out_grad)
    expected_out, expected_grads = numpy_attention(query, key, value, valid, out_grad)
    np.testing.assert_allclose(out[:valid], expected_out[:valid], rtol=1e-5, atol=1e-5)
    rows = np.arange(count) < valid  # only valid outputs carry a gradient
    expected_grads = numpy_attention(query, key, value, valid, out_grad * rows[:, None, None])[1]
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('sequential', [True, False])
def test_batched_slides_each_use_their_own_valid_nodes(sequential):
    """vmap over slides (as the slide model does): each slide as if alone, including a slide
    with no valid node (finite output, zero gradients)."""
    count, valids = 64, np.array([64, 40, 0, 17], np.int32)
    inputs = [np.stack(x) for x in zip(*(random_inputs(count, seed=s) for s in range(4)))]
    blocks = Blocks(16, 32, sequential)
    outs, grads = jax.vmap(lambda q, k, v, n, g: traced_value_and_grads(blocks, q, k, v, n, g))(
        *inputs[:3], valids, inputs[3])
    outs, grads = np.asarray(outs), [np.asarray(g) for g in grads]
    for slide, valid in enumerate(valids):
        alone = value_and_grads(blocks, *(x[slide] for x in inputs[:3]), valid, inputs[3][slide])
        assert np.isfinite(outs[slide]).all()
        np.testing.assert_allclose(outs[slide][:valid], alone[0][:valid], rtol=1e-5, atol=1e-6)
        for got, expected in zip(grads, alone[1]):
            np.testing.assert_allclose(got[slide], expected, rtol=1e-5, atol=1e-6)
    assert all(np.all(g[2] == 0) for g in grads)


def test_bfloat16_inputs_stay_close_to_float32():
    query, key, value, out_grad = random_inputs(128, heads=4, dim=16, seed=3)
    blocks = Blocks(32, 64, True)
    full = value_and_grads(blocks, query, key, value, 100, out_grad)
    half = value_and_grads(blocks, *(jnp.asarray(x, jnp.bfloat16) for x in (query, key, value)),
                           100, out_grad)
    np.testing.assert_allclose(np.asarray(half[0], np.float32)[:100], full[0][:100], atol=3e-2)
    for got, expected in zip(half[1], full[1]):
        assert got.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(got, np.float32), expected, atol=5e-2)


@pytest.mark.parametrize('blocks,count', [(Blocks(64, 128, True), 2048),
                                          (Blocks(1024, 1024, False), 4096)])
def test_training_memory_has_no_nodes_squared_buffer(blocks, count):
    """The compiled gradient of attention over 8 slides x 4 heads (CPU tiles, and the larger
    accelerator tiles): its temporaries grow linearly with N, and at 2N they are far below one
    float32 [8, 4, 2N, 2N] array (2 GiB at 2N = 4096)."""
    def temporaries(nodes):
        shape = jax.ShapeDtypeStruct((8, nodes, 4, 32), jnp.float32)
        valid = jax.ShapeDtypeStruct((8,), jnp.int32)

        def loss(q, k, v, n):
            return jax.vmap(lambda *a: blocked_attention(*a, blocks))(q, k, v, n).sum()

        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(
            shape, shape, shape, valid).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    small, large = temporaries(count), temporaries(2 * count)
    nodes_squared = 8 * 4 * (2 * count) ** 2 * 4
    assert large < nodes_squared / 8, (large, nodes_squared)
    assert large < 2.5 * small, (small, large)  # linear in N, not quadratic


@pytest.mark.parametrize('sequential', [True, False])
def test_slides_split_over_devices_stay_on_their_device(sequential):
    """Under a mesh whose `data` axis splits the slides (8 CPU devices, as training runs), the
    gradient is the single-device one and no device gathers the other devices' slides (XLA
    cannot split the one-slide-at-a-time loop itself: it would all-gather the batch)."""
    mesh = jax.make_mesh((8,), ('data',), axis_types=(jax.sharding.AxisType.Auto,))
    split = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec('data'))
    count, valids = 64, np.array([64, 40, 0, 17, 1, 63, 33, 8], np.int32)
    inputs = [np.stack(x) for x in zip(*(random_inputs(count, seed=s) for s in range(8)))]
    blocks = Blocks(16, 32, sequential)

    def grads(q, k, v, n, g):
        return jax.grad(lambda *a: (jax.vmap(lambda *s: blocked_attention(*s, blocks))(*a, n)
                                    * g).sum(), argnums=(0, 1, 2))(q, k, v)

    expected = jax.jit(grads)(*inputs[:3], valids, inputs[3])
    placed = [jax.device_put(x, split) for x in (*inputs[:3], valids, inputs[3])]
    with jax.set_mesh(mesh):
        step = jax.jit(grads)
        hlo = step.lower(*placed).compile().as_text()
        got = step(*placed)
    assert 'all-gather' not in hlo
    for g, e in zip(got, expected):
        assert g.sharding.spec == jax.sharding.PartitionSpec('data')
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-5, atol=1e-6)
