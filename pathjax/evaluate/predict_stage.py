"""The `predict` stage: new slides through a trained workdir (the deployment case).

`--stages predict --config.predict.manifest=<csv>` reads a manifest whose `label` column may be
empty or absent, and in `<workdir>/predict/` (a workdir of its own: tiles/, qc/, thumbnails/,
features/, reports/) tiles the slides, normalizes their stain to the trained workdir's reference
(`stain/reference.npz`, never refitted on new slides), extracts their features with the trained
feature network and runs the trained slide model (`eval.checkpoint`). It writes
`predict/predictions.csv` (slide_id, label or empty, one probability per class, predicted class),
`predict/heatmaps/`, `predict/geojson/` and `predict/top_patches/`, and, for the rows that have
labels, `predict/metrics.json` and `predict/roc.png`. With features imported from another tool
(`features.import_dir`) the new slides' files are read from `predict.import_dir` (or the same
folder) by the import stage instead of tiling and extracting. Finished slides are skipped on rerun (a slide whose
file changed, even under the same id, is redone: `tile_stage`); a slide that
is missing, unreadable or without tissue is reported in `predict/reports/` (tile, extract,
predict) and the rest go on. `pipeline` runs the steps (`prepare_folder`, then `steps`).
"""

import filecmp
import functools
import pathlib
import shutil
from typing import Callable

import numpy as np
from absl import logging

from pathjax import artifacts, provenance
from pathjax.cohort import PREDICT, ManifestError, load_new_slides
from pathjax.data import import_stage
from pathjax.data.feature_sources import Sources, importing
from pathjax.data.features import GraphSettings
from pathjax.data.slide_sets import UNLABELLED, load_splits
from pathjax.errors import StageError, UsageError
from pathjax.evaluate import report
from pathjax.evaluate.evaluate_stage import write_heatmaps
from pathjax.metrics import split_metrics
from pathjax.slide_predictor import SlidePredictor
from pathjax.runtime import sharding
from pathjax.slides import tile_stage
from pathjax.stage_report import ERROR, OK, SlideEntry
from pathjax.train import extract

STAGE = 'predict'


def predict_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / 'predict'


