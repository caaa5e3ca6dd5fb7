"""TransMIL: parity with the authors' PyTorch code, its depthwise convolutions' values and
gradients against torch's grouped convolution, padding invariance, batching, bfloat16, and no
N x N array at N = 8192."""

import math
import re

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from benchmarks.torch_slide_baselines import TorchTransMIL
from pathjax.data import graphs
from pathjax.models.slide.factory import batched
from pathjax.models.slide.transmil import TransMIL, depthwise_conv

FEATURES = 24
SETTINGS = dict(num_classes=3, d_model=64, heads=4)  # 32 landmarks

Batched = batched(TransMIL)  # as the slide stage runs it


# The reference (szc19990412/TransMIL @ 9d6aee57, lucidrains/nystrom-attention @ fbe9ebad),
# shared with the benchmark: benchmarks/torch_slide_baselines.py.


def torch_model(params):
    """The reference with the Flax parameters."""
    renamed = {'fc1': '_fc1.0', 'fc2': '_fc2', 'to_out': 'to_out.0'}
    state = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        value = np.array(value)
        *modules, leaf = path
        if leaf == 'kernel':  # Dense [in, out] -> [out, in]; Conv [kh, kw, 1, C] -> [C, 1, kh, kw]
            value, leaf = (value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)), 'weight'
        elif leaf == 'scale':
            leaf = 'weight'
        elif leaf == 'cls_token':
            value = value[None, None]
        state['.'.join([renamed.get(m, m) for m in modules] + [leaf])] = torch.from_numpy(value)
    model = TorchTransMIL(SETTINGS['num_classes'], FEATURES, SETTINGS['d_model'],
                          SETTINGS['heads'])
    model.load_state_dict(state)
    return model.eval()


def slide(count, nodes, seed=0):
    """(features [count, F], one padded slide graph of `nodes` nodes)."""
    features = np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)
    grid = np.zeros((count, 2), np.int32)
    empty = np.zeros(0, np.int32)
    graph = graphs.pad_graph(graphs.slide_graph(features, grid, empty, empty), nodes, 1)
    return features, graph


def init(model, graph):
    return jax.jit(model.init, static_argnums=2)(jax.random.key(0), graph, True)['params']


def test_logits_match_the_authors_pytorch_code():
    model = TransMIL(**SETTINGS)
    params = init(model, slide(7, 8)[1])
    reference_model = torch_model(params)
    apply = jax.jit(model.apply)
    # n = 1, a perfect square, T just past a multiple of m (65 = 2 * 32 + 1), several segments.
    for count in (1, 7, 16, 64, 200):
        features, graph = slide(count, 1 << (count - 1).bit_length(), seed=count)
        logits, scores = apply({'params': params}, graph)
        with torch.no_grad():
            reference = reference_model(torch.from_numpy(features)[None])[0].numpy()
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(scores, np.zeros(len(scores)))


@pytest.mark.parametrize('shape, kernel_size', [((9, 11, 6), (7, 7)), ((40, 5, 3), (33, 1)),
                                                ((4, 4, 2), (5, 3))])
