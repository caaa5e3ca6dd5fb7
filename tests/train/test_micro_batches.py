"""Micro-batches: the same update and features as the whole batch, in a fraction of the memory."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from pathjax.errors import UsageError
from pathjax.models.patch.feature_net import FeatureNet
from pathjax.train import micro_batches
from pathjax.runtime import sharding
from pathjax.train.feature_learning import (TrainState, compile_train_step, make_eval_step,
                                            make_train_parts, make_train_step)


def test_split_takes_strided_rows_and_merge_restores_the_order():
    rows = np.arange(12 * 2).reshape(12, 2)
    chunks = np.asarray(micro_batches.split(jnp.asarray(rows), 3))  # [3, 4, 2]
    for i in range(3):
        np.testing.assert_array_equal(chunks[i], rows[i::3])
    np.testing.assert_array_equal(np.asarray(micro_batches.merge(jnp.asarray(chunks))), rows)


def test_count_per_backend_and_a_clear_error(monkeypatch):
    train, extract = (micro_batches.patch_buffer_bytes(512, 1.0, training) for training in (1, 0))
    assert extract == 512 * 512 * 576 * 4  # conv1_2's 3 x 3 x 64 patches of one 512-px image
    count = micro_batches.micro_batch_count
    monkeypatch.setattr(jax, 'local_device_count', lambda: 1)
    assert count(32, 1, 0, 'learn.batch_size', train) == 8  # 4 images per pass
    assert count(64, 1, 0, 'extract.batch_size', extract) == 8  # 8 images per pass
    assert count(30, 1, 0, 'learn.batch_size', train) == 10  # 3 per pass (4 does not divide 30)
    small = micro_batches.patch_buffer_bytes(64, 0.125, True)  # the CPU test configs
    assert count(32, 1, 0, 'learn.batch_size', small) == 1
    assert count(32, 1, 16, 'learn.batch_size', small) == 2
    with pytest.raises(UsageError, match=r'micro_batch=5 .* \(learn.batch_size=32 over 1 '):
        count(32, 1, 5, 'learn.batch_size', small)
    # The process's CPU devices run side by side: each gets its share of the buffer budget.
    monkeypatch.setattr(jax, 'local_device_count', lambda: 2)
    assert count(32, 2, 0, 'learn.batch_size', train) == 8  # 16 per device, 2 per pass
    assert count(64, 2, 0, 'extract.batch_size', extract) == 8  # 32 per device, 4 per pass
    monkeypatch.setattr(jax, 'local_device_count', lambda: 8)
    assert count(64, 8, 0, 'extract.batch_size', extract) == 8  # 8 per device, 1 per pass
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
    assert count(32, 1, 0, 'learn.batch_size', train) == 1


def tiny_model_and_batch(count=16):
    model = FeatureNet(num_classes=2, width=0.125, embed_dim=16)
    rng = np.random.default_rng(0)
    batch = {'image': rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8),
             'label': rng.integers(0, 2, count).astype(np.int32),
             'mask': np.arange(count) < count - 3}
    params = jax.device_get(jax.jit(model.init)(jax.random.key(0), batch['image'][:1])['params'])
    return model, batch, params


@pytest.mark.parametrize('devices', [1, 8])
def test_accumulated_step_equals_the_whole_batch_step(devices):
    """4 micro-batches as separate calls (with the D4 + HED augmentation drawn for the whole
    batch) give the whole batch's loss, accuracy and update; sharded over 8 devices too."""
    model, batch, params = tiny_model_and_batch(32)  # 4 rows per device, 1 per call
    mesh = sharding.make_mesh(devices)
    replicated, batched = sharding.replicated(mesh), sharding.batch_sharded(mesh)
    train = {'image': batch['image'], 'label': batch['label']}
    results = []
    for count in (1, 4):
        step = compile_train_step(model, 30.0, 0.35, 'd4+hed', 0.05, count, replicated,
                                  batched)
        assert isinstance(step, micro_batches.AccumulatedStep) == (count > 1)
        state = jax.device_put(TrainState.create(apply_fn=model.apply, params=params,
                                                 tx=optax.sgd(0.1)), replicated)
        state, metrics = step(state, train, jax.random.key(1))
        results.append(jax.device_get((state.params, metrics)))
    (whole, whole_metrics), (micro, micro_metrics) = results
    np.testing.assert_allclose(micro_metrics['accuracy'], whole_metrics['accuracy'], rtol=1e-6)
    np.testing.assert_allclose(micro_metrics['loss'], whole_metrics['loss'], rtol=1e-5)
    for a, b in zip(jax.tree.leaves(micro), jax.tree.leaves(whole)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
    moved = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(whole),
                                                             jax.tree.leaves(params)))
    assert moved > 1e-3  # the step changed the parameters, so the comparison means something


