"""The `train_slide` stage: the graph transformer trained on slide graphs with cross entropy.

Batches of `train.batch_slides` slide graphs (padded to a common power-of-two bucket; a short
batch is filled with masked copies), read from the slides' graph files in a background thread
ahead of the device (`graph_batches`), run through one jitted, data-parallel train step. The
method's stopping rule: training ends when an epoch's training loss reaches `train.loss_target`
or after `train.max_steps` steps. Each epoch ends with the validation AUC (or, with one class in
the validation set, minus its loss) and an Orbax checkpoint; the best one is kept too, and a rerun
resumes from the latest. At the end the chosen checkpoint (`eval.checkpoint`) is evaluated on
every split, which the `evaluate` stage reproduces from the checkpoint alone.
"""

import dataclasses
import itertools
import pathlib

import jax
import jax.numpy as jnp
import jraph
import numpy as np
import optax
from absl import logging

from pathjax import stage_report
from pathjax.cohort import Cohort, SlideRecord
from pathjax.data import graphs
from pathjax.data.features import (GraphSettings, features_network, features_path,
                                   slide_graph)
from pathjax.data.graph_batches import GraphBatches, Prefetch
from pathjax.errors import StageError
from pathjax.evaluate import heatmaps
from pathjax.evaluate.metrics import slide_metrics, to_json_safe
from pathjax.models.slide_transformer import create_slide_model
from pathjax.runtime import sharding, train_state
from pathjax.runtime.checkpoint import Checkpoints
from pathjax.runtime.train_state import TrainState


@dataclasses.dataclass
class SlideSet:
    """The slides of one split that have features, without their features: ids, labels int [S],
    graph files [S] (see `features.slide_graph`), their node and edge counts int [S], the
    level-0 (x, y) coordinates [n_s, 2] of each graph's nodes, and the feature size D (0 when
    empty)."""

    slide_ids: list[str]
    labels: np.ndarray
    paths: list[pathlib.Path]
    num_nodes: np.ndarray
    num_edges: np.ndarray
    coords: list[np.ndarray]
    feature_dim: int

    def __len__(self) -> int:
        return len(self.slide_ids)


def run_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / 'slide_net'


def load_slides(workdir, records: list[SlideRecord], classes: tuple[str, ...],
                settings: GraphSettings) -> SlideSet:
    """The records whose features exist (others are skipped with a warning), their graph files
    built or checked one slide at a time; no features are kept."""
    ids, labels, files = [], [], []
    for record in records:
        if not features_path(workdir, record.slide_id).exists():
            logging.warning('train_slide: slide %s has no features (see the extract report); '
                            'left out', record.slide_id)
            continue
        ids.append(record.slide_id)
        labels.append(classes.index(record.label))
        files.append(slide_graph(workdir, record.slide_id, settings))
    dims = sorted({f.feature_dim for f in files})
    if len(dims) > 1:
        raise StageError(f'train_slide: the slides have features of different sizes {dims}; '
                         'rerun the extract stage')
    return SlideSet(ids, np.asarray(labels, np.int32), [f.path for f in files],
                    np.asarray([f.num_nodes for f in files], np.int64),
                    np.asarray([f.num_edges for f in files], np.int64),
                    [f.coords for f in files], dims[0] if dims else 0)


def node_rows(slides: SlideSet, indices: np.ndarray, values: np.ndarray) -> list[np.ndarray]:
    """Rows [n_s] of per-node values [B, N] for the batch's slides, padding cut off."""
    return [np.asarray(values[row][:slides.num_nodes[i]]) for row, i in enumerate(indices)]


def load_splits(workdir, cohort: Cohort, names, classes: tuple[str, ...],
                settings: GraphSettings) -> dict[str, SlideSet]:
    """{split: SlideSet} of the named splits. The leader builds the slides' missing graph caches
    first; the other processes then read them instead of searching neighbours too."""
    def load():
        return {name: load_slides(workdir, list(cohort.split(name)), classes, settings)
                for name in names}
    splits = load() if sharding.is_leader() else None
    sharding.barrier('pathjax slide graphs')
    splits = splits if splits is not None else load()
    check_one_network(workdir, [i for slides in splits.values() for i in slides.slide_ids])
    return splits


