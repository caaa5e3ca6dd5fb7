"""The simplest slide model, a baseline: the mean of a slide's patch features through a
two-layer MLP (Dense -> ReLU -> Dropout -> Dense)."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp
import jraph

from pathjax.models.slide.pooling import masked_mean


class MeanPool(nn.Module):
    """One slide graph -> (logits [C], uniform pooling weights [N])."""

    num_classes: int
    mlp_hidden: int = 64
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True, labels=None):
        del labels  # no auxiliary loss
        mask = graph.nodes['mask']
        nodes = graph.nodes['features'] * mask[:, None]
        self.sow('intermediates', 'pooling_input', nodes)  # per-patch contributions
        nodes = self.perturb('pooling_input', nodes)
        pooled, weights = masked_mean(nodes, mask)
        hidden = nn.relu(nn.Dense(self.mlp_hidden, dtype=self.dtype, param_dtype=jnp.float32,
                                  name='mlp_hidden')(pooled))
        hidden = nn.Dropout(self.dropout)(hidden, deterministic=deterministic)
        logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                          name='mlp_out')(hidden)
        return logits.astype(jnp.float32), weights
