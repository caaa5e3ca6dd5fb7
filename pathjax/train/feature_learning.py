"""The `learn_features` stage: VGG-16 + AM-softmax trained on patches labelled by their slide.

A compiled train step `(state, batch, rng) -> (state, metrics)` runs data parallel over the
mesh's `data` axis (state replicated and donated, batch sharded); the augmentation
(`learn.augment`: D4, optionally followed by HED colour jitter) runs inside it (on CPU at 512 px,
as several calls of micro-batches: `micro_batches.AccumulatedStep`). Each epoch ends with the
validation patch accuracy and an Orbax checkpoint; a rerun resumes from the latest checkpoint,
and because the data order depends only on (seed, epoch) and the step randomness only on (seed,
step), it ends with the same parameters as an uninterrupted run. A NaN loss stops the run with
the last good checkpoint kept.
"""

import pathlib
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging

from pathjax import stage_report
from pathjax.cohort import Cohort
from pathjax.data import patches
from pathjax.data.augment import random_d4
from pathjax.data.hed_jitter import random_hed_jitter
from pathjax.errors import StageError, UsageError
from pathjax.progress import Progress
from pathjax.models.patch.am_softmax import am_softmax_loss
from pathjax.models.patch.feature_net import VGG16_BACKBONE, FeatureNet, create_feature_net
from pathjax.models.patch.vit_presets import get_preset
from pathjax.models.patch.vit_weights import load_params
from pathjax.models.patch.pretrained import PretrainedWeightsError, load_pretrained_trunk
from pathjax.train import micro_batches as micro_batches_lib
from pathjax.runtime import metrics_log, sharding, train_state
from pathjax.runtime.checkpoint import Checkpoints
from pathjax.runtime.train_state import TrainState
from pathjax.train.xla_options import patch_network_options


def run_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / 'feature_net'


def create_optimizer(learn, steps_per_epoch: int) -> optax.GradientTransformation:
    """The optimizer of `config.learn`: 'sgd' (momentum, weight decay), 'adam' or 'adamw', with
    a constant or cosine learning rate, after gradient clipping by global norm (if > 0)."""
    total_steps = max(1, learn.epochs * steps_per_epoch)
    if learn.lr_schedule == 'cosine':
        rate = optax.cosine_decay_schedule(learn.lr, total_steps)
    else:
        rate = optax.constant_schedule(learn.lr)
    if learn.optimizer == 'sgd':
        optimizer = optax.chain(optax.add_decayed_weights(learn.weight_decay),
                                optax.sgd(rate, momentum=learn.momentum, nesterov=True))
    elif learn.optimizer == 'adam':
        optimizer = optax.adam(rate)
    else:
        optimizer = optax.adamw(rate, weight_decay=learn.weight_decay)
    if learn.grad_clip > 0:
        optimizer = optax.chain(optax.clip_by_global_norm(learn.grad_clip), optimizer)
    return optimizer


def initial_params(model: FeatureNet, config, patch_size: int) -> dict:
    """Random initialisation from config.seed, with the trunk from `feature_net.weights` when
    given (a torchvision VGG-16 state_dict, or the ViT preset's timm state_dict: then only the
    head is initialised, not a random copy of a network of up to a billion parameters)."""
    net, key = config.feature_net, jax.random.key(config.seed)
    try:
        if net.weights and net.backbone != VGG16_BACKBONE:
            preset = get_preset(net.backbone)
            vit = jax.tree.map(jnp.asarray, load_params(preset, net.weights))
            features = jnp.zeros((1, preset.arch.feature_dim), jnp.float32)
            head = jax.jit(lambda k, f: model.init(k, f, method=lambda m, x: m.head(x)))(
                key, features)['params']
            return {'trunk': {'vit': vit}, **head}
        images = jnp.zeros((1, patch_size, patch_size, 3), jnp.uint8)
        params = jax.jit(model.init)(key, images)['params']
        if net.weights:
            params = {**params, 'trunk': load_pretrained_trunk(net.weights, params['trunk'])}
        return params
    except (PretrainedWeightsError, ImportError) as error:
        raise UsageError(f'feature_net.weights: {error}') from None


AUGMENTATIONS = ('d4', 'd4+hed', 'none')


def augment_images(images: jax.Array, rng: jax.Array, augment: str, hed_sigma: float) -> jax.Array:
    """uint8 [B, P, P, 3] -> uint8 [B, P, P, 3], per sample: 'd4' a random symmetry, 'd4+hed' the
    same symmetry (drawn from rng as under 'd4') then HED jitter of strength hed_sigma (drawn
    from fold_in(rng, 1)), 'none' the images unchanged."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f'augment must be one of {AUGMENTATIONS}, got {augment!r}')
    if augment == 'none':
        return images
    images = random_d4(rng, images)
    if augment == 'd4+hed':
        images = random_hed_jitter(jax.random.fold_in(rng, 1), images, hed_sigma)
    return images


def make_train_parts(model: FeatureNet, s: float, m: float, augment: str, hed_sigma: float):
    """The train step's two halves: prepare(batch, rng) -> {'image', 'label'} (`augment_images`,
    drawn for the whole batch; the images stay uint8) and gradient(params, inputs) -> (grads,
    {'loss', 'accuracy'}) of the mean AM-softmax loss over the inputs' rows."""

    def prepare(batch, rng):
        images = augment_images(batch['image'], rng, augment, hed_sigma)
        return {'image': images, 'label': batch['label']}

    def loss_fn(params, inputs):
        _, cosines = model.apply({'params': params}, inputs['image'])
        return am_softmax_loss(cosines, inputs['label'], s, m), cosines

    def gradient(params, inputs):
        (loss, cosines), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs)
        accuracy = jnp.mean(jnp.argmax(cosines, axis=-1) == inputs['label'])
        return grads, {'loss': loss, 'accuracy': accuracy}

    return prepare, gradient


