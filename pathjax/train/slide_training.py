"""The `train_slide` stage: the slide model (`slide_net.model`: the method's graph transformer, or
a baseline) trained on slide graphs with cross entropy.

Batches of `train.batch_slides` slide graphs (padded to a common power-of-two bucket; a short
batch is filled with masked copies), read from the slides' graph files in a background thread
ahead of the device (`graph_batches`), run through one jitted, data-parallel train step. The
method's stopping rule: training ends when an epoch's training loss reaches `train.loss_target`
or after `train.max_steps` steps. Each epoch ends with the validation AUC (or, with one class in
the validation set, minus its loss) and an Orbax checkpoint; the best one is kept too, and a rerun
resumes from the latest. Each epoch's losses and validation AUC go to `slide_net/metrics.jsonl`
(the learning curve). At the end the chosen checkpoint (`eval.checkpoint`) is evaluated on the
training and validation slides; test slides are the `evaluate` stage's alone.
"""

import itertools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from pathjax import stage_report
from pathjax.cohort import Cohort
from pathjax.data.feature_sources import Sources
from pathjax.progress import Progress
from pathjax.data.features import GraphSettings
from pathjax.data.graph_batches import Prefetch
from pathjax.data.slide_sets import SlideSet, feature_dim, load_splits
from pathjax.errors import StageError
from pathjax.metrics import slide_metrics, to_json_safe
from pathjax.slide_predictor import SlidePredictor, checkpoint_dir
from pathjax.runtime import metrics_log, sharding, train_state
from pathjax.runtime.checkpoint import Checkpoints
from pathjax.runtime.train_state import TrainState


def class_weights(labels: np.ndarray, num_classes: int, mode: str) -> np.ndarray:
    """Per-class loss weights [C]: ones, or 'balanced' = n / (C * n_c) over the training slides."""
    if mode == 'none':
        return np.ones(num_classes, np.float32)
    counts = np.bincount(labels, minlength=num_classes).astype(np.float32)
    return np.where(counts > 0, len(labels) / (num_classes * np.maximum(counts, 1)), 0.0)


def make_train_step(model, weights: np.ndarray, bag_weight: float = 1.0):
    """(state, batch, rng) -> (state, {'loss', 'weight'}): class-weighted cross entropy; for a
    model that sows auxiliary per-slide losses (CLAM's instance loss), bag_weight x the cross
    entropy + (1 - bag_weight) x their sum, weighted over slides alike."""
    weights = jnp.asarray(weights)

    def train_step(state: TrainState, batch, rng):
        def loss_fn(params):
            (logits, _), sown = model.apply({'params': params}, batch['graph'], False,
                                            batch['label'], rngs={'dropout': rng},
                                            mutable=['losses'])
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, batch['label'])
            auxiliary = jax.tree.leaves(sown.get('losses', {}))  # each [B]
            if auxiliary:
                losses = bag_weight * losses + (1 - bag_weight) * sum(auxiliary)
            slide_weights = weights[batch['label']] * batch['mask']
            total = jnp.maximum(slide_weights.sum(), 1e-12)
            return (losses * slide_weights).sum() / total, total

        (loss, total), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        return state.apply_gradients(grads=grads), {'loss': loss, 'weight': total}

    return train_step


def create_optimizer(train) -> optax.GradientTransformation:
    if train.optimizer == 'adam':
        return optax.adam(train.lr)
    return optax.adamw(train.lr, weight_decay=train.weight_decay)


