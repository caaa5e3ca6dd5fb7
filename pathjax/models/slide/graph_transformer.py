"""The method's slide model: graph transformer + normalized GCN + pooling + two-layer MLP.

For one slide graph: project the patch features to d_model (when their size differs), add the
grid position encoding (unless `position_encoding` is off: an ablation), apply `transformer_layers` blocks (multi-head attention, residual, layer
norm, feed-forward, residual, layer norm), then `gcn_layers` layers relu(A_hat H W), pool the
valid patches (masked mean, or gated attention whose weights are per-patch heatmaps), and
classify with Dense -> relu -> Dense. `factory.create_slide_model` maps it over a batch of padded
slides.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from pathjax.models.slide.attention import MultiHeadAttention
from pathjax.models.slide.encoding import grid_encoding
from pathjax.models.slide.gcn import GCNLayer
from pathjax.models.slide.pooling import GatedAttentionPooling, masked_mean


class TransformerBlock(nn.Module):
    """Post-norm transformer block over one slide's nodes [N, D]."""

    num_heads: int
    attention: str
    ff_dim: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, nodes: jax.Array, deterministic: bool):
        attended = MultiHeadAttention(self.num_heads, self.attention, self.dtype)(graph, nodes)
        attended = nn.Dropout(self.dropout)(attended, deterministic=deterministic)
        nodes = nn.LayerNorm(dtype=jnp.float32)(nodes + attended)
        hidden = nn.relu(nn.Dense(self.ff_dim, dtype=self.dtype, param_dtype=jnp.float32)(nodes))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        hidden = nn.Dense(nodes.shape[-1], dtype=self.dtype, param_dtype=jnp.float32)(hidden)
        return nn.LayerNorm(dtype=jnp.float32)(nodes + hidden)


class SlideTransformer(nn.Module):
    """One slide graph -> (logits [C], per-patch pooling weights [N])."""

    num_classes: int
    d_model: int = 128
    num_heads: int = 4
    transformer_layers: int = 2
    gcn_layers: int = 2
    attention: str = 'dense'
    pooling: str = 'mean'
    mlp_hidden: int = 64
    dropout: float = 0.1
    position_encoding: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True, labels=None):
        """-> (logits [C], pooling weights [N]); `labels` unused (no auxiliary loss)."""
        del labels
        mask = graph.nodes['mask']
        nodes = graph.nodes['features'].astype(self.dtype)
        if nodes.shape[-1] != self.d_model:
            nodes = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                             name='projection')(nodes)
        if self.position_encoding:
            nodes = nodes + grid_encoding(graph.nodes['grid'], self.d_model).astype(self.dtype)
        for _ in range(self.transformer_layers):
            nodes = TransformerBlock(self.num_heads, self.attention, 2 * self.d_model,
                                     self.dropout, self.dtype)(graph, nodes, deterministic)
        for _ in range(self.gcn_layers):
            nodes = GCNLayer(self.d_model, self.dtype)(graph, nodes)
        nodes = nodes * mask[:, None].astype(nodes.dtype)
        # Hooks for per-patch contributions (gradient x input at the pooling's input); inert in
        # training and prediction, where neither collection is passed.
        self.sow('intermediates', 'pooling_input', nodes)
        nodes = self.perturb('pooling_input', nodes)
        pooled, weights = self.pool(nodes, mask)
        hidden = nn.relu(nn.Dense(self.mlp_hidden, name='mlp_hidden')(pooled))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        logits = nn.Dense(self.num_classes, name='mlp_out')(hidden)
        return logits.astype(jnp.float32), weights

    def pool(self, nodes, mask):
        if self.pooling == 'gated':
            return GatedAttentionPooling(self.mlp_hidden, name='gated_pooling')(nodes, mask)
        return masked_mean(nodes, mask)
