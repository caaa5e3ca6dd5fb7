"""Multi-head scaled dot-product attention over one slide's patches.

softmax(Q K^T / sqrt(d_k)) V per head, heads concatenated and projected (W^O). 'dense' attends
from every patch to every valid patch (a padded slide's valid nodes come first). On a CUDA GPU
with 16-bit compute it runs cuDNN's fused flash attention through `jax.nn.dot_product_attention`
(valid nodes given as query and key sequence lengths; with `config.deterministic`, XLA builds its
backward pass in cuDNN's deterministic mode); everywhere else, or where cuDNN refuses the shapes,
it runs `blocked_attention`: plain-JAX flash attention, O(N x block) memory, never an N x N
buffer.
'graph' attends only along the slide graph's edges plus each patch's self-loop, with a softmax
over each receiver's incoming edges (memory O(E), not N^2).
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph
from absl import logging

from pathjax.models.slide.blocked_attention import blocked_attention


def segment_softmax(logits: jax.Array, mask: jax.Array, segments: jax.Array,
                    num_segments: int) -> jax.Array:
    """Softmax of logits [E, H] over the entries of each segment where mask [E] is true; masked
    entries get weight 0 and a segment with no valid entry gets all zeros."""
    logits = jnp.where(mask[:, None], logits.astype(jnp.float32), -jnp.inf)
    maxima = jax.ops.segment_max(logits, segments, num_segments=num_segments)
    maxima = jnp.where(jnp.isfinite(maxima), maxima, 0.0)
    exps = jnp.where(mask[:, None], jnp.exp(logits - maxima[segments]), 0.0)
    sums = jax.ops.segment_sum(exps, segments, num_segments=num_segments)
    return exps / jnp.maximum(sums[segments], 1e-30)


def fused_kernel_fits(dtype) -> bool:
    """Whether to try cuDNN's fused attention: a GPU backend and 16-bit compute (cuDNN checks
    the rest, head size and version, when the call is traced)."""
    return jax.default_backend() == 'gpu' and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16)


def fused_attention(valid: jax.Array, query: jax.Array, key: jax.Array, value: jax.Array,
                    implementation: str) -> jax.Array:
    """`jax.nn.dot_product_attention` over one slide whose first `valid` [] nodes are real:
    query, key, value [N, H, d_k] -> [N, H, d_k]. Query and key lengths are both given: under
    `vmap` over slides, JAX batches the call and reshapes a missing query length to the batch,
    which fails. A slide with no valid node attends to node 0 (its output is masked downstream)."""
    lengths = jnp.maximum(valid, 1).astype(jnp.int32)[None]
    return jax.nn.dot_product_attention(query[None], key[None], value[None],
                                        query_seq_lengths=lengths, key_value_seq_lengths=lengths,
                                        implementation=implementation)[0]


class MultiHeadAttention(nn.Module):
    """One slide: graph (for masks and edges), nodes [N, D] -> [N, D]."""

    num_heads: int
    mode: str = 'dense'  # 'dense' or 'graph'
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, nodes: jax.Array) -> jax.Array:
        d_model = nodes.shape[-1]
        if d_model % self.num_heads:
            raise ValueError(f'd_model {d_model} is not divisible by {self.num_heads} heads')
        head_dim = d_model // self.num_heads

        def project(name):
            return nn.DenseGeneral((self.num_heads, head_dim), dtype=self.dtype,
                                   param_dtype=jnp.float32, name=name)(nodes)  # [N, H, d_k]

        query, key, value = project('query'), project('key'), project('value')
        node_mask = graph.nodes['mask']
        if self.mode == 'dense':
            attended = self._dense(node_mask, query, key, value)
        else:
            attended = self._along_edges(graph, query, key, value)
        return nn.DenseGeneral(d_model, axis=(-2, -1), dtype=self.dtype, param_dtype=jnp.float32,
                               name='out')(attended)

    @staticmethod
    def _dense(node_mask, query, key, value):
        """Every query against every valid key. [N, H, d_k] x 3 -> [N, H, d_k]."""
        valid = node_mask.sum(dtype=jnp.int32)
        if fused_kernel_fits(query.dtype):
            try:
                return fused_attention(valid, query, key, value, implementation='cudnn')
            except (NotImplementedError, RuntimeError, TypeError, ValueError) as refusal:
                logging.warning('cuDNN attention unavailable (%s: %s); using blocked attention',
                                type(refusal).__name__, refusal)
        return blocked_attention(query, key, value, valid)

    @staticmethod
    def _along_edges(graph, query, key, value):
        count = query.shape[0]
        loops = jnp.arange(count, dtype=graph.senders.dtype)
        senders = jnp.concatenate([graph.senders, loops])
        receivers = jnp.concatenate([graph.receivers, loops])
        mask = jnp.concatenate([graph.edges['mask'], graph.nodes['mask']])
        logits = jnp.einsum('ehd,ehd->eh', query[receivers].astype(jnp.float32),
                            key[senders].astype(jnp.float32)) / jnp.sqrt(query.shape[-1])
        weights = segment_softmax(logits, mask, receivers, count)  # [E + N, H]
        messages = weights[..., None].astype(value.dtype) * value[senders]
        return jax.ops.segment_sum(messages, receivers, num_segments=count)
