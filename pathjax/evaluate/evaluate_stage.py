"""The `evaluate` stage: the slide model, restored from its checkpoint alone, on each split.

Writes `eval/<split>/predictions.csv`, `metrics.json` (slide- and patient-level metrics with
bootstrap 95% CIs of the AUC, and the checkpoint used), `roc.png`, `heatmaps/<slide_id>.png`
(patch scores over the slide's thumbnail; see `heatmaps`), `geojson/<slide_id>.geojson` (the
scored patches as QuPath detections and the tissue region as annotations, level-0 pixels; see
`interop.geojson`) and `top_patches/<slide_id>/<rank>.png` (the highest-scoring patches at full
resolution), and `eval/learning_curves.png` (both training stages, per epoch).
"""

import pathlib

import numpy as np
from absl import logging
from PIL import Image

from pathjax.cohort import Cohort
from pathjax.data.feature_sources import Sources, layout_path
from pathjax.data.features import GraphSettings
from pathjax.data.slide_sets import UNLABELLED, SlideSet, feature_dim, load_splits
from pathjax.evaluate import heatmaps, report
from pathjax.evaluate.top_patches import save_top_patches
from pathjax.evaluate.learning_curves import plot_learning_curves
from pathjax.interop import geojson
from pathjax.models.slide.factory import scores_are_attention
from pathjax.progress import Progress
from pathjax.metrics import split_metrics, youden_threshold
from pathjax.slide_predictor import SlidePredictor
from pathjax.slide_paths import slide_file
from pathjax.slides import stain_transform
from pathjax.slides.reader import SlideError
from pathjax.slides.tile_stage import thumbnail_path, tiles_path
from pathjax.stage_report import ERROR, OK, SlideEntry
from pathjax.runtime import sharding


def split_dir(workdir, split: str) -> pathlib.Path:
    return pathlib.Path(workdir) / 'eval' / split


TILE_FIELDS = ('slide_size', 'extent', 'level', 'read_size', 'patch_size', 'stain_method',
               *sorted({k for keys in stain_transform.TRANSFORM_KEYS.values() for k in keys}))


def geojson_path(folder, slide_id: str) -> pathlib.Path:
    """`<folder>/geojson/<slide_id>.geojson` (folder: an evaluated split's, or predict/)."""
    return slide_file(folder, 'geojson', slide_id, '.geojson')


def slide_layout(workdir, slide_id: str) -> dict[str, np.ndarray] | None:
    """What pictures of a slide are drawn with: the TILE_FIELDS (and `tissue_mask`, when the
    tile stage kept it) of its tiles file, or of the import stage's layout file; None without
    either."""
    for path in (tiles_path(workdir, slide_id), layout_path(workdir, slide_id)):
        if path.exists():
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in TILE_FIELDS + ('tissue_mask',)
                        if key in data.files}
    return None


def write_heatmap(thumbnail: pathlib.Path, tiles: dict, path: pathlib.Path, coords: np.ndarray,
                  scores: np.ndarray, signed: bool, title: str) -> None:
    """Draws one slide's heatmap (coords [n, 2] level-0, scores [n]) over its thumbnail; `tiles`:
    its `slide_layout`."""
    heatmaps.draw_heatmap(path, np.asarray(Image.open(thumbnail).convert('RGB')),
                          tuple(tiles['slide_size']), coords, float(tiles['extent']), scores,
                          signed, title)


def write_geojson(path: pathlib.Path, slide_id: str, layout: dict, coords: np.ndarray,
                  scores: np.ndarray, score_name: str, probabilities: dict[str, float],
                  predicted: str) -> None:
    """One slide's QuPath GeoJSON: its scored patches (coords [n, 2] level-0, scores [n]) and,
    when its layout holds the tissue mask, the tissue region, without islands and holes smaller
    than a quarter of a patch (none could hold tissue.min_fraction of a patch by itself)."""
    size = tuple(int(v) for v in layout['slide_size'])
    extent = float(layout['extent'])
    tissue = (geojson.tissue_polygons(layout['tissue_mask'], size, min_area=extent ** 2 / 4)
              if 'tissue_mask' in layout else None)
    geojson.write(path, geojson.slide_features(slide_id, coords, extent, scores,
                                               score_name, probabilities, predicted, tissue,
                                               size))


