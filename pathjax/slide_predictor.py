"""The slide model as a predictor: class probabilities, pooling weights and per-patch
contributions of slides read from their graph files, on the devices of the mesh. Used by the
training stage (validation), the evaluation stage and prediction on new slides; it knows nothing
of training (no optimizer: a checkpoint's parameters are read alone).

A patch's contribution to a class is gradient x input at the pooling's input,
sum_d h_id * d logit_c / d h_id: a first-order decomposition of the class's logit over the
slide's patches (positive: the patch pushes towards the class). With gated-attention pooling the
pooling weights are the other per-patch score.
"""

import pathlib

import jax
import jax.numpy as jnp
import jraph
import numpy as np

from pathjax.data import graphs
from pathjax.data.graph_batches import GraphBatches, Prefetch
from pathjax.data.slide_sets import SlideSet, node_rows
from pathjax.errors import StageError
from pathjax.models.slide.factory import create_slide_model
from pathjax.runtime import sharding
from pathjax.runtime.checkpoint import Checkpoints


def checkpoint_dir(workdir) -> pathlib.Path:
    """Where the slide model's checkpoints live (written by the train_slide stage)."""
    return pathlib.Path(workdir) / 'slide_net'


def make_predict_step(model):
    """(params, batch) -> (probabilities [B, C], per-patch pooling weights [B, N])."""

    def predict_step(params, batch):
        logits, node_weights = model.apply({'params': params}, batch['graph'], True, None)
        return jax.nn.softmax(logits), node_weights

    return predict_step


def make_contribution_fn(model):
    """(params, graph batch [B, ...], classes int [B]) -> contributions [B, N] (to be jitted)."""

    def contributions(params, graph, classes):
        (_, _), captured = model.apply({'params': params}, graph, True, None,
                                       mutable=['intermediates'])
        nodes = captured['intermediates']['pooling_input'][0]  # [B, N, D]

        def logit_sum(perturbation):
            logits, _ = model.apply({'params': params,
                                     'perturbations': {'pooling_input': perturbation}}, graph, True,
                                    None)
            return jnp.take_along_axis(logits, classes[:, None], axis=1).sum()

        gradients = jax.grad(logit_sum)(jnp.zeros_like(nodes))
        return jnp.sum(nodes * gradients, axis=-1)

    return contributions


class SlidePredictor:
    """The slide model of `config`, its mesh and compiled prediction steps, for patch features of
    size `feature_dim`."""

    def __init__(self, config, feature_dim: int):
        self.config, self.feature_dim = config, feature_dim
        self.classes = tuple(config.data.classes)
        self.mesh = sharding.make_mesh(config.mesh.data)
        self.batch_size = config.train.batch_slides
        self.local_batch = sharding.local_batch_size(self.batch_size, self.mesh,
                                                     'train.batch_slides')
        self.model = create_slide_model(config, len(self.classes))
        self.replicated = sharding.replicated(self.mesh)
        self.batched = sharding.batch_sharded(self.mesh)
        self.predict_step = sharding.under_mesh(jax.jit(
            make_predict_step(self.model), in_shardings=(self.replicated, self.batched),
            out_shardings=(self.replicated, self.replicated)), self.mesh)
        self.contribution_step = sharding.under_mesh(jax.jit(
            make_contribution_fn(self.model),
            in_shardings=(self.replicated, self.batched, self.batched),
            out_shardings=self.replicated), self.mesh)

    def example_graph(self) -> jraph.GraphsTuple:
        """A batch [1, ...] of one one-node slide, for shapes at initialisation."""
        empty = graphs.slide_graph(np.zeros((1, self.feature_dim), np.float32),
                                   np.zeros((1, 2), np.int32), np.zeros(0, np.int32),
                                   np.zeros(0, np.int32))
        nodes = graphs.bucket_size(1)
        return graphs.stack_graphs([graphs.pad_graph(
            empty, nodes, graphs.edge_budget(nodes, self.config.graph.k))])

    def initial_params(self):
        return jax.jit(self.model.init, static_argnums=(2, 3))(
            jax.random.key(self.config.seed), self.example_graph(), True, None)['params']

    def abstract_params(self):
        """The parameters' shapes and dtypes, replicated over the mesh (nothing computed)."""
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                           sharding=self.replicated),
                            jax.eval_shape(self.initial_params))

    def restore(self, workdir, which: str) -> tuple[dict, dict]:
        """(parameters, checkpoint metadata with 'checkpoint') of the train_slide stage's best
        or latest checkpoint."""
        with Checkpoints(checkpoint_dir(workdir), best_metric='val_score') as checkpoints:
            if checkpoints.latest_step() is None:
                raise StageError(f'no trained slide model in {checkpoint_dir(workdir)}; run '
                                 'train_slide first')
            return checkpoints.restore_params(self.abstract_params(), which)

    def reader(self, slides: SlideSet, **per_slide: np.ndarray) -> GraphBatches:
        """Reads this process's rows of global batches of the slides, with their labels and
        each per_slide array [S]."""
        start = jax.process_index() * self.local_batch
        return GraphBatches(slides.paths, slides.num_nodes, slides.num_edges,
                            {'label': slides.labels, **per_slide}, batch_size=self.batch_size,
                            k=self.config.graph.k, feature_dim=self.feature_dim,
                            rows=slice(start, start + self.local_batch),
                            workers=max(1, self.config.workers))

    def device_batch(self, batch: dict) -> dict:
        """This process's rows of a global batch, assembled into arrays sharded over `data`."""
        return sharding.global_batch(batch, self.mesh)

    def device_batches(self, slides: SlideSet, batches, **per_slide: np.ndarray) -> Prefetch:
        """(indices [b], device batch) for each batch of slide indices, read and placed on the
        devices ahead of the consumer (use it in a `with` block)."""
        return self.reader(slides, **per_slide).prefetch(batches, self.device_batch)

    def in_order(self, slides: SlideSet):
        """The slides' indices in order, in batches."""
        return (np.arange(start, min(start + self.batch_size, len(slides)))
                for start in range(0, len(slides), self.batch_size))

    def predict(self, params, slides: SlideSet) -> tuple[np.ndarray, list[np.ndarray]]:
        """(probabilities [S, C], per-slide pooling weights [n_s]) in the slides' order."""
        probabilities, node_weights = [], []
        with self.device_batches(slides, self.in_order(slides)) as batches:
            for indices, batch in batches:
                probs, weights = jax.device_get(self.predict_step(params, batch))
                probabilities += list(probs[:len(indices)])
                node_weights += node_rows(slides, indices, weights)
        return np.asarray(probabilities).reshape(-1, len(self.classes)), node_weights

    def contributions(self, params, slides: SlideSet, classes: np.ndarray) -> list[np.ndarray]:
        """Each slide's per-patch contributions [n_s] to the logit of classes [S]."""
        scores = []
        with self.device_batches(slides, self.in_order(slides),
                                 target=classes.astype(np.int32)) as batches:
            for indices, batch in batches:
                values = jax.device_get(self.contribution_step(params, batch['graph'],
                                                               batch['target']))
                scores += node_rows(slides, indices, values)
        return scores
