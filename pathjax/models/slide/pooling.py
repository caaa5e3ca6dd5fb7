"""Pooling of a slide's valid patches into one vector: masked mean, or gated attention whose
weights are the per-patch heatmap."""

import flax.linen as nn
import jax
import jax.numpy as jnp


def masked_mean(nodes: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
    """nodes [N, D], mask [N] -> (mean of the valid nodes [D] float32, weights [N])."""
    weights = mask.astype(jnp.float32) / jnp.maximum(mask.sum(), 1)
    return weights @ nodes.astype(jnp.float32), weights


def masked_softmax(scores: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax of scores [N] over the valid nodes (mask [N]); 0 elsewhere. A finite floor, not
    -inf: a slide with no valid node must not produce NaN gradients."""
    scores = scores.astype(jnp.float32)
    return jnp.where(mask, jax.nn.softmax(jnp.where(mask, scores, -1e30)), 0.0)


class GatedAttentionPooling(nn.Module):
    """Gated attention (Ilse et al. 2018): weights = softmax over valid nodes of
    w^T (tanh(V h) * sigmoid(U h)). nodes [N, D], mask [N] -> (pooled [D], weights [N])."""

    hidden: int

    @nn.compact
    def __call__(self, nodes: jax.Array, mask: jax.Array):
        gate = jnp.tanh(nn.Dense(self.hidden, name='tanh')(nodes)) * \
            nn.sigmoid(nn.Dense(self.hidden, name='sigmoid')(nodes))
        weights = masked_softmax(nn.Dense(1, name='score')(gate)[:, 0], mask)
        return weights @ nodes.astype(jnp.float32), weights