class SlideTrainer:
    """Training of the slide model: its predictor (model, mesh, compiled prediction), optimizer
    and checkpoints of one run."""

    def __init__(self, config, workdir, feature_dim: int):
        self.config, self.workdir = config, pathlib.Path(workdir)
        self.predictor = SlidePredictor(config, feature_dim)
        self.model, self.mesh = self.predictor.model, self.predictor.mesh
        self.classes, self.batch_size = self.predictor.classes, self.predictor.batch_size
        self.tx = create_optimizer(config.train)
        self.metrics_file = checkpoint_dir(workdir) / 'metrics.jsonl'  # one line per epoch
        self.create_state = train_state.make_state_creator(self.model.apply, self.tx,
                                                           self.predictor.replicated)

    def abstract_state(self) -> TrainState:
        return train_state.abstract_state(self.model.apply, self.predictor.initial_params,
                                          self.tx, self.predictor.replicated)

    def in_training_order(self, slides: SlideSet, first_epoch: int):
        """The batches of slide indices of each epoch from `first_epoch` on: every epoch a
        seeded permutation of the slides."""
        for epoch in itertools.count(first_epoch):
            order = np.random.default_rng([self.config.seed, epoch]).permutation(len(slides))
            for start in range(0, len(order), self.batch_size):
                yield order[start:start + self.batch_size]

    def validation(self, params, slides: SlideSet) -> dict:
        """Validation AUC, loss and the score the best checkpoint is chosen by."""
        if not len(slides):
            return {'val_auc': None, 'val_loss': None, 'val_score': None}
        probabilities, _ = self.predictor.predict(params, slides)
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
        replicated, batched = self.predictor.replicated, self.predictor.batched
        step_fn = sharding.under_mesh(jax.jit(make_train_step(self.model, class_weights(
            train.labels, len(self.classes), config.class_weights),
            self.config.slide_net.bag_weight),
            in_shardings=(replicated, batched, replicated),
            out_shardings=(replicated, replicated), donate_argnums=0), self.mesh)
        with Checkpoints(checkpoint_dir(self.workdir), best_metric='val_score') as checkpoints:
            if checkpoints.latest_step() is not None:
                state, summary = checkpoints.restore(self.abstract_state())
                logging.info('train_slide: resuming after epoch %d (step %d)', summary['epoch'],
                             summary['step'])
            else:
                state = self.create_state(self.predictor.initial_params())
                summary = {'epoch': 0, 'step': 0}
            metrics_log.rewind(self.metrics_file, summary['epoch'])
            if not self.finished(summary):
                order = self.in_training_order(train, summary['epoch'])
                with self.predictor.device_batches(train, order) as batches:
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
        progress = Progress('train_slide', config.max_steps, 'steps', initial=step)
        while not self.finished(summary):
            epoch = summary['epoch']
            losses = []  # device scalars, read once at the end of the epoch
            for _ in range(min(per_epoch, config.max_steps - step)):
                _, batch = next(batches)
                state, metrics = step_fn(state, batch, jax.random.fold_in(base_rng, step))
                losses.append((metrics['loss'], metrics['weight']))
                step += 1
                progress.update()
            loss, weight = np.asarray(jax.device_get(losses), np.float64).T
            train_loss = float((loss * weight).sum() / max(weight.sum(), 1e-12))
            if not np.isfinite(train_loss):
                raise StageError(f'train_slide: the loss became {train_loss} in epoch '
                                 f'{epoch + 1}; the last good checkpoint is kept in '
                                 f'{checkpoint_dir(self.workdir)}')
            summary = {'epoch': epoch + 1, 'step': step, 'train_loss': train_loss,
                       **self.validation(state.params, val)}
            summary['stopped'] = self.finished(summary)
            progress.postfix(epoch=summary['epoch'], loss=f'{train_loss:.3f}')
            metrics_log.append(self.metrics_file, summary)  # before the checkpoint: see rewind
            checkpoints.save(summary['step'], state, summary)
            if summary['epoch'] % config.log_every_epochs == 0 or summary['stopped']:
                logging.info('train_slide: epoch %d, step %d, train loss %.4f, validation '
                             'AUC %s', summary['epoch'], summary['step'], train_loss,
                             summary['val_auc'])
        progress.close()
        return state, summary


def run(config, workdir, cohort: Cohort) -> None:
    """The `train_slide` stage. Its report holds the training summary and the chosen
    checkpoint's metrics on the training and validation slides; the test split is left to the
    `evaluate` stage, so that nothing chosen here has seen test results."""
    settings = GraphSettings.from_config(config)
    classes = tuple(config.data.classes)
    splits = load_splits(workdir, cohort, ('train', 'val'), classes, settings, 'train_slide',
                         Sources.from_config(config, workdir))
    logging.info('train_slide: %s slides with features', ', '.join(
        f'{len(s)} {name}' for name, s in splits.items()))
    trainer = SlideTrainer(config, workdir, feature_dim(list(splits.values()), 'train_slide'))
    _, summary = trainer.fit(splits['train'], splits['val'])
    params, used = trainer.predictor.restore(workdir, config.eval.checkpoint)
    final = {}
    for name, slides in splits.items():
        if len(slides):
            probabilities, _ = trainer.predictor.predict(params, slides)
            final[name] = slide_metrics(probabilities, slides.labels, classes)
    if sharding.is_leader():
        stage_report.write_summary(workdir, 'train_slide', to_json_safe(
            {'training': summary, 'evaluated': used, 'metrics': final}))
    for name, metrics in final.items():
        logging.info('train_slide: %s AUC %s, accuracy %.3f (%s checkpoint)', name,
                     metrics['auc'], metrics['accuracy'], used['checkpoint'])
    return None