def check_one_network(workdir, slide_ids: list[str]) -> None:
    """Raises StageError when the slides' features came from more than one feature network
    (a retrained network and an extract stage that has not been rerun since)."""
    networks = {}
    for slide_id in slide_ids:
        networks.setdefault(features_network(features_path(workdir, slide_id)), []).append(slide_id)
    if len(networks) > 1:
        groups = '; '.join(f'{len(ids)} slide(s) (e.g. {ids[0]}) by '
                           f'{network or "an unrecorded network"}'
                           for network, ids in networks.items())
        raise StageError(f'train_slide: the features come from {len(networks)} different feature '
                         f'networks ({groups}); rerun the extract stage, which redoes the slides '
                         'made by another network than the current one')


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights [C]: ones, or 'balanced' = n / (C * n_c) over the training slides."""
    if mode == 'none':
        return np.ones(num_classes, np.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
    return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)


def make_train_step(model, weights: np.ndarray):
    """(state, batch, rng) -> (state, {'loss', 'weight'}): class-weighted cross entropy."""
    weights = jnp.asarray(weights)

    def train_step(state: TrainState, batch, rng):
        def loss_fn(params):
            logits, _ = model.apply({'params': params}, batch['graph'], False,
                                    rngs={'dropout': rng})
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
            slide_weights = weights[batch['label']] * batch['mask']
            total = jnp.maximum(slide_weights.sum(), 1e-12)
            return (losses * slide_weights).sum() / total, total

        (loss, total), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), {'loss': loss, 'weight': total}

    return train_step


def make_predict_step(model):
    """(params, batch) -> (probabilities [B, C], per-patch pooling weights [B, N])."""

    def predict_step(params, batch):
        logits, node_weights = model.apply({'params': params}, batch['graph'], True)
        return jax.nn.softmax(logits), node_weights

    return predict_step


def create_optimizer(train) -> optax.GradientTransformation:
    if train.optimizer == 'adam':
        return optax.adam(train.lr)
    return optax.adamw(train.lr, weight_decay=train.weight_decay)


class SlideTrainer:
    """The slide model, mesh and compiled steps of one run."""

    def __init__(self, config, workdir, feature_dim: int):
        self.config, self.workdir = config, pathlib.Path(workdir)
        self.classes = tuple(config.data.classes)
        self.mesh = sharding.make_mesh(config.mesh.data)
        self.batch_size = config.train.batch_slides
        self.local_batch = sharding.local_batch_size(self.batch_size, self.mesh,
                                                     'train.batch_slides')
        self.model = create_slide_model(config, len(self.classes))
        self.tx = create_optimizer(config.train)
        self.feature_dim = feature_dim
        replicated, batched = sharding.replicated(self.mesh), sharding.batch_sharded(self.mesh)
        self.create_state = train_state.make_state_creator(self.model.apply, self.tx, replicated)
        self.predict_step = sharding.under_mesh(jax.jit(
            make_predict_step(self.model), in_shardings=(replicated, batched),
            out_shardings=(replicated, replicated)), self.mesh)
        self.contribution_step = sharding.under_mesh(jax.jit(
            heatmaps.make_contribution_fn(self.model), in_shardings=(replicated, batched, batched),
            out_shardings=replicated), self.mesh)
        self._replicated, self._batched = replicated, batched

    def example_graph(self) -> jraph.GraphsTuple:
        """A batch [1, ...] of one one-node slide, for shapes at initialisation."""
        empty = graphs.slide_graph(np.zeros((1, self.feature_dim), np.float32),
                                   np.zeros((1, 2), np.int32), np.zeros(0, np.int32),
                                   np.zeros(0, np.int32))
        nodes = graphs.bucket_size(1)
        return graphs.stack_graphs([graphs.pad_graph(
            empty, nodes, graphs.edge_budget(nodes, self.config.graph.k))])

    def initial_params(self):
        return jax.jit(self.model.init, static_argnums=2)(
            jax.random.key(self.config.seed), self.example_graph(), True)['params']

    def abstract_state(self) -> TrainState:
        return train_state.abstract_state(self.model.apply, self.initial_params, self.tx,
                                          self._replicated)

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

    def in_training_order(self, slides: SlideSet, first_epoch: int):
        """The batches of slide indices of each epoch from `first_epoch` on: every epoch a
        seeded permutation of the slides."""
        for epoch in itertools.count(first_epoch):
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(slides))
            for start in range(0, len(order), self.batch_size):
                yield order[start:start + self.batch_size]

    def predict(self, params, slides: SlideSet) -> tuple[np.ndarray, list[np.ndarray]]:
        """(probabilities [S, C], per-slide node weights [n_s]) in the slides' order."""
        probabilities, node_weights = [], []
        with self.device_batches(slides, self.in_order(slides)) as batches:
            for indices, batch in batches:
                probs, weights = jax.device_get(self.predict_step(params, batch))
                probabilities += list(probs[:len(indices)])
                node_weights += node_rows(slides, indices, weights)
        return np.asarray(probabilities).reshape(-1, len(self.classes)), node_weights

    def contributions(self, params, slides: SlideSet, classes: np.ndarray) -> list[np.ndarray]:
        """Each slide's per-patch contributions [n_s] to the logit of classes [S] (see
        `heatmaps`)."""
        scores = []
        with self.device_batches(slides, self.in_order(slides),
                                 target=classes.astype(np.int32)) as batches:
            for indices, batch in batches:
                values = jax.device_get(self.contribution_step(params, batch['graph'],
                                                               batch['target']))
                scores += node_rows(slides, indices, values)
        return scores

    def validation(self, params, slides: SlideSet) -> dict:
        """Validation AUC, loss and the score the best checkpoint is chosen by."""
        if not len(slides):
            return {'val_auc': None, 'val_loss': None, 'val_score': None}
        probabilities, _ = self.predict(params, slides)
        picked = probabilities[np.arange(len(slides)), slides.labels]
        loss = float(-np.log(np.maximum(picked, 1e-12)).mean())
        auc = slide_metrics(probabilities, slides.labels, self.classes)['auc']
        auc = float(auc) if np.isfinite(auc) else None
        # AUC steps are at least 1e-4 for up to 100 x 100 slides, so the loss term only breaks ties.
        score = auc - 1e-6 * loss if auc is not None else -loss
        return {'val_auc': auc, 'val_loss': loss, 'val_score': score}

    def finished(self, summary: dict) -> bool:
        """The method's stopping rule under the current config (so raising `train.max_steps`
        extends a finished run): the last epoch's loss reached `loss_target`, or `max_steps`."""
        config = self.config.train
        return bool(summary.get('train_loss', np.inf) <= config.loss_target
                    or summary['step'] >= config.max_steps)

    def fit(self, train: SlideSet, val: SlideSet):
        """Trains until the stopping rule; returns (state, last checkpoint metadata)."""
        config = self.config.train
        if len(train) == 0:
            raise StageError('train_slide: no training slide has features')
        step_fn = sharding.under_mesh(jax.jit(make_train_step(self.model, class_weights(
            train.labels, len(self.classes), config.class_weights)),
            in_shardings=(self._replicated, self._batched, self._replicated),
            out_shardings=(self._replicated, self._replicated), donate_argnums=0), self.mesh)
        with Checkpoints(run_dir(self.workdir), best_metric='val_score') as checkpoints:
            if checkpoints.latest_step() is not None:
                state, summary = checkpoints.restore(self.abstract_state())
                logging.info('train_slide: resuming after epoch %d (step %d)', summary['epoch'],
                             summary['step'])
            else:
                state, summary = self.create_state(self.initial_params()), {'epoch': 0, 'step': 0}
            if not self.finished(summary):
                order = self.in_training_order(train, summary['epoch'])
                with self.device_batches(train, order) as batches:
                    state, summary = self.train_epochs(state, summary, step_fn, batches,
                                                       -(-len(train) // self.batch_size), val,
                                                       checkpoints)
        return state, summary

    def train_epochs(self, state, summary: dict, step_fn, batches: Prefetch, per_epoch: int,
                     val: SlideSet, checkpoints: Checkpoints):
        """Epochs of `per_epoch` device batches until the stopping rule, each followed by the
        validation and a checkpoint; returns (state, last checkpoint metadata)."""
        config = self.config.train
        base_rng = jax.random.key(self.config.seed)
        step = summary['step']  # on the host: reading state.step would wait for the device
        while not self.finished(summary):
            epoch = summary['epoch']
            losses = []  # device scalars, read once at the end of the epoch
            for _ in range(min(per_epoch, config.max_steps - step)):
                _, batch = next(batches)
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
                losses.append((metrics['loss'], metrics['weight']))
                step += 1
            loss, weight = np.asarray(jax.device_get(losses), np.float64).T
            train_loss = float((loss * weight).sum() / max(weight.sum(), 1e-12))
            if not np.isfinite(train_loss):
                raise StageError(f'train_slide: the loss became {train_loss} in epoch '
                                 f'{epoch + 1}; the last good checkpoint is kept in '
                                 f'{run_dir(self.workdir)}')
            summary = {'epoch': epoch + 1, 'step': step, 'train_loss': train_loss,
                       **self.validation(state.params, val)}
            summary['stopped'] = self.finished(summary)
            checkpoints.save(summary['step'], state, summary)
            if summary['epoch'] % config.log_every_epochs == 0 or summary['stopped']:
                logging.info('train_slide: epoch %d, step %d, train loss %.4f, validation '
                             'AUC %s', summary['epoch'], summary['step'], train_loss,
                             summary['val_auc'])
        return state, summary


def restore_params(trainer: SlideTrainer, workdir, which: str):
    """The parameters of the best or latest checkpoint, and its metadata (with which one)."""
    with Checkpoints(run_dir(workdir), best_metric='val_score') as checkpoints:
        if checkpoints.latest_step() is None:
            raise StageError(f'no trained slide model in {run_dir(workdir)}; run train_slide first')
        state, metadata = checkpoints.restore_chosen(trainer.abstract_state(), which)
    return state.params, metadata


def feature_dim(splits: list[SlideSet], stage: str) -> int:
    """The patch feature size D of the loaded slides."""
    for slides in splits:
        if len(slides):
            return slides.feature_dim
    raise StageError(f'{stage}: no slide has features; run the extract stage first')


def run(config, workdir, cohort: Cohort) -> None:
    """The `train_slide` stage; its report holds the final metrics of every split."""
    settings = GraphSettings.from_config(config)
    classes = tuple(config.data.classes)
    splits = load_splits(workdir, cohort, ('train', 'val', 'test'), classes, settings)
    logging.info('train_slide: %s slides with features', ', '.join(
        f'{len(s)} {name}' for name, s in splits.items()))
    trainer = SlideTrainer(config, workdir, feature_dim(list(splits.values()), 'train_slide'))
    _, summary = trainer.fit(splits['train'], splits['val'])
    params, used = restore_params(trainer, workdir, config.eval.checkpoint)
    final = {}
    for name, slides in splits.items():
        if len(slides):
            probabilities, _ = trainer.predict(params, slides)
            final[name] = slide_metrics(probabilities, slides.labels, classes)
    if sharding.is_leader():
        stage_report.write_summary(workdir, 'train_slide', to_json_safe(
            {'training': summary, 'evaluated': used, 'metrics': final}))
    for name, metrics in final.items():
        logging.info('train_slide: %s AUC %s, accuracy %.3f (%s checkpoint)', name,
                     metrics['auc'], metrics['accuracy'], used['checkpoint'])
    return None
