"""VGG-16 trunk: torchvision's parameter count, width scaling, output shapes, bfloat16 compute."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models.patch.vgg import VGG16, conv_names

# sum(p.numel() for p in torchvision.models.vgg16().features.parameters())
TORCHVISION_VGG16_FEATURES_PARAMS = 14_714_688


def _abstract_params(model, batch=2, size=32):
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    return jax.eval_shape(model.init, jax.random.key(0), images)['params']


def _count(params) -> int:
    return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params))


def _he_normal(rng):
    """ShapeDtypeStruct -> random array: He-normal kernels, small biases (compiling model.init
    costs several seconds on a CPU)."""
    def sample(leaf):
        std = np.sqrt(2.0 / math.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 0.05
        return (rng.standard_normal(leaf.shape) * std).astype(leaf.dtype)
    return sample


def test_parameter_count_matches_torchvision():
    params = _abstract_params(VGG16())
    assert list(params) == conv_names()
    assert _count(params) == TORCHVISION_VGG16_FEATURES_PARAMS
    assert params['conv1_1']['kernel'].shape == (3, 3, 3, 64)
    assert params['conv5_3']['kernel'].shape == (3, 3, 512, 512)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(params))


def test_width_scales_channels():
    full, quarter = _abstract_params(VGG16()), _abstract_params(VGG16(width=0.25))
    for name in conv_names():
        kh, kw, c_in, c_out = full[name]['kernel'].shape
        expected_in = 3 if name == 'conv1_1' else c_in // 4
        assert quarter[name]['kernel'].shape == (kh, kw, expected_in, c_out // 4)
        assert quarter[name]['bias'].shape == (c_out // 4,)


@pytest.mark.parametrize('width, embed_dim, dim', [(0.25, 0, 128), (0.125, 0, 64), (0.125, 24, 24),
                                                   (1.0, 0, 512), (1.0, 16, 16)])
def test_output_shape(width, embed_dim, dim):
    model = VGG16(width=width, embed_dim=embed_dim)
    images = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.uint8)
    variables = jax.eval_shape(model.init, jax.random.key(0), images)
    features = jax.eval_shape(model.apply, variables, images)
    assert features.shape == (3, dim)
    assert features.dtype == jnp.float32
    assert ('embedding' in variables['params']) == bool(embed_dim)


def test_bfloat16_compute_keeps_float32_params_and_output():
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)
    f32 = VGG16(width=0.125, embed_dim=16)
    bf16 = VGG16(width=0.125, embed_dim=16, dtype=jnp.bfloat16)
    abstract = _abstract_params(bf16)
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(abstract))
    params = jax.tree.map(_he_normal(np.random.default_rng(1)), abstract)
    reference = np.asarray(jax.jit(f32.apply)({'params': params}, images))
    features = jax.jit(bf16.apply)({'params': params}, images)
    assert features.dtype == jnp.float32
    assert np.isfinite(reference).all() and np.abs(reference).max() > 0
    error = np.abs(np.asarray(features) - reference).max() / np.abs(reference).max()
    assert error < 0.05, error


def test_initialization_is_torchvisions_kaiming_fan_out():
    """Each kernel ~ N(0, 2 / (9 * C_out)) (torch.nn.init.kaiming_normal_, mode='fan_out',
    nonlinearity='relu'), biases zero: checked on the sample's std (a chi-square bound) and mean,
    not Flax's LeCun default (std sqrt(1 / (9 * C_in)))."""
    model = VGG16(width=0.25)
    params = jax.jit(model.init)(jax.random.key(3), jnp.zeros((1, 32, 32, 3), jnp.uint8))['params']
    for name in conv_names():
        kernel = np.asarray(params[name]['kernel'], np.float64)
        kh, kw, c_in, c_out = kernel.shape
        expected = math.sqrt(2.0 / (kh * kw * c_out))
        lecun = math.sqrt(1.0 / (kh * kw * c_in))
        n = kernel.size
        assert abs(kernel.std() / expected - 1) < 4 / math.sqrt(2 * n), (name, kernel.std(), expected)
        if abs(lecun / expected - 1) > 8 / math.sqrt(2 * n):  # the two inits are told apart
            assert abs(kernel.std() / lecun - 1) > 4 / math.sqrt(2 * n), name
        assert abs(kernel.mean()) < 4 * expected / math.sqrt(n), name
        np.testing.assert_array_equal(params[name]['bias'], 0)
