"""Checkpoints: the latest for resuming, the best by a validation metric, and the choice between
them with its fallback."""

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from pathjax.runtime.checkpoint import KEEP_LATEST, Checkpoints


def state_of(value: float) -> dict:
    return {'params': {'w': jnp.full((3,), value, jnp.float32)},
            'opt_state': {'mu': jnp.full((3,), -value, jnp.float32)}}


def abstract() -> dict:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state_of(0.0))


def abstract_params() -> dict:
    return abstract()['params']


def test_latest_best_and_the_choice_between_them(tmp_path):
    scores = [0.5, 0.8, 0.6, None]  # epoch 4 has no validation score
    with Checkpoints(tmp_path, best_metric='val') as checkpoints:
        for epoch, score in enumerate(scores, 1):
            checkpoints.save(epoch * 10, state_of(epoch), {'epoch': epoch, 'val': score})
    with Checkpoints(tmp_path, best_metric='val') as checkpoints:  # a fresh process's view
        assert checkpoints.latest_step() == 40 and checkpoints.best_step() == 20
        assert checkpoints.best_value() == 0.8
        latest, latest_meta = checkpoints.restore_params(abstract_params(), 'latest')
        best, best_meta = checkpoints.restore_params(abstract_params(), 'best')
        state, _ = checkpoints.restore(abstract())  # the whole state, to resume
    np.testing.assert_array_equal(latest['w'], 4.0)  # the parameters alone
    np.testing.assert_array_equal(best['w'], 2.0)
    np.testing.assert_array_equal(state['opt_state']['mu'], -4.0)
    assert latest_meta == {'checkpoint': 'latest', 'epoch': 4, 'val': None}
    assert best_meta == {'checkpoint': 'best', 'epoch': 2, 'val': 0.8}
    assert len(list((tmp_path / 'latest').iterdir())) == KEEP_LATEST


def test_best_falls_back_to_the_latest_without_scores(tmp_path):
    with Checkpoints(tmp_path, best_metric='val') as checkpoints:
        checkpoints.save(1, state_of(1.0), {'epoch': 1, 'val': None})
        assert checkpoints.best_step() is None
        params, metadata = checkpoints.restore_params(abstract_params(), 'best')
    np.testing.assert_array_equal(params['w'], 1.0)
    assert metadata['checkpoint'] == 'latest'


def test_a_kill_between_the_two_writes_of_a_new_best_keeps_it(tmp_path, monkeypatch):
    """Epoch 2 is a new best and the process dies after the first of its two checkpoint writes.
    The resumed run (which redoes what the latest checkpoint does not hold) ends with epoch 2 as
    the best, not epoch 3 (a worse score that beat the stale best of epoch 1)."""
    with Checkpoints(tmp_path, best_metric='val') as checkpoints:
        checkpoints.save(10, state_of(1), {'epoch': 1, 'val': 0.5})
    writes, original = [], ocp.CheckpointManager.save

    def dies_at_the_second_write(self, *args, **kwargs):
        writes.append(self.directory)
        if len(writes) == 2:
            raise KeyboardInterrupt('killed')
        return original(self, *args, **kwargs)

    monkeypatch.setattr(ocp.CheckpointManager, 'save', dies_at_the_second_write)
    with pytest.raises(KeyboardInterrupt):
        with Checkpoints(tmp_path, best_metric='val') as checkpoints:
            checkpoints.save(20, state_of(2), {'epoch': 2, 'val': 0.9})
    monkeypatch.setattr(ocp.CheckpointManager, 'save', original)
    with Checkpoints(tmp_path, best_metric='val') as checkpoints:  # the resumed run
        if checkpoints.latest_step() == 10:
            checkpoints.save(20, state_of(2), {'epoch': 2, 'val': 0.9})
        checkpoints.save(30, state_of(3), {'epoch': 3, 'val': 0.6})
        assert checkpoints.best_step() == 20 and checkpoints.best_value() == 0.9
        best, _ = checkpoints.restore(abstract(), best=True)
    np.testing.assert_array_equal(best['params']['w'], 2.0)
