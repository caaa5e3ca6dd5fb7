"""ABMIL: attention-based deep multiple-instance learning with gated attention (Ilse et al.,
ICML 2018), as mahmoodlab implements it.

Patch features -> Dense(d_model) -> ReLU -> Dropout; gated attention scores
w^T (Dropout(tanh(V h)) * Dropout(sigmoid(U h))), softmax over the valid patches; the weighted
sum of the embedded patches -> Dense(num_classes). Code followed: mahmoodlab/MIL-Lab
src/models/abmil.py and src/models/layers.py (create_mlp, GlobalGatedAttention) at commit
dfc3c17ca6876a8f9bd33a9162c40f2c22631d9d, and mahmoodlab/CLAM models/model_clam.py
(Attn_Net_Gated, CLAM_SB's fc) at commit 53e2409d4a8189c682c173382964a85f114f923c. Both put a
dropout on each attention branch, after tanh and after sigmoid (MIL-Lab at the model's rate, CLAM
at 0.25 whenever dropout is on), so `GatedAttentionPooling` (no dropout) is not reused; the dropout
after the embedding's ReLU is CLAM's (MIL-Lab's one-layer patch_embed has none).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from pathjax.models.slide.pooling import masked_softmax


class GatedAttention(nn.Module):
    """Attn_Net_Gated: nodes [N, L] -> raw attention scores [N] float32 (before the softmax)."""

    hidden: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, nodes: jax.Array, deterministic: bool) -> jax.Array:
        dense = functools.partial(nn.Dense, dtype=self.dtype, param_dtype=jnp.float32)
        a = nn.Dropout(self.dropout)(jnp.tanh(dense(self.hidden, name='attention_a')(nodes)),
                                     deterministic=deterministic)
        b = nn.Dropout(self.dropout)(nn.sigmoid(dense(self.hidden, name='attention_b')(nodes)),
                                     deterministic=deterministic)
        return dense(1, name='attention_c')(a * b)[:, 0].astype(jnp.float32)


class ABMIL(nn.Module):
    """One slide graph -> (logits [C] float32, attention weights [N] float32)."""

    num_classes: int
    d_model: int = 512
    attention_hidden: int = 256
    dropout: float = 0.25
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True, labels=None):
        """-> (logits [C], weights [N]: 0 on padding, summing to 1 over the valid nodes);
        `labels` unused (no auxiliary loss)."""
        del labels
        nodes, _, weights = self.attend(graph, deterministic)
        return self.classify(nodes, weights), weights

    def attend(self, graph: jraph.GraphsTuple, deterministic: bool):
        """-> (embedded patches [N, d_model] (0 on padding), raw attention scores [N] float32,
        attention weights [N] float32)."""
        mask = graph.nodes['mask']
        nodes = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=jnp.float32, name='fc')(
            graph.nodes['features'].astype(self.dtype))
        nodes = nn.Dropout(self.dropout)(nn.relu(nodes), deterministic=deterministic)
        nodes = nodes * mask[:, None].astype(nodes.dtype)
        self.sow('intermediates', 'pooling_input', nodes)  # per-patch contributions
        nodes = self.perturb('pooling_input', nodes)
        scores = GatedAttention(self.attention_hidden, self.dropout, self.dtype,
                                name='attention')(nodes, deterministic)
        return nodes, scores, masked_softmax(scores, mask)

    def classify(self, nodes: jax.Array, weights: jax.Array) -> jax.Array:
        """Attention pooling (float32) and the bag classifier: -> logits [C] float32."""
        pooled = weights @ nodes.astype(jnp.float32)
        return nn.Dense(self.num_classes, dtype=jnp.float32, name='classifier')(pooled)