def make_train_step(model: FeatureNet, s: float, m: float, augment: str, hed_sigma: float):
    """(state, batch {'image' uint8 [B, P, P, 3], 'label' int32 [B]}, rng) -> (state, metrics):
    the whole batch in one program (GPU, TPU, and CPU batches that fit in one pass)."""
    prepare, gradient = make_train_parts(model, s, m, augment, hed_sigma)

    def train_step(state: TrainState, batch, rng):
        grads, metrics = gradient(state.params, prepare(batch, rng))
        return state.apply_gradients(grads=grads), metrics

    return train_step


def compile_train_step(model: FeatureNet, s: float, m: float, augment: str, hed_sigma: float,
                       micro_batches: int, replicated, batched, compiler_options=None):
    """The compiled train step (state donated, batch sharded over `batched`): one program, or
    with micro_batches > 1 an `AccumulatedStep` of that many calls with the same update."""
    if micro_batches == 1:
        return jax.jit(make_train_step(model, s, m, augment, hed_sigma),
                       in_shardings=(replicated, batched, replicated),
                       out_shardings=(replicated, replicated), donate_argnums=0,
                       compiler_options=compiler_options)
    return micro_batches_lib.AccumulatedStep(*make_train_parts(model, s, m, augment, hed_sigma),
                                             micro_batches, replicated, batched, compiler_options)


def make_eval_step(model: FeatureNet, micro_batches: int = 1):
    """(params, batch with 'mask') -> (correct predictions, counted samples)."""
    cosines_of = micro_batches_lib.mapped(lambda p, images: model.apply({'params': p}, images)[1],
                                          micro_batches)

    def eval_step(params, batch):
        cosines = cosines_of(params, batch['image'])
        correct = (jnp.argmax(cosines, axis=-1) == batch['label']) & batch['mask']
        return correct.sum(), batch['mask'].sum()

    return eval_step


