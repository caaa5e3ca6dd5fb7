"""The branches taken only on a GPU or TPU, traced on CPU under the real batching.

CI has no accelerator, so each such branch is reached here by making `jax.default_backend` report
'gpu' or 'tpu' (and, for cuDNN, stubbing its version and compute-capability checks as on an H100)
and tracing (`jax.make_jaxpr`, nothing compiled) the gradient of the real train steps at the
default batch sizes. A branch that fails to trace fails here instead of at a user's first step.
"""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax._src.cudnn import fused_attention_stablehlo

from pathjax.data import graphs
from pathjax.models import compute_dtype
from pathjax.models.slide import blocked_attention
from pathjax.models.patch.feature_net import create_feature_net
from pathjax.models.slide.factory import create_slide_model
from pathjax.train import feature_learning, slide_training
from pathjax.runtime.train_state import TrainState
from pathjax.train.xla_options import patch_network_options
from tests.conftest import make_config

H100 = (9, 0)


@pytest.fixture
def backend(monkeypatch):
    """pretend(platform): jax.default_backend() reports `platform`; for 'gpu', cuDNN 9.8 on
    compute capability 9.0."""
    def pretend(platform: str) -> None:
        monkeypatch.setattr(jax, 'default_backend', lambda: platform)
        if platform == 'gpu':
            monkeypatch.setattr(fused_attention_stablehlo, 'check_cudnn_version', lambda: 90800)
            monkeypatch.setattr(fused_attention_stablehlo, 'check_compute_capability',
                                lambda wanted: tuple(map(int, wanted.split('.'))) <= H100)
            monkeypatch.setattr(fused_attention_stablehlo, 'is_cuda_compute_capability_equal',
                                lambda wanted: False)
    return pretend


def primitive_names(jaxpr) -> set[str]:
    """Every primitive in a closed jaxpr, sub-jaxprs (loops, custom VJPs, vmaps) included."""
    names = set()
    for eqn in jaxpr.jaxpr.eqns:
        names.add(eqn.primitive.name)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            names |= primitive_names(jax.extend.core.ClosedJaxpr(sub, ()))
    return names


def slide_batch(config, nodes: int, feature_dim: int = 512):
    """A batch of `train.batch_slides` slides padded to `nodes` (as ShapeDtypeStructs)."""
    count = config.train.batch_slides
    edges = graphs.edge_budget(nodes, config.graph.k)
    leaf = jax.ShapeDtypeStruct
    graph = jax.tree.map(lambda x: leaf((count,) + x.shape[1:], x.dtype), graphs.stack_graphs([
        graphs.pad_graph(graphs.slide_graph(np.zeros((1, feature_dim), np.float32),
                                            np.zeros((1, 2), np.int32), np.zeros(0, np.int32),
                                            np.zeros(0, np.int32)), nodes, edges)]))
    return {'graph': graph, 'label': leaf((count,), jnp.int32), 'mask': leaf((count,), bool)}


def step_primitives(model, step, params_like, batch) -> set[str]:
    """Primitives of a train step `(state, batch, rng) -> (state, metrics)` traced on abstract
    parameters (AdamW state) and batch."""
    params = jax.eval_shape(params_like)

    def train_step(params, batch, rng):
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-4))
        return step(state, batch, rng)

    return primitive_names(jax.make_jaxpr(train_step)(params, batch, jax.random.key(0)))


def slide_step_primitives(config, nodes: int) -> set[str]:
    """Primitives of the slide stage's train step at `train.batch_slides` x `nodes`."""
    model = create_slide_model(config, len(config.data.classes))
    batch = slide_batch(config, nodes)
    example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch['graph'])
    step = slide_training.make_train_step(model, np.ones(2, np.float32))
    return step_primitives(model, step, lambda: model.init(jax.random.key(0), example,
                                                           True, None)['params'], batch)


