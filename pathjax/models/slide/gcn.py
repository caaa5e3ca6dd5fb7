"""Graph convolution with the symmetric normalization A_hat = D^-1/2 (A + I) D^-1/2.

H' = relu(A_hat H W) on one slide's GraphsTuple, padding-safe: masked edges carry nothing and
masked nodes have zero output. D counts each valid node's valid in-edges plus its self-loop;
slide graphs are symmetric, so in- and out-degrees agree (jraph's own GCN mixes sender
out-degrees with receiver in-degrees, which is only right for symmetric graphs too).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph


def normalized_adjacency_apply(graph: jraph.GraphsTuple, values: jax.Array) -> jax.Array:
    """A_hat @ values for one slide. values [N, F] -> [N, F] (same dtype; degrees and sums are
    accumulated in float32, as bfloat16 stops counting at 256)."""
    count = values.shape[0]
    node_mask = graph.nodes['mask'].astype(jnp.float32)
    edge_mask = graph.edges['mask'].astype(jnp.float32)
    degree = 1.0 + jax.ops.segment_sum(edge_mask, graph.receivers, num_segments=count)
    scale = jax.lax.rsqrt(degree) * node_mask  # [N]
    scaled = values.astype(jnp.float32) * scale[:, None]
    messages = scaled[graph.senders] * edge_mask[:, None]
    gathered = jax.ops.segment_sum(messages, graph.receivers, num_segments=count)
    return ((gathered + scaled) * scale[:, None]).astype(values.dtype)


class GCNLayer(nn.Module):
    """relu(A_hat H W) for one slide: nodes [N, F] -> [N, features]."""

    features: int
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, nodes: jax.Array) -> jax.Array:
        transformed = nn.Dense(self.features, use_bias=False, dtype=self.dtype,
                               param_dtype=jnp.float32)(nodes)
        return nn.relu(normalized_adjacency_apply(graph, transformed))