class FeatureTrainer:
    """Holds the model, mesh, compiled steps and data of one feature-learning run."""

    def __init__(self, config, workdir):
        self.config, self.workdir = config, pathlib.Path(workdir)
        sampling = patches.Sampling.from_config(config)
        builder = patches.load_builder(workdir, sampling)
        self.train_source = patches.encoded_source(builder, 'train')
        self.val_source = (patches.encoded_source(builder, 'val')
                           if 'val' in builder.info.splits else None)
        self.mesh = sharding.make_mesh(config.mesh.data)
        self.batch_size = config.learn.batch_size
        self.local_batch = sharding.local_batch_size(self.batch_size, self.mesh,
                                                     'learn.batch_size')
        self.steps_per_epoch = len(self.train_source) // self.batch_size  # full global batches
        if not self.steps_per_epoch:
            raise StageError(f'learn_features: {len(self.train_source)} training patches, fewer '
                             f'than one batch (learn.batch_size={self.batch_size})')
        self.model = create_feature_net(config)
        tx = create_optimizer(config.learn, self.steps_per_epoch)
        replicated = sharding.replicated(self.mesh)
        batched = sharding.batch_sharded(self.mesh)

        self.tx = tx
        self.create_state = train_state.make_state_creator(self.model.apply, tx, replicated)
        micro_batches = micro_batches_lib.micro_batch_count(
            self.batch_size, self.mesh.devices.size, config.micro_batch, 'learn.batch_size',
            micro_batches_lib.image_bytes(config, training=True))
        options = patch_network_options()
        self.train_step = compile_train_step(
            self.model, config.am_softmax.s, config.am_softmax.m, config.learn.augment,
            config.learn.hed_sigma, micro_batches, replicated, batched, options)
        self.eval_step = jax.jit(make_eval_step(self.model, micro_batches),
                                 in_shardings=(replicated, batched),
                                 out_shardings=replicated, compiler_options=options)
        self.base_rng = jax.random.key(config.seed)

    def validation_accuracy(self, params) -> float | None:
        if self.val_source is None or not len(self.val_source):
            return None
        counts = []  # device scalars, read once at the end (reading each would wait per batch)
        for batch in patches.eval_batches(self.val_source, self.local_batch,
                                          process_index=jax.process_index(),
                                          process_count=jax.process_count(),
                                          workers=self.config.workers):
            counts.append(self.eval_step(params, sharding.global_batch(batch, self.mesh)))
        correct, counted = np.asarray(jax.device_get(counts), np.int64).sum(axis=0)
        return float(correct / max(counted, 1))

    def train_epoch(self, state: TrainState, epoch: int, metrics_file: pathlib.Path,
                    progress: Progress) -> tuple[TrainState, dict]:
        """One epoch; raises StageError on a NaN loss (before any checkpoint of this epoch)."""
        log_every = self.config.learn.log_every
        sums, count, start = {'loss': 0.0, 'accuracy': 0.0}, 0, time.perf_counter()
        epoch_loss, epoch_steps = 0.0, 0
        batches = patches.train_batches(self.train_source, self.local_batch, seed=self.config.seed,
                                        epoch=epoch, process_index=jax.process_index(),
                                        process_count=jax.process_count(),
                                        workers=self.config.workers)
        progress.postfix(epoch=f'{epoch + 1}/{self.config.learn.epochs}')
        step = epoch * self.steps_per_epoch  # on the host: reading state.step would wait for it
        for batch in batches:
            rng = jax.random.fold_in(self.base_rng, step)
            state, metrics = self.train_step(state, sharding.global_batch(batch, self.mesh), rng)
            step += 1
            for key in sums:
                sums[key] = sums[key] + metrics[key]
            count += 1
            progress.update()
            if count == log_every or epoch_steps + count == self.steps_per_epoch:
                loss, accuracy = float(sums['loss']) / count, float(sums['accuracy']) / count
                if not np.isfinite(loss):
                    raise StageError(f'learn_features: the loss became {loss} in epoch {epoch + 1} '
                                     f'(step {step}); the last good checkpoint is kept '
                                     f'in {run_dir(self.workdir)}')
                rate = count * self.batch_size / (time.perf_counter() - start)
                epoch_loss, epoch_steps = epoch_loss + loss * count, epoch_steps + count
                record = {'epoch': epoch + 1, 'step': step, 'loss': loss,
                          'accuracy': accuracy, 'images_per_second': rate}
                metrics_log.append(metrics_file, record)
                progress.postfix(epoch=f'{epoch + 1}/{self.config.learn.epochs}',
                                 loss=f'{loss:.3f}', acc=f'{accuracy:.3f}')
                sums, count, start = {'loss': 0.0, 'accuracy': 0.0}, 0, time.perf_counter()
        return state, {'train_loss': epoch_loss / max(epoch_steps, 1)}

    def fit(self) -> dict:
        """Trains to `learn.epochs`, resuming from the latest checkpoint; returns a summary."""
        folder = run_dir(self.workdir)
        metrics_file = folder / 'metrics.jsonl'
        with Checkpoints(folder, best_metric='val_accuracy') as checkpoints:
            first_epoch, summary = 0, {}
            if checkpoints.latest_step() is not None:
                state, summary = checkpoints.restore(abstract_state(
                    self.model, self.tx, self.config.tile.patch_size,
                    sharding.replicated(self.mesh)))
                first_epoch = summary['epoch']
                logging.info('learn_features: resuming after epoch %d', first_epoch)
            else:
                state = self.create_state(initial_params(self.model, self.config,
                                                         self.config.tile.patch_size))
            metrics_log.rewind(metrics_file, first_epoch)
            epochs = self.config.learn.epochs
            progress = Progress('learn_features', epochs * self.steps_per_epoch, 'steps',
                                initial=first_epoch * self.steps_per_epoch)
            for epoch in range(first_epoch, epochs):
                state, summary = self.train_epoch(state, epoch, metrics_file, progress)
                summary.update(epoch=epoch + 1, val_accuracy=self.validation_accuracy(state.params))
                logging.info('learn_features: epoch %d/%d, train loss %.4f, validation patch '
                             'accuracy %s', epoch + 1, self.config.learn.epochs,
                             summary['train_loss'], summary['val_accuracy'])
                metrics_log.append(metrics_file, summary)
                checkpoints.save((epoch + 1) * self.steps_per_epoch, state, summary)
            progress.close()
        return summary


def abstract_state(model: FeatureNet, tx: optax.GradientTransformation, patch_size: int,
                   placement=None) -> TrainState:
    """The train state's shapes and dtypes, placed with `placement` (default: this process's
    first device; a checkpoint restores onto any topology), to restore a checkpoint into without
    initialising the network."""
    placement = placement or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    images = jnp.zeros((1, patch_size, patch_size, 3), jnp.uint8)
    return train_state.abstract_state(
        model.apply, lambda: model.init(jax.random.key(0), images)['params'], tx, placement)


def run(config, workdir, cohort: Cohort) -> None:
    """The `learn_features` stage (skipped when feature_net.learn is False: baseline features)."""
    del cohort  # the stage reads the patch dataset
    if not config.feature_net.learn:
        net = config.feature_net
        logging.info('learn_features: feature_net.learn is False; extraction uses %s %s',
                     net.backbone, f'with the weights of {net.weights}' if net.weights
                     else 'randomly initialised')
        return None
    summary = FeatureTrainer(config, workdir).fit()
    if sharding.is_leader():
        stage_report.write_summary(workdir, 'learn_features', summary)
    return None
