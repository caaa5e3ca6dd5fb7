"""Slide graphs: the k-nearest-neighbour graph of a slide's patch features, padded and batched.

Each patch is joined to the k patches nearest to it in feature space (Euclidean, itself excluded);
the graph is made symmetric (A = max(A, A^T)). The neighbour search runs on device with JAX:
squared distances |q|^2 + |p|^2 - 2 q.p for a chunk of query rows against all points, then top-k,
so memory stays at chunk x N however large the slide. A slide is a `jraph.GraphsTuple` with
nodes {'features' [N, F], 'grid' [N, 2] (row, col), 'mask' [N]} and edges {'mask' [E]}; padded
to a node budget from a few power-of-two buckets (edge budget 2 k x nodes, the most a symmetric
kNN graph can have), so a run compiles a handful of programs; padding nodes and edges are masked
and padding edges join node 0 to itself.
"""

import functools

import jax
import jax.numpy as jnp
import jraph
import numpy as np

MIN_BUCKET = 64
QUERY_CHUNK = 1024


def bucket_size(count: int, minimum: int = MIN_BUCKET) -> int:
    """The node budget for a slide of `count` patches: the next power of two (at least minimum)."""
    return max(minimum, 1 << max(0, int(count) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=('k', 'chunk'))
def _chunk_neighbours(points, valid, start, k: int, chunk: int):
    """Indices [chunk, k] of the k valid points nearest to each of points[start:start + chunk],
    the query itself excluded. The matmul is explicitly full float32 (a TF32/bfloat16 default
    precision would wreck the cancelling expression); points should be centred."""
    queries = jax.lax.dynamic_slice_in_dim(points, start, chunk)
    query_rows = start + jnp.arange(chunk)
    products = jnp.matmul(queries, points.T, precision=jax.lax.Precision.HIGHEST)  # [c, M]
    distances = (jnp.sum(queries ** 2, axis=1, keepdims=True) + jnp.sum(points ** 2, axis=1)[None]
                 - 2.0 * products)  # [c, M]
    self_match = query_rows[:, None] == jnp.arange(points.shape[0])[None]
    distances = jnp.where(valid[None] & ~self_match, distances, jnp.inf)
    return jax.lax.top_k(-distances, k)[1]


def knn_indices(features: np.ndarray, k: int, chunk: int = QUERY_CHUNK) -> np.ndarray:
    """The k nearest neighbours of every row of features [N, D]: int32 [N, min(k, N - 1)]."""
    count = len(features)
    k = min(k, count - 1)
    if k <= 0:
        return np.zeros((count, 0), np.int32)
    chunk = min(chunk, bucket_size(count))
    size = -(-count // chunk) * chunk  # whole chunks: one program per 1024 points, little padding
    points = np.zeros((size, features.shape[1]), np.float32)
    # Centred (neighbours are translation invariant): |q|^2 + |p|^2 - 2 q.p cancels less.
    np.subtract(features, np.mean(features, axis=0, dtype=np.float64).astype(np.float32),
                out=points[:count], dtype=np.float32)
    valid = np.arange(size) < count
    points_device, valid_device = jax.device_put(points), jax.device_put(valid)
    parts = [_chunk_neighbours(points_device, valid_device, start, k, chunk)
             for start in range(0, count, chunk)]
    return np.concatenate([np.asarray(p) for p in parts])[:count].astype(np.int32)


def symmetric_edges(neighbours: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Directed edges (sender -> receiver) of A = max(A, A^T) for a kNN list [N, k], both
    directions of every pair once, sorted by receiver. Returns int32 (senders [E], receivers [E])."""
    count, k = neighbours.shape
    rows = np.repeat(np.arange(count, dtype=np.int64), k)
    cols = neighbours.reshape(-1).astype(np.int64)
    pairs = np.unique(np.concatenate([rows * count + cols, cols * count + rows]))
    receivers, senders = np.divmod(pairs, count)
    return senders.astype(np.int32), receivers.astype(np.int32)


def slide_graph(features: np.ndarray, grid: np.ndarray, senders: np.ndarray,
                receivers: np.ndarray) -> jraph.GraphsTuple:
    """One unpadded slide graph. features [N, F], grid int [N, 2], edges int [E]."""
    count, edges = len(features), len(senders)
    return jraph.GraphsTuple(
        nodes={'features': np.asarray(features, np.float32), 'grid': np.asarray(grid, np.int32),
               'mask': np.ones(count, bool)},
        edges={'mask': np.ones(edges, bool)},
        senders=np.asarray(senders, np.int32), receivers=np.asarray(receivers, np.int32),
        globals=None, n_node=np.array([count], np.int32), n_edge=np.array([edges], np.int32))


def pad_graph(graph: jraph.GraphsTuple, num_nodes: int, num_edges: int) -> jraph.GraphsTuple:
    """The graph padded with masked nodes (zeros) and masked edges (0 -> 0) to fixed sizes; the
    valid nodes stay first (dense attention on GPU relies on it)."""
    count, edges = int(graph.n_node[0]), int(graph.n_edge[0])
    if count > num_nodes or edges > num_edges:
        raise ValueError(f'a graph of {count} nodes / {edges} edges exceeds the budget '
                         f'{num_nodes} / {num_edges}')

    def pad(array, size):
        widths = [(0, size - len(array))] + [(0, 0)] * (array.ndim - 1)
        return np.pad(array, widths)

    return jraph.GraphsTuple(
        nodes={key: pad(value, num_nodes) for key, value in graph.nodes.items()},
        edges={key: pad(value, num_edges) for key, value in graph.edges.items()},
        senders=pad(graph.senders, num_edges), receivers=pad(graph.receivers, num_edges),
        globals=None, n_node=np.array([num_nodes], np.int32),
        n_edge=np.array([num_edges], np.int32))


def edge_budget(num_nodes: int, k: int) -> int:
    return 2 * k * num_nodes


def stack_graphs(graphs: list[jraph.GraphsTuple]) -> jraph.GraphsTuple:
    """Equal-size padded graphs -> one GraphsTuple whose leaves have a leading slide axis
    (nodes [B, N, ...], edges [B, E]), for models vmapped over slides."""
    return jax.tree.map(lambda *leaves: np.stack(leaves), *graphs)