def reference_file(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / 'stain' / 'reference.npz'


def check_trained(config, workdir, settings: dict) -> None:
    """Raises UsageError unless `workdir` holds a trained slide model made with `settings` (the
    config fields of every stage up to train_slide)."""
    recorded = pathlib.Path(workdir) / 'settings' / 'train_slide.json'
    if not recorded.exists():
        raise UsageError(f'predict: {workdir} has no trained slide model (no {recorded}); train '
                         'one first (all stages), then predict from the same --workdir')
    try:
        provenance.check_matches(workdir, 'train_slide', settings, 'graphs/, slide_net/')
    except UsageError as error:
        raise UsageError(f'predict: run it with the config the workdir was trained with; '
                         f'{error}') from None
    if (config.stain.method == 'histogram' and not importing(config)
            and not reference_file(workdir).exists()):
        raise UsageError(f'predict: {workdir} has no stain reference ({reference_file(workdir)}); '
                         'rerun its tile stage')


def share_stain_reference(config, workdir, folder: pathlib.Path) -> None:
    """Puts the trained stain reference in the prediction folder; if the one there differs (the
    workdir was retrained), the folder's tiles made with the old one are removed (their scans,
    which do not depend on it, are kept) so the tile stage refits them."""
    if config.stain.method != 'histogram':
        return
    source, target = reference_file(workdir), reference_file(folder)
    if target.exists() and filecmp.cmp(source, target, shallow=False):
        return
    if target.exists():
        logging.info('predict: the trained stain reference changed; redoing the tiles of %s',
                     folder)
        for tiles in (folder / 'tiles').glob('*.npz'):
            tile_stage.forget_slide(folder, tiles.stem, keep_scan=True)
    with artifacts.atomic_path(target) as temporary:
        shutil.copyfile(source, temporary)


def load_cohort(config):
    """The prediction manifest's slides (split PREDICT); UsageError naming every bad row."""
    try:
        cohort = load_new_slides(config.predict.manifest, tuple(config.data.classes),
                                 slides_required=not importing(config))
    except ManifestError as error:
        raise UsageError(f'predict.manifest: {error}') from None
    for _, why in cohort.skipped:
        logging.warning('predict: skipping %s', why)
    for note in cohort.notes:
        logging.warning('predict: %s', note)
    return cohort


def prepare_folder(config, workdir, cohort, settings: dict) -> None:
    """(Process 0) checks the trained workdir and readies `predict/` for the steps."""
    folder = predict_dir(workdir)
    check_trained(config, workdir, settings)
    if importing(config):
        return
    provenance.check_and_record(folder, 'tile', provenance.settings_of(
        config, ['tile', 'tissue', 'stain']), str(folder))
    share_stain_reference(config, workdir, folder)


def steps(config, workdir) -> list[tuple[str, Callable[..., list[SlideEntry]]]]:
    """(name, run(config, folder, cohort) -> report entries) of the stage's steps, in order, all
    run on every process in the prediction folder: tiling (with the trained stain reference
    already there), extraction with the trained feature network, and prediction; with imported
    features, their import instead of tiling and extraction."""
    workdir = pathlib.Path(workdir)
    predict = ('predict', functools.partial(predict_slides, workdir=workdir))
    if importing(config):
        return [('import', functools.partial(import_stage.run, predicting=True)), predict]
    return [('tile', tile_stage.run),
            ('extract', functools.partial(extract.run, network_workdir=workdir)), predict]


def predict_slides(config, folder: pathlib.Path, cohort, workdir: pathlib.Path
                   ) -> list[SlideEntry]:
    """Predictions, heatmaps and (labelled rows) metrics of the prediction folder's slides with
    `workdir`'s slide model; one report entry per manifest row."""
    classes = tuple(config.data.classes)
    slides = load_splits(folder, cohort, [PREDICT], classes, GraphSettings.from_config(config),
                         STAGE, Sources.from_config(config, folder, predicting=True))[PREDICT]
    if not len(slides):
        raise StageError(f'predict: no slide could be tiled and extracted; see '
                         f'{folder / "reports"}')
    predictor = SlidePredictor(config, slides.feature_dim)
    params, checkpoint = predictor.restore(workdir, config.eval.checkpoint)
    probabilities, weights = predictor.predict(params, slides)
    labelled = slides.labels != UNLABELLED
    if sharding.is_leader():
        report.write_predictions(folder / 'predictions.csv', slides.slide_ids, slides.labels,
                                 probabilities, classes)
        if labelled.any():
            metrics = {**split_metrics(probabilities[labelled], slides.labels[labelled],
                                       np.asarray(slides.case_ids)[labelled].tolist(), classes),
                       'split': PREDICT, 'checkpoint': checkpoint,
                       'unlabelled_slides': int((~labelled).sum())}
            report.write_metrics(folder / 'metrics.json', metrics)
            report.plot_roc(folder / 'roc.png', probabilities[labelled],
                            slides.labels[labelled], classes)
    if config.eval.heatmaps:
        write_heatmaps(predictor, params, folder, folder, slides,
                       {r.slide_id: r.path for r in cohort.slides}, probabilities, weights)
    logging.info('predict: %d slides predicted (%d with labels): %s', len(slides),
                 int(labelled.sum()), folder / 'predictions.csv')
    predicted = dict(zip(slides.slide_ids, probabilities.argmax(axis=1)))
    entries = [SlideEntry(r.slide_id, OK, details={'pred': classes[predicted[r.slide_id]]})
               if r.slide_id in predicted else
               SlideEntry(r.slide_id, ERROR, message='no features (see the tile and extract '
                                                     'reports)') for r in cohort.slides]
    return entries + [SlideEntry(r.slide_id, ERROR, message=why) for r, why in cohort.skipped]
