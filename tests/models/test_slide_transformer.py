"""The slide model: invariant to padding and to the order of a slide's patches."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from pathjax.data import graphs
from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.slide.factory import batched
from pathjax.models.slide.graph_transformer import SlideTransformer

BatchedSlideTransformer = batched(SlideTransformer)


def slide(count=40, dim=24, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, dim)).astype(np.float32)
    grid = rng.integers(0, 30, (count, 2))
    senders, receivers = graphs.symmetric_edges(graphs.knn_indices(features, 4))
    return features, grid, senders, receivers


def logits_of(model, params, features, grid, senders, receivers, nodes):
    graph = graphs.pad_graph(graphs.slide_graph(features, grid, senders, receivers), nodes,
                             graphs.edge_budget(nodes, 4))
    logits, weights = model.apply({'params': params}, graphs.stack_graphs([graph]), True, None)
    return np.asarray(logits[0]), np.asarray(weights[0][:len(features)])


@pytest.mark.parametrize('attention, pooling', [('dense', 'mean'), ('graph', 'gated'),
                                                ('dense', 'gated')])
def test_padding_and_patch_order_do_not_change_the_prediction(attention, pooling):
    model = BatchedSlideTransformer(num_classes=3, d_model=32, num_heads=4, transformer_layers=2,
                                    gcn_layers=2, attention=attention, pooling=pooling)
    features, grid, senders, receivers = slide()
    graph = graphs.pad_graph(graphs.slide_graph(features, grid, senders, receivers), 64,
                             graphs.edge_budget(64, 4))
    params = model.init(jax.random.key(0), graphs.stack_graphs([graph]), True, None)['params']
    reference, weights = logits_of(model, params, features, grid, senders, receivers, 64)
    padded, padded_weights = logits_of(model, params, features, grid, senders, receivers, 256)
    np.testing.assert_allclose(padded, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(padded_weights, weights, rtol=1e-5, atol=1e-6)
    order = np.random.default_rng(1).permutation(len(features))
    new_index = np.argsort(order)  # old node i is new node new_index[i]
    permuted, permuted_weights = logits_of(model, params, features[order], grid[order],
                                           new_index[senders], new_index[receivers], 64)
    np.testing.assert_allclose(permuted, reference, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(permuted_weights, weights[order], rtol=1e-5, atol=1e-6)
    assert weights.sum() == pytest.approx(1.0, abs=1e-5)
    # The slide's content matters: another slide gives other logits.
    other, _ = logits_of(model, params, *slide(seed=5), 64)
    assert not np.allclose(other, reference, atol=1e-4)


@pytest.mark.parametrize('attention, pooling', [('dense', 'gated'), ('graph', 'mean')])
def test_bfloat16_compute_stays_close_to_float32(attention, pooling):
    """Accelerators run the slide model in bfloat16 ('auto'): same float32 parameters, float32
    logits within bfloat16 rounding of the float32 model's, finite gradients."""
    settings = dict(num_classes=2, d_model=32, num_heads=4, transformer_layers=2, gcn_layers=2,
                    attention=attention, pooling=pooling)
    single = BatchedSlideTransformer(**settings)
    half = BatchedSlideTransformer(**settings, dtype=jnp.bfloat16)
    features, grid, senders, receivers = slide()
    batch = graphs.stack_graphs([graphs.pad_graph(graphs.slide_graph(features, grid, senders, receivers),
                                                  64, graphs.edge_budget(64, 4))])
    params = single.init(jax.random.key(0), batch, True, None)['params']
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(half.init(jax.random.key(0), batch, True, None)['params']))
    reference, _ = single.apply({'params': params}, batch, True, None)
    logits, _ = half.apply({'params': params}, batch, True, None)
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, atol=0.05 * float(jnp.abs(reference).max()) + 0.02)
    gradients = jax.grad(lambda p: half.apply({'params': p}, batch, True, None)[0].sum())(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(gradients))


def test_auto_dtype_is_float32_on_cpu():
    config = ml_collections.ConfigDict({'dtype': 'auto'})
    assert jax.default_backend() == 'cpu' and compute_dtype(config) == jnp.float32
    config.dtype = 'bfloat16'
    assert compute_dtype(config) == jnp.bfloat16
