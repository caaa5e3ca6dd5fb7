"""AM-softmax head and loss vs the formula in numpy; margin, scale invariance, gradients, mask."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models.patch.am_softmax import AMSoftmaxHead, am_softmax_logits, am_softmax_loss

S, M = 30.0, 0.35


def _reference_losses(features, weights, labels, s, m):
    """Per-sample AM-softmax cross entropy, float64: features [B, D], weights [D, C], labels [B]."""
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weights / np.linalg.norm(weights, axis=0, keepdims=True)
    cos = f.astype(np.float64) @ w.astype(np.float64)
    logits = s * cos
    logits[np.arange(len(labels)), labels] -= s * m
    top = logits.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(logits - top).sum(axis=1))
    return log_z - logits[np.arange(len(labels)), labels]


def _problem(seed, batch=6, dim=5, classes=3):
    rng = np.random.default_rng(seed)
    features = rng.standard_normal((batch, dim)).astype(np.float32)
    weights = rng.standard_normal((dim, classes)).astype(np.float32)
    labels = rng.integers(0, classes, batch)
    return features, weights, labels


@jax.jit(static_argnames=('s', 'm'))
def _loss(features, weights, labels, mask=None, *, s=S, m=M):
    head = AMSoftmaxHead(weights.shape[1])
    cosines = head.apply({'params': {'class_weights': weights}}, features)
    return am_softmax_loss(cosines, labels, s, m, mask)


@pytest.mark.parametrize('s, m', [(S, M), (1.0, 0.0), (64.0, 0.5)])
def test_loss_matches_formula(s, m):
    features, weights, labels = _problem(0)
    expected = _reference_losses(features, weights, labels, s, m).mean()
    np.testing.assert_allclose(_loss(features, weights, labels, s=s, m=m), expected, rtol=1e-5)


def test_head_cosines_and_param():
    features, weights, _ = _problem(1)
    head = AMSoftmaxHead(3)
    variables = head.init(jax.random.key(0), features)
    assert variables['params']['class_weights'].shape == (5, 3)
    cosines = np.asarray(head.apply({'params': {'class_weights': weights}}, features))
    f = features / np.linalg.norm(features, axis=1, keepdims=True)
    w = weights / np.linalg.norm(weights, axis=0, keepdims=True)
    np.testing.assert_allclose(cosines, f @ w, atol=1e-6)
    assert np.all(np.abs(cosines) <= 1 + 1e-6)


def test_margin_lowers_only_the_target_logit():
    cosines = np.random.default_rng(2).uniform(-1, 1, (8, 4)).astype(np.float32)
    labels = np.array([0, 1, 2, 3, 3, 2, 1, 0])
    logits = np.asarray(am_softmax_logits(cosines, labels, S, M))
    drop = S * cosines - logits  # [B, C]
    target = np.eye(4, dtype=bool)[labels]
    np.testing.assert_allclose(drop[target], S * M, atol=1e-5)
    np.testing.assert_allclose(drop[~target], 0.0, atol=1e-5)


def test_scale_invariance():
    features, weights, labels = _problem(3)
    loss = _loss(features, weights, labels)
    for a, b in [(1e-3, 1.0), (1.0, 250.0), (17.0, 0.02)]:
        np.testing.assert_allclose(_loss(features * a, weights * b, labels), loss, rtol=1e-5)
    rows = np.random.default_rng(4).uniform(0.1, 10, (len(features), 1)).astype(np.float32)
    np.testing.assert_allclose(_loss(features * rows, weights, labels), loss, rtol=1e-5)


@pytest.mark.parametrize('scale', [1.0, 1e-8, 0.0])
def test_gradients_finite(scale):
    features, weights, labels = _problem(5)
    features = features * np.float32(scale)
    weights = weights.copy()
    weights[:, 0] *= np.float32(scale)  # one class weight at (near) zero norm too
    grads = jax.grad(_loss, argnums=(0, 1))(jnp.asarray(features), jnp.asarray(weights), labels)
    for grad in grads:
        assert np.isfinite(np.asarray(grad)).all()
    if scale == 1.0:
        assert all(np.abs(np.asarray(grad)).max() > 0 for grad in grads)


def test_mask_averages_over_masked_samples_only():
    features, weights, labels = _problem(6, batch=8)
    mask = np.array([1, 0, 1, 1, 0, 0, 1, 0], dtype=bool)
    per_sample = _reference_losses(features, weights, labels, S, M)
    masked = _loss(features, weights, labels, mask)
    np.testing.assert_allclose(masked, per_sample[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(masked, _loss(features[mask], weights, labels[mask]), rtol=1e-5)
    # Whatever sits in the masked-out rows (padding) does not matter.
    padded_features, padded_labels = features.copy(), labels.copy()
    padded_features[~mask] = 1e6
    padded_labels[~mask] = 0
    np.testing.assert_allclose(_loss(padded_features, weights, padded_labels, mask), masked,
                               rtol=1e-5)
    # No sample in the mask: zero, not NaN; float masks work like boolean ones.
    assert float(_loss(features, weights, labels, np.zeros(8, bool))) == 0.0
    np.testing.assert_allclose(_loss(features, weights, labels, mask.astype(np.float32)), masked,
                               rtol=1e-6)