def write_heatmaps(predictor: SlidePredictor, params, workdir, folder: pathlib.Path,
                   slides: SlideSet, slide_paths: dict[str, str], probabilities: np.ndarray,
                   weights: list[np.ndarray]) -> None:
    """For each slide, its heatmap `<folder>/heatmaps/<slide_id>.png` (see `heatmaps`: gated-
    attention weights, or each patch's contribution to the predicted class; computed on every
    process, drawn by the leader), its GeoJSON `<folder>/geojson/<slide_id>.geojson` and, when
    its slide file is known, its top patches in `<folder>/top_patches/` (see `top_patches`).
    `workdir` holds the slides' thumbnails and tiles (or imported layout) files."""
    classes = predictor.classes
    predicted = probabilities.argmax(axis=1)
    signed = not scores_are_attention(predictor.config.slide_net)
    scores = predictor.contributions(params, slides, predicted) if signed else weights
    if not sharding.is_leader():
        return
    what = 'contribution to' if signed else 'attention for'
    progress = Progress(f'evaluate {folder.name}', len(slides.slide_ids), 'slides')
    for i, slide_id in enumerate(slides.slide_ids):
        progress.update()
        label = classes[slides.labels[i]] if slides.labels[i] != UNLABELLED else 'unknown'
        title = (f'{slide_id}: {what} {classes[predicted[i]]} (p={probabilities[i].max():.2f}), '
                 f'label {label}')
        thumbnail, tiles = thumbnail_path(workdir, slide_id), slide_layout(workdir, slide_id)
        if not thumbnail.exists() or tiles is None:
            logging.warning('evaluate: no heatmap for slide %s (no thumbnail or tiles file)',
                            slide_id)
            continue
        write_heatmap(thumbnail, tiles, heatmaps.heatmap_path(folder, slide_id),
                      slides.coords[i], scores[i], signed, title)
        write_geojson(geojson_path(folder, slide_id), slide_id, tiles, slides.coords[i],
                      scores[i], 'contribution' if signed else 'attention',
                      dict(zip(classes, map(float, probabilities[i]))), classes[predicted[i]])
        if not slide_paths[slide_id]:  # imported features without the slide file
            continue
        try:
            save_top_patches(folder, slide_id, slide_paths[slide_id], tiles,
                             slides.coords[i], scores[i], predictor.config.eval.top_patches)
        except SlideError as error:
            logging.warning('evaluate: no top patches for slide %s: %s', slide_id, error)
    progress.close()


def validation_threshold(predictor: SlidePredictor, params, slides: SlideSet) -> float | None:
    """The positive-class threshold chosen on the validation slides (Youden's J; binary tasks),
    for the test metrics' operating point; None without validation slides or classes."""
    if len(predictor.classes) != 2 or not len(slides):
        return None
    probabilities, _ = predictor.predict(params, slides)
    threshold = youden_threshold(probabilities[:, 1], slides.labels == 1)
    return None if np.isnan(threshold) else float(threshold)


def evaluate_split(predictor: SlidePredictor, params, workdir, split: str, slides: SlideSet,
                   slide_paths: dict[str, str], checkpoint: dict,
                   threshold: float | None = None) -> dict:
    """Predictions, metrics (operating point at `threshold` too), ROC and calibration plots and
    heatmaps of one split."""
    classes = predictor.classes
    folder = split_dir(workdir, split)
    probabilities, weights = predictor.predict(params, slides)
    metrics = {**split_metrics(probabilities, slides.labels, slides.case_ids, classes,
                               threshold=threshold),
               'split': split, 'checkpoint': checkpoint, 'threshold_from': 'validation (Youden)'
               if threshold is not None else None}
    if sharding.is_leader():
        report.write_predictions(folder / 'predictions.csv', slides.slide_ids, slides.labels,
                                 probabilities, classes)
        report.write_metrics(folder / 'metrics.json', metrics)
        report.plot_roc(folder / 'roc.png', probabilities, slides.labels, classes)
        report.plot_calibration(folder / 'calibration.png', probabilities, slides.labels, classes)
    if predictor.config.eval.heatmaps and len(slides):
        write_heatmaps(predictor, params, workdir, folder, slides, slide_paths, probabilities,
                       weights)
    low, high = metrics['auc_ci95']
    logging.info('evaluate: %s split, %d slides, AUC %.3f (95%% CI %.3f-%.3f), accuracy %.3f; '
                 '%d cases, AUC %.3f', split, len(slides), metrics['auc'], low, high,
                 metrics['accuracy'], metrics['patient']['num_cases'], metrics['patient']['auc'])
    return metrics


def run(config, workdir, cohort: Cohort) -> list[SlideEntry]:
    """The `evaluate` stage over config.eval.splits; one report entry per slide evaluated."""
    settings = GraphSettings.from_config(config)
    classes = tuple(config.data.classes)
    names = list(dict.fromkeys([*config.eval.splits, 'val']))  # val: the operating threshold
    splits = load_splits(workdir, cohort, names, classes, settings, 'evaluate',
                         Sources.from_config(config, workdir))
    predictor = SlidePredictor(config, feature_dim(list(splits.values()), 'evaluate'))
    params, checkpoint = predictor.restore(workdir, config.eval.checkpoint)
    threshold = validation_threshold(predictor, params, splits['val'])
    splits = {name: splits[name] for name in config.eval.splits}
    if sharding.is_leader():
        plot_learning_curves(workdir, pathlib.Path(workdir) / 'eval' / 'learning_curves.png')
    slide_paths = {r.slide_id: r.path for r in cohort.slides}
    entries = []
    for split, slides in splits.items():
        evaluate_split(predictor, params, workdir, split, slides, slide_paths, checkpoint,
                       threshold)
        done = set(slides.slide_ids)
        entries += [SlideEntry(r.slide_id, OK, details={'split': split}) if r.slide_id in done
                    else SlideEntry(r.slide_id, ERROR, message='no features (see the extract report)',
                                    details={'split': split}) for r in cohort.split(split)]
    return entries