@pytest.mark.parametrize('dtype', ['auto', 'bfloat16'])
def test_slide_step_on_gpu_uses_cudnn_attention_over_the_slide_batch(backend, dtype):
    """The default config on a GPU: bfloat16, dense attention through cuDNN under the vmap over
    8 slides of 8,192 nodes (the batching of the call failed with a TypeError before query
    lengths were passed)."""
    backend('gpu')
    config = make_config('default', dtype=dtype)
    assert compute_dtype.compute_dtype(config) == jnp.bfloat16
    names = slide_step_primitives(config, config.graph.max_patches)
    assert any('cudnn' in name or 'dot_product_attention' in name for name in names), names
    assert 'while' not in names  # no blocked-attention loop: cuDNN took it


@pytest.mark.parametrize('platform,dtype', [('gpu', 'float32'), ('tpu', 'auto')])
def test_blocked_attention_on_accelerators(backend, platform, dtype):
    """float32 on a GPU (no cuDNN kernel for it) and a TPU: blocked attention with the large
    tiles, the slides batched (not one at a time as on CPU)."""
    backend(platform)
    config = make_config('default', dtype=dtype)
    names = slide_step_primitives(config, 8192)
    assert not any('cudnn' in name for name in names)
    assert 'while' in names and 'custom_vmap_call' not in names


def test_accelerator_tiles_compute_the_same_attention():
    """The accelerator path (batched slides, large tiles) run on CPU against the CPU path."""
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.normal(size=(3, 2048, 4, 32)), jnp.float32)
                         for _ in range(3))
    valid = jnp.asarray([2048, 1500, 3], jnp.int32)

    def run(blocks):
        def attend(q, k, v, n):
            return blocked_attention.blocked_attention(q, k, v, n, blocks)
        return np.asarray(jax.jit(jax.vmap(attend))(query, key, value, valid))

    cpu, accelerator = run(blocked_attention.CPU_BLOCKS), run(blocked_attention.ACCELERATOR_BLOCKS)
    for slide, count in enumerate(np.asarray(valid)):
        np.testing.assert_allclose(accelerator[slide, :count], cpu[slide, :count], rtol=1e-5,
                                   atol=1e-5)


def test_feature_step_on_gpu_traces_in_bfloat16(backend):
    """The feature network's train step on a GPU at the default batch (32 patches of 512 px,
    D4 + HED augmentation): bfloat16 convolutions, float32 parameters and loss, no CPU-only
    compiler option."""
    backend('gpu')
    config = make_config('default')
    model = create_feature_net(config)
    size, count = config.tile.patch_size, config.learn.batch_size
    batch = {'image': jax.ShapeDtypeStruct((count, size, size, 3), jnp.uint8),
             'label': jax.ShapeDtypeStruct((count,), jnp.int32)}
    step = feature_learning.make_train_step(model, config.am_softmax.s, config.am_softmax.m,
                                            'd4+hed', config.learn.hed_sigma)
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3),
                                                                            jnp.uint8))['params'])

    def train_step(params, batch, rng):
        state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.adamw(1e-4))
        return step(state, batch, rng)

    jaxpr = jax.make_jaxpr(train_step)(params, batch, jax.random.key(0))
    convolutions = [eqn for eqn in _all_eqns(jaxpr.jaxpr) if eqn.primitive.name == 'conv_general_dilated']
    assert len(convolutions) == 3 * 13 - 1  # forward, weight and input gradients (not of the image)
    assert all(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in convolutions)
    new_state, metrics = jax.eval_shape(train_step, params, batch, jax.random.key(0))
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new_state.params))
    assert metrics['loss'].dtype == jnp.float32
    assert patch_network_options.__wrapped__() == {}


