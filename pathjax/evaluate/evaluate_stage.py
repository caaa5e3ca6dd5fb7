"""The `evaluate` stage: the slide model, restored from its checkpoint alone, on each split.

Writes `eval/<split>/predictions.csv`, `metrics.json` (with the checkpoint used), `roc.png` and
`heatmaps/<slide_id>.png` (patch scores over the slide's thumbnail; see `heatmaps`).
"""

import pathlib

import jax
import numpy as np
from absl import logging
from PIL import Image
from tqdm import tqdm

from pathjax import artifacts
from pathjax.cohort import Cohort
from pathjax.data.features import GraphSettings, kept_patches, load_bag
from pathjax.evaluate import heatmaps, report
from pathjax.evaluate.metrics import slide_metrics
from pathjax.slides.tile_stage import thumbnail_path, tiles_path
from pathjax.stage_report import ERROR, OK, SlideEntry
from pathjax.train import sharding
from pathjax.train.slide_training import (SlideSet, SlideTrainer, feature_dim, load_slides,
                                          make_batch, restore_params)


def split_dir(workdir, split: str) -> pathlib.Path:
    return pathlib.Path(workdir) / 'eval' / split


def slide_scores(trainer: SlideTrainer, params, slides: SlideSet, probabilities: np.ndarray,
                 weights: list[np.ndarray]) -> list[np.ndarray]:
    """Per-patch heatmap scores of each slide (see module doc of `heatmaps`)."""
    if trainer.config.slide_net.pooling == 'gated':
        return weights
    replicated, batched = sharding.replicated(trainer.mesh), sharding.batch_sharded(trainer.mesh)
    contributions = jax.jit(heatmaps.make_contribution_fn(trainer.model),
                            in_shardings=(replicated, batched, batched), out_shardings=replicated)
    predicted = probabilities.argmax(axis=1).astype(np.int32)
    scores = []
    for start in range(0, len(slides), trainer.batch_size):
        indices = np.arange(start, min(start + trainer.batch_size, len(slides)))
        batch = make_batch(slides, indices, trainer.batch_size, trainer.config.graph.k)
        batch['class'] = np.resize(predicted[indices], trainer.batch_size)
        batch = trainer.device_batch(batch)
        values = np.asarray(jax.device_get(contributions(params, batch['graph'], batch['class'])))
        scores += [values[row][:int(slides.graphs[i].n_node[0])] for row, i in enumerate(indices)]
    return scores


def write_heatmap(workdir, folder: pathlib.Path, slide_id: str, scores: np.ndarray,
                  signed: bool, title: str) -> bool:
    """Draws one slide's heatmap; False when the slide has no thumbnail or tiles."""
    thumbnail, tiles = thumbnail_path(workdir, slide_id), tiles_path(workdir, slide_id)
    if not thumbnail.exists() or not tiles.exists():
        return False
    tile_info = artifacts.load_npz(tiles)
    coords = load_bag(workdir, slide_id).coords[kept_patches(workdir, slide_id)]
    heatmaps.draw_heatmap(folder / f'{slide_id}.png', np.asarray(Image.open(thumbnail).convert('RGB')),
                          tuple(tile_info['slide_size']), coords, float(tile_info['extent']),
                          scores, signed, title)
    return True


def evaluate_split(trainer: SlideTrainer, params, workdir, split: str, slides: SlideSet,
                   checkpoint: dict) -> dict:
    classes = trainer.classes
    folder = split_dir(workdir, split)
    probabilities, weights = trainer.predict(params, slides)
    metrics = {**slide_metrics(probabilities, slides.labels, classes), 'split': split,
               'checkpoint': checkpoint}
    if sharding.is_leader():
        report.write_predictions(folder / 'predictions.csv', slides.slide_ids, slides.labels,
                                 probabilities, classes)
        report.write_metrics(folder / 'metrics.json', metrics)
        report.plot_roc(folder / 'roc.png', probabilities, slides.labels, classes)
    if trainer.config.eval.heatmaps and len(slides):
        signed = trainer.config.slide_net.pooling != 'gated'
        scores = slide_scores(trainer, params, slides, probabilities, weights)  # every process
    if trainer.config.eval.heatmaps and len(slides) and sharding.is_leader():
        for i, slide_id in enumerate(tqdm(slides.slide_ids, desc=f'heatmaps {split}', disable=None)):
            predicted = classes[int(probabilities[i].argmax())]
            what = 'contribution to' if signed else 'attention for'
            write_heatmap(workdir, folder / 'heatmaps', slide_id, scores[i], signed,
                          f'{slide_id}: {what} {predicted} (p={probabilities[i].max():.2f}), '
                          f'label {classes[slides.labels[i]]}')
    logging.info('evaluate: %s split, %d slides, AUC %s, accuracy %.3f', split, len(slides),
                 metrics['auc'], metrics['accuracy'])
    return metrics


def run(config, workdir, cohort: Cohort) -> list[SlideEntry]:
    """The `evaluate` stage over config.eval.splits; one report entry per slide evaluated."""
    settings = GraphSettings.from_config(config)
    classes = tuple(config.data.classes)
    trainer = SlideTrainer(config, workdir, feature_dim(workdir, cohort))
    params, checkpoint = restore_params(trainer, workdir, config.eval.checkpoint)
    entries = []
    for split in config.eval.splits:
        records = list(cohort.split(split))
        slides = load_slides(workdir, records, classes, settings)
        evaluate_split(trainer, params, workdir, split, slides, checkpoint)
        done = set(slides.slide_ids)
        entries += [SlideEntry(r.slide_id, OK, details={'split': split}) if r.slide_id in done
                    else SlideEntry(r.slide_id, ERROR, message='no features (see the extract report)',
                                    details={'split': split}) for r in records]
    return entries