def test_depthwise_conv_and_its_gradients_match_torch(shape, kernel_size):
    """Value, input gradient and kernel gradient of sum(w * conv(x)) against torch's grouped
    conv2d with 'same' zero padding (the kernel larger than the input included)."""
    rng = np.random.default_rng(sum(shape))
    x = rng.normal(size=shape).astype(np.float32)
    kernel = rng.normal(size=(*kernel_size, 1, shape[-1])).astype(np.float32)
    weights = rng.normal(size=shape).astype(np.float32)

    def objective(x, kernel):
        return jnp.sum(depthwise_conv(x, kernel) * weights)

    value = depthwise_conv(jnp.asarray(x), jnp.asarray(kernel))
    grad_x, grad_kernel = jax.grad(objective, argnums=(0, 1))(jnp.asarray(x), jnp.asarray(kernel))
    tx = torch.tensor(x.transpose(2, 0, 1)[None], requires_grad=True)  # [1, C, A, B]
    tk = torch.tensor(kernel.transpose(3, 2, 0, 1), requires_grad=True)  # [C, 1, ka, kb]
    out = torch.nn.functional.conv2d(tx, tk, padding='same', groups=shape[-1])
    (out * torch.tensor(weights.transpose(2, 0, 1)[None])).sum().backward()
    np.testing.assert_allclose(value, out[0].detach().numpy().transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_allclose(grad_x, tx.grad[0].numpy().transpose(1, 2, 0), atol=1e-5)
    np.testing.assert_allclose(grad_kernel, tk.grad.numpy().transpose(2, 3, 1, 0), atol=1e-4)


def test_padding_does_not_change_the_logits():
    model = TransMIL(**SETTINGS)
    params = init(model, slide(37, 64)[1])
    apply = jax.jit(model.apply)
    small = apply({'params': params}, slide(37, 64)[1])[0]
    large = apply({'params': params}, slide(37, 256)[1])[0]
    np.testing.assert_allclose(large, small, rtol=0, atol=1e-5)


def test_batch_of_slides_with_finite_gradients_even_when_empty():
    model = Batched(**SETTINGS)
    batch = graphs.stack_graphs([slide(count, 64, seed=count)[1] for count in (37, 1, 0)])
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), batch, True, None)
    labels = jnp.array([0, 2, 1])
    apply = jax.jit(model.apply, static_argnums=2, static_argnames='mutable')
    (logits, scores), state = apply(variables, batch, True, None, mutable=('intermediates',))
    assert logits.shape == (3, 3) and scores.shape == (3, 64)
    assert state['intermediates']['pooling_input'][0].shape == (3, 64, 64)
    np.testing.assert_array_equal(apply(variables, batch, True, labels)[0], logits)

    def loss(params, perturbations):
        logits, _ = model.apply({'params': params, 'perturbations': perturbations}, batch, False,
                                labels, rngs={'dropout': jax.random.key(1)})
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum()

    grads, contributions = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'],
                                                                   variables['perturbations'])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    contributions = contributions['pooling_input']
    assert bool(jnp.isfinite(contributions).all())
    # Padding rows get no gradient; every valid patch does.
    valid = batch.nodes['mask']
    assert not contributions[~valid].any()
    assert bool((jnp.abs(contributions).sum(-1) > 0)[valid].all())


def test_bfloat16_compute_stays_close_to_float32():
    single, half = TransMIL(**SETTINGS), TransMIL(**SETTINGS, dtype=jnp.bfloat16)
    params = init(single, slide(200, 256)[1])
    shapes = jax.eval_shape(half.init, jax.random.key(0), slide(200, 256)[1])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes['params']))
    single_apply, half_apply = jax.jit(single.apply), jax.jit(half.apply)
    for count in (37, 200):
        graph = slide(count, 256, seed=count)[1]
        reference = single_apply({'params': params}, graph)[0]
        logits = half_apply({'params': params}, graph)[0]
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, reference, rtol=0, atol=5e-2)


def test_no_n_by_n_array_at_8192_nodes():
    nodes = 8192
    model = TransMIL(num_classes=2)  # d_model 512, 8 heads, 256 landmarks
    graph = jax.eval_shape(lambda: slide(1, nodes)[1])
    graph = graph._replace(nodes={**graph.nodes, 'features': jax.ShapeDtypeStruct((nodes, 1024),
                                                                                  jnp.float32)})
    params = jax.eval_shape(lambda g: init(model, g), graph)
    compiled = jax.jit(model.apply).lower({'params': params}, graph).compile()
    shapes = re.findall(r'\b(?:f32|bf16|s32|pred)\[([\d,]+)\]', compiled.as_text())
    largest = max(math.prod(int(d) for d in shape.split(',')) for shape in shapes)
    assert largest < nodes * nodes
    assert compiled.memory_analysis().temp_size_in_bytes < nodes * nodes * 4