def _all_eqns(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _all_eqns(sub)


def test_vit_encoder_on_gpu_uses_cudnn_attention_in_bfloat16(backend):
    """A ViT preset as the feature network on a GPU (UNI's shape): extraction at the default
    batch (64 patches of 224 px) and a fine-tuning train step (32) trace with cuDNN's fused
    attention, bfloat16 matrix products, float32 parameters and loss."""
    backend('gpu')
    config = make_config('default', **{'feature_net.backbone': 'vit_large_patch16_224'})
    assert config.tile.patch_size == 224 and compute_dtype.compute_dtype(config) == jnp.bfloat16
    model = create_feature_net(config)
    size = config.tile.patch_size
    params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3),
                                                                            jnp.uint8))['params'])
    images = jax.ShapeDtypeStruct((config.extract.batch_size, size, size, 3), jnp.uint8)
    extract = jax.make_jaxpr(lambda p, x: model.apply({'params': p}, x,
                                                      method=type(model).features))(params, images)
    names = primitive_names(extract)
    assert any('cudnn' in name or 'dot_product_attention' in name for name in names), names
    products = [e for e in _all_eqns(extract.jaxpr) if e.primitive.name == 'dot_general']
    assert products and all(e.invars[0].aval.dtype == jnp.bfloat16 for e in products)
    assert jax.eval_shape(lambda p, x: model.apply({'params': p}, x, method=type(model).features),
                          params, images).dtype == jnp.float32
    batch = {'image': jax.ShapeDtypeStruct((config.learn.batch_size, size, size, 3), jnp.uint8),
             'label': jax.ShapeDtypeStruct((config.learn.batch_size,), jnp.int32)}
    step = feature_learning.make_train_step(model, config.am_softmax.s, config.am_softmax.m,
                                            config.learn.augment, config.learn.hed_sigma)
    names = step_primitives(model, step, lambda: params, batch)
    assert any('cudnn' in name or 'dot_product_attention' in name for name in names), names


def test_padded_vit_attention_equals_attention_on_the_tokens_alone():
    """The cuDNN path's padding (197 tokens -> 256, padded keys masked by length), run with
    XLA's kernel on CPU, against attention over the 197 tokens."""
    from pathjax.models.patch.vit import padded_attention
    rng = np.random.default_rng(0)
    query, key, value = (jnp.asarray(rng.normal(size=(2, 197, 4, 16)), jnp.float32)
                         for _ in range(3))
    expected = jax.nn.dot_product_attention(query, key, value, implementation='xla')
    padded = padded_attention(query, key, value, implementation='xla')
    assert padded.shape == expected.shape
    np.testing.assert_allclose(np.asarray(padded), np.asarray(expected), rtol=1e-5, atol=1e-5)


def largest_intermediate(jaxpr) -> int:
    """The element count of the largest value a closed jaxpr (sub-jaxprs included) makes."""
    largest = 0
    for eqn in jaxpr.jaxpr.eqns:
        for var in eqn.outvars:
            largest = max(largest, int(np.prod(getattr(var.aval, 'shape', ()))))
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            largest = max(largest, largest_intermediate(jax.extend.core.ClosedJaxpr(sub, ())))
    return largest


@pytest.mark.parametrize('model', ['abmil', 'transmil', 'clam_sb', 'mean'])
@pytest.mark.parametrize('platform', ['cpu', 'gpu'])
def test_every_slide_model_trains_at_the_default_batch_without_n_squared_arrays(
        backend, model, platform):
    """Each baseline's train step (8 slides of 8,192 nodes, bfloat16 on the GPU) traces, and no
    value in it holds N x N elements for a slide (the graph transformer's attention: above)."""
    backend(platform)
    config = make_config('default', **{'slide_net.model': model})
    nodes = config.graph.max_patches
    model_fn = create_slide_model(config, len(config.data.classes))
    batch = slide_batch(config, nodes)
    example = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch['graph'])
    step = slide_training.make_train_step(model_fn, np.ones(2, np.float32),
                                          config.slide_net.bag_weight)
    params = jax.eval_shape(lambda: model_fn.init(jax.random.key(0), example, True, None))

    def train_step(params, batch, rng):
        state = TrainState.create(apply_fn=model_fn.apply, params=params['params'],
                                  tx=optax.adamw(1e-4))
        return step(state, batch, rng)

    jaxpr = jax.make_jaxpr(train_step)(params, batch, jax.random.key(0))
    assert largest_intermediate(jaxpr) < nodes * nodes
