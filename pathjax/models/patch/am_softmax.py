"""Additive-margin softmax (AM-softmax): the metric-learning head and loss of the feature stage.

With f the L2-normalized feature and W_j the L2-normalized weight of class j (no bias),
cos(theta_j) = W_j . f, and the training logits are
    logit_j = s * cos(theta_j) - s * m * [j == y],
so the target class must win by a margin m in cosine. The loss is the cross entropy of these
logits (the reference's formula; defaults s = 30, m = 0.35). Predictions use the cosines alone.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

EPSILON = 1e-12


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), EPSILON))


class AMSoftmaxHead(nn.Module):
    """features [B, D] -> cosines [B, C] between normalized features and class weights."""

    num_classes: int

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        weights = self.param('class_weights', nn.initializers.normal(stddev=0.01),
                             (features.shape[-1], self.num_classes), jnp.float32)
        return l2_normalize(features.astype(jnp.float32)) @ l2_normalize(weights, axis=0)


def am_softmax_logits(cosines: jax.Array, labels: jax.Array, s: float, m: float) -> jax.Array:
    """[B, C] cosines, int [B] labels -> [B, C] logits with the margin on the target class."""
    return s * (cosines - m * jax.nn.one_hot(labels, cosines.shape[-1], dtype=cosines.dtype))


def am_softmax_loss(cosines: jax.Array, labels: jax.Array, s: float, m: float,
                    mask: jax.Array | None = None) -> jax.Array:
    """Mean cross entropy of the AM-softmax logits over the samples where `mask` [B] is true."""
    losses = optax.softmax_cross_entropy_with_integer_labels(
        am_softmax_logits(cosines.astype(jnp.float32), labels, s, m), labels)
    if mask is None:
        return losses.mean()
    mask = mask.astype(jnp.float32)
    return (losses * mask).sum() / jnp.maximum(mask.sum(), 1.0)
