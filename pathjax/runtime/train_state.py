"""The train state of both learning stages (Flax's TrainState: step, params, optimizer state),
created on the mesh, or described abstractly to restore a checkpoint into."""

from typing import Callable

import jax
import optax
from flax.training.train_state import TrainState


def make_state_creator(apply_fn: Callable, tx: optax.GradientTransformation,
                       placement: jax.sharding.Sharding) -> Callable[[dict], TrainState]:
    """A jitted params -> TrainState whose arrays are placed with `placement`."""
    return jax.jit(lambda params: TrainState.create(apply_fn=apply_fn, params=params, tx=tx),
                   out_shardings=placement)


def abstract_state(apply_fn: Callable, init_params: Callable[[], dict],
                   tx: optax.GradientTransformation,
                   placement: jax.sharding.Sharding) -> TrainState:
    """The state's shapes and dtypes, placed with `placement`, traced from init_params without
    running the network: the target a checkpoint restores into."""
    shapes = jax.eval_shape(lambda: TrainState.create(apply_fn=apply_fn, params=init_params(), tx=tx))
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=placement), shapes)