def test_mapped_evaluation_and_features_equal_the_whole_batch():
    model, batch, params = tiny_model_and_batch()
    whole, micro = (jax.jit(make_eval_step(model, count))(params, batch) for count in (1, 4))
    assert [int(x) for x in whole] == [int(x) for x in micro]
    features = lambda p, images: model.apply({'params': p}, images, method=FeatureNet.features)
    np.testing.assert_allclose(micro_batches.mapped(features, 4)(params, batch['image']),
                               features(params, batch['image']), rtol=1e-5, atol=1e-6)


def test_micro_batches_bound_the_train_steps_memory():
    """VGG-16 at full width, 256 px, batch 32: the temporaries of each compiled call of an
    8-pass step (4 images a call) are a fraction of the whole batch's (the activations of 4
    images, not 32)."""
    model = FeatureNet(num_classes=2)
    images = jax.ShapeDtypeStruct((32, 256, 256, 3), jnp.uint8)
    labels = jax.ShapeDtypeStruct((32,), jnp.int32)
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 64, 64, 3), jnp.uint8))
    state = jax.eval_shape(lambda p: TrainState.create(apply_fn=model.apply, params=p,
                                                       tx=optax.adam(1e-4)), params['params'])
    batch, key = {'image': images, 'label': labels}, jax.random.key(0)

    def temporaries(function, *args):
        return function.lower(*args).compile().memory_analysis().temp_size_in_bytes

    whole = temporaries(jax.jit(make_train_step(model, 30.0, 0.35, 'd4+hed', 0.05)), state, batch,
                        key)
    mesh = sharding.make_mesh(1)
    step = compile_train_step(model, 30.0, 0.35, 'd4+hed', 0.05, 8, sharding.replicated(mesh),
                              sharding.batch_sharded(mesh))
    chunks = jax.eval_shape(step.split_inputs, batch, key)
    assert len(chunks) == 8 and chunks[0]['image'].shape == (4, 256, 256, 3)
    total, metrics = jax.eval_shape(step.first, state.params, chunks[0])
    calls = [temporaries(step.split_inputs, batch, key),
             temporaries(step.first, state.params, chunks[0]),
             temporaries(step.add, total, state.params, chunks[1]),
             temporaries(step.update, state, total, [metrics] * 8)]
    assert max(calls) < whole / 4, (calls, whole)


def test_accumulated_calls_are_chained_through_the_gradient_sum():
    """Each micro-batch's call takes the running sum donated, so the calls run in order and one
    micro-batch's buffers are alive at a time."""
    model, batch, params = tiny_model_and_batch()
    mesh = sharding.make_mesh(1)
    prepare, gradient = make_train_parts(model, 30.0, 0.35, 'd4', 0.0)
    step = micro_batches.AccumulatedStep(prepare, gradient, 4, sharding.replicated(mesh),
                                         sharding.batch_sharded(mesh))
    state = TrainState.create(apply_fn=model.apply, params=params, tx=optax.sgd(0.1))
    train = {'image': batch['image'], 'label': batch['label']}
    chunks = step.split_inputs(train, jax.random.key(1))
    total, _ = step.first(state.params, chunks[0])
    summed, _ = step.add(total, state.params, chunks[1])
    assert all(leaf.is_deleted() for leaf in jax.tree.leaves(total))  # donated to the next call
    expected = jax.tree.map(jnp.add, gradient(state.params, chunks[0])[0],
                            gradient(state.params, chunks[1])[0])
    for a, b in zip(jax.tree.leaves(summed), jax.tree.leaves(expected)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
