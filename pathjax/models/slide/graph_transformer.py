"""The slide model: graph transformer + normalized GCN + pooling + two-layer MLP.

For one slide graph: project the patch features to d_model (when their size differs), add the
grid position encoding, apply `transformer_layers` blocks (multi-head attention, residual, layer
norm, feed-forward, residual, layer norm), then `gcn_layers` layers relu(A_hat H W), pool the
valid patches (masked mean, or gated attention whose weights are per-patch heatmaps), and
classify with Dense -> relu -> Dense. `BatchedSlideTransformer` maps it over a batch of padded
slides (leading axis) with shared parameters and per-slide dropout.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from pathjax.models.slide.attention import MultiHeadAttention
from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.slide.encoding import grid_encoding
from pathjax.models.slide.gcn import GCNLayer


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


class GatedAttentionPooling(nn.Module):
    """Gated attention (Ilse et al. 2018): weights = softmax over valid nodes of
    w^T (tanh(V h) * sigmoid(U h)). nodes [N, D], mask [N] -> (pooled [D], weights [N])."""

    hidden: int

    @nn.compact
    def __call__(self, nodes: jax.Array, mask: jax.Array):
        gate = jnp.tanh(nn.Dense(self.hidden, name='tanh')(nodes)) * \
            nn.sigmoid(nn.Dense(self.hidden, name='sigmoid')(nodes))
        scores = nn.Dense(1, name='score')(gate)[:, 0].astype(jnp.float32)
        # A finite floor, not -inf: a slide with no valid node must not produce NaN gradients.
        weights = jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, -1e30)), 0.0)
        return weights @ nodes.astype(jnp.float32), weights


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
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True):
        mask = graph.nodes['mask']
        nodes = graph.nodes['features'].astype(self.dtype)
        if nodes.shape[-1] != self.d_model:
            nodes = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=jnp.float32,
                             name='projection')(nodes)
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
        weights = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)
        return weights @ nodes.astype(jnp.float32), weights


# Slides on a leading axis, parameters shared, an independent dropout stream per slide.
BatchedSlideTransformer = nn.vmap(SlideTransformer, in_axes=(0, None), out_axes=0,
                                  variable_axes={'params': None, 'intermediates': 0,
                                                 'perturbations': 0},
                                  split_rngs={'params': False, 'dropout': True})


def create_slide_model(config, num_classes: int) -> nn.Module:
    """The batched slide model described by `config.slide_net` and `config.dtype`."""
    net = config.slide_net
    return BatchedSlideTransformer(
        num_classes=num_classes, d_model=net.d_model, num_heads=net.heads,
        transformer_layers=net.transformer_layers, gcn_layers=net.gcn_layers,
        attention=net.attention, pooling=net.pooling, mlp_hidden=net.mlp_hidden,
        dropout=net.dropout, dtype=compute_dtype(config))
