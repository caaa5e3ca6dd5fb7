"""Position encoding, attention and GCN vs dense numpy references, with padding."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.data import graphs
from pathjax.models.slide.attention import MultiHeadAttention, fused_attention
from pathjax.models.slide.blocked_attention import blocked_attention
from pathjax.models.slide.encoding import grid_encoding
from pathjax.models.slide.gcn import GCNLayer, normalized_adjacency_apply


def random_graph(count=20, padded=32, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    features = rng.normal(size=(count, dim)).astype(np.float32)
    senders, receivers = graphs.symmetric_edges(graphs.knn_indices(features, 3))
    graph = graphs.slide_graph(features, rng.integers(0, 9, (count, 2)), senders, receivers)
    return graphs.pad_graph(graph, padded, graphs.edge_budget(padded, 3))


def dense_adjacency(graph):
    count = len(graph.nodes['mask'])
    adjacency = np.zeros((count, count))
    valid = graph.edges['mask']
    adjacency[graph.receivers[valid], graph.senders[valid]] = 1.0
    return adjacency


def test_position_encoding_formula():
    grid = np.array([[0, 0], [3, 7], [12, 1]])
    d_model = 16
    encoding = np.asarray(grid_encoding(grid, d_model))
    half = d_model // 2
    for n, (row, col) in enumerate(grid):
        for axis, position in ((0, row), (1, col)):
            for j in range(half):
                i = j // 2
                angle = position / 10000 ** (2 * i / half)
                expected = np.sin(angle) if j % 2 == 0 else np.cos(angle)
                assert encoding[n, axis * half + j] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match='divisible by 4'):
        grid_encoding(grid, 18)


def numpy_attention(nodes, params, heads, allowed):
    """softmax(QK^T / sqrt(d)) V per head, then W^O; allowed [N, N] masks keys per query."""
    q = np.einsum('nd,dhk->nhk', nodes, params['query']['kernel']) + params['query']['bias']
    k = np.einsum('nd,dhk->nhk', nodes, params['key']['kernel']) + params['key']['bias']
    v = np.einsum('nd,dhk->nhk', nodes, params['value']['kernel']) + params['value']['bias']
    logits = np.einsum('qhk,shk->hqs', q, k) / np.sqrt(q.shape[-1])
    logits = np.where(allowed[None], logits, -np.inf)
    with np.errstate(invalid='ignore'):  # padding queries with no allowed key: NaN, not compared
        weights = np.exp(logits - logits.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
    attended = np.einsum('hqs,shk->qhk', weights, v)
    return np.einsum('qhk,hkd->qd', attended, params['out']['kernel']) + params['out']['bias']


@pytest.mark.parametrize('mode', ['dense', 'graph'])
def test_attention_matches_numpy(mode):
    graph = random_graph()
    nodes = np.random.default_rng(1).normal(size=(32, 16)).astype(np.float32)
    module = MultiHeadAttention(num_heads=4, mode=mode)
    params = module.init(jax.random.key(0), graph, nodes)['params']
    got = np.asarray(module.apply({'params': params}, graph, nodes))
    mask = graph.nodes['mask']
    if mode == 'dense':
        allowed = np.broadcast_to(mask[None, :], (32, 32))
    else:
        allowed = (dense_adjacency(graph) + np.eye(32)).astype(bool) & mask[None, :]
    expected = numpy_attention(nodes.astype(np.float64), jax.tree.map(np.asarray, params), 4, allowed)
    np.testing.assert_allclose(got[mask], expected[mask], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('valid', [20, 0])
def test_fused_attention_call_matches_blocked_attention(valid):
    """The arguments the GPU path gives cuDNN, run through XLA's implementation here: same valid
    rows as the blocked path, and finite for a slide with no valid node."""
    rng = np.random.default_rng(3)
    query, key, value = (rng.normal(size=(32, 4, 8)).astype(np.float32) for _ in range(3))
    fused = np.asarray(fused_attention(jnp.int32(valid), query, key, value, implementation='xla'))
    assert np.isfinite(fused).all()
    if valid:
        blocked = np.asarray(blocked_attention(query, key, value, jnp.int32(valid)))
        np.testing.assert_allclose(fused[:valid], blocked[:valid], rtol=1e-5, atol=1e-6)


def test_gcn_in_bfloat16_counts_high_degrees():
    """A hub with 600 neighbours: its degree must not saturate in bfloat16 (256)."""
    count = 601
    senders = np.concatenate([np.arange(1, count), np.zeros(count - 1, int)])
    receivers = np.concatenate([np.zeros(count - 1, int), np.arange(1, count)])
    features = np.ones((count, 4), np.float32)
    graph = graphs.slide_graph(features, np.zeros((count, 2), int), senders, receivers)
    single = np.asarray(normalized_adjacency_apply(graph, jnp.asarray(features)))
    half = np.asarray(normalized_adjacency_apply(graph, jnp.asarray(features, jnp.bfloat16)),
                      np.float32)
    hub = 1 / count + (count - 1) / np.sqrt(count * 2)  # sum over j of 1 / sqrt(d_0 d_j)
    np.testing.assert_allclose(single[0], hub, rtol=1e-5)
    np.testing.assert_allclose(half[0], hub, rtol=1e-2)


def test_gcn_matches_dense_normalized_adjacency():
    graph = random_graph()
    nodes = np.random.default_rng(2).normal(size=(32, 8)).astype(np.float32)
    layer = GCNLayer(features=6)
    params = layer.init(jax.random.key(0), graph, nodes)['params']
    got = np.asarray(layer.apply({'params': params}, graph, nodes))
    mask = graph.nodes['mask']
    count = int(mask.sum())
    adjacency = dense_adjacency(graph)[:count, :count] + np.eye(count)
    scale = 1 / np.sqrt(adjacency.sum(1))
    a_hat = scale[:, None] * adjacency * scale[None, :]
    expected = np.maximum(a_hat @ nodes[:count].astype(np.float64) @ np.asarray(params['Dense_0']['kernel']), 0)
    np.testing.assert_allclose(got[:count], expected, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got[count:], 0)
