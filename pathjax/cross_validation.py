"""k-fold cross-validation in one run: every fold through the whole method in its own folder,
sharing what does not depend on the split, then one summary.

With `data.folds` = K > 1 and `data.fold` = -1, fold k (test fold k, validation fold k + 1 mod K,
the rest training; a case never straddles folds; `data.split_seed` deals them) runs every stage
in `<workdir>/folds/<k>/`: its own stain reference (from its training slides), patch dataset,
feature network, features, slide model and evaluation, so nothing of fold k has seen its test
slides. The tissue scans, QC pictures and thumbnails do not depend on the split: they are made
once, in `<workdir>/scans/`, `qc/` and `thumbnails/`, which every fold's tile stage reads. A fold
whose stages have all finished with the same settings is skipped on a rerun
(`folds/<k>/done.json`), so a killed run resumes at the fold and stage where it stopped.

The root's cohort.csv names each slide's test fold. The summary (`cv/summary.json` and
`cv/summary.csv`): each fold's test metrics, their mean and
sample standard deviation over the folds, and the pooled out-of-fold metrics (every slide
predicted by the fold that held it out; `cv/predictions.csv`) with a bootstrap 95% CI of the
AUC, at slide and patient level.
"""

import dataclasses
import json
import os
import pathlib
from typing import Callable

import numpy as np
from absl import logging

from pathjax import artifacts, csv_cells, provenance, split_check
from pathjax.cohort import Cohort, assign_splits, kfold_by_case, kfold_by_site, read_manifest
from pathjax.data import feature_sources
from pathjax.data.slide_sets import UNLABELLED
from pathjax.errors import UsageError
from pathjax.evaluate import report
from pathjax.metrics import split_metrics, to_json_safe
from pathjax.runtime import sharding
from pathjax.slide_paths import slide_file

SHARED = {'tiles/.scan': 'scans', 'qc': 'qc', 'thumbnails': 'thumbnails'}  # fold path -> root
SUMMARY_METRICS = ('auc', 'accuracy', 'balanced_accuracy', 'f1')
TRAINING_STAGES = {'patches', 'learn_features', 'import', 'train_slide'}
SCAN_FIELDS = ('data.synthetic', 'tile', 'tissue', 'stain.method', 'stain.fit_patches')


def is_cross_validation(config) -> bool:
    """True when the config asks for every fold in one run."""
    return config.data.folds > 1 and config.data.fold == -1


def fold_dir(workdir, fold: int) -> pathlib.Path:
    return pathlib.Path(workdir) / 'folds' / str(fold)


def fold_config(config, fold: int, manifest: pathlib.Path):
    """The config of one fold: `data.fold` set, and the cohort's manifest (a generated cohort is
    made once, in the root workdir)."""
    config = config.copy_and_resolve_references()
    config.data.fold, config.data.manifest = fold, str(manifest)
    return config


def link_shared(workdir: pathlib.Path, fold: int) -> None:
    """Points fold `fold`'s scan, QC and thumbnail folders at the root's shared ones (relative
    links, so the workdir can move)."""
    folder = fold_dir(workdir, fold)
    for inside, shared in SHARED.items():
        link_folder(folder / inside, workdir / shared, 'cross-validation shares between folds')


def link_folder(link: pathlib.Path, target: pathlib.Path, sharing: str) -> None:
    """Makes `link` a relative link to the folder `target` (made if missing), unless it is one;
    raises UsageError when something else is there (`sharing`: who shares it, for the message)."""
    target.mkdir(parents=True, exist_ok=True)
    link.parent.mkdir(parents=True, exist_ok=True)
    relative = os.path.relpath(target, link.parent)
    if link.is_symlink() and os.readlink(link) == relative:
        return
    if link.exists() or link.is_symlink():
        raise UsageError(f'{link} exists and is not the link to {target} that {sharing}; '
                         'remove it')
    link.symlink_to(relative, target_is_directory=True)


def run(config, workdir: pathlib.Path, stages: list[str] | None, manifest: pathlib.Path,
        cohort: Cohort, run_fold: Callable, fields: list[str]) -> None:
    """Runs every fold (`run_fold(config, workdir, stages)`, resumable), then the summary.

    Args:
        manifest: the cohort's manifest (given or generated); cohort: it, loaded once, for the
            summary's labels and cases; fields: every stage's settings, recorded per fold.
    """
    if any(r.split for r in read_manifest(manifest, tuple(config.data.classes), paths_required=
                                          not feature_sources.importing(config))):
        raise UsageError('data.fold=-1 (every fold) needs a manifest without a split column: '
                         'its splits would be the same in every fold')
    failure = None
    if sharding.is_leader():  # the shared scans were made with these settings, or are new
        try:
            provenance.check_and_record(workdir, 'scans', provenance.settings_of(
                config, list(SCAN_FIELDS)), 'scans/, qc/, thumbnails/ and folds/')
        except UsageError as error:
            failure = error
    sharding.raise_together(failure)
    folds = config.data.folds
    if sharding.is_leader():
        artifacts.save_text(workdir / 'cohort.csv',
                            folds_csv(cohort, folds, config.data.split_seed,
                                      config.data.fold_by))
    todo = []
    for fold in range(folds):
        settings = provenance.settings_of(fold_config(config, fold, manifest), fields)
        done = fold_dir(workdir, fold) / 'done.json'
        if not stages and done.exists() and json.loads(done.read_text()) == settings:
            logging.info('cross-validation: fold %d/%d finished earlier; skipped', fold + 1, folds)
        else:
            todo.append((fold, settings))
    if todo and (not stages or TRAINING_STAGES & set(stages)):
        scan_then_check_folds(config, workdir, manifest, cohort, run_fold, first=todo[0][0])
    for fold, settings in todo:
        folder = fold_dir(workdir, fold)
        if sharding.is_leader():
            link_shared(workdir, fold)
        sharding.barrier(f'pathjax fold {fold} links')
        logging.info('cross-validation: fold %d/%d in %s', fold + 1, folds, folder)
        run_fold(fold_config(config, fold, manifest), folder, stages)
        done = folder / 'done.json'
        if not stages and sharding.is_leader():
            artifacts.save_json(done, settings)
    if not sharding.is_leader():
        return
    missing = [k for k in range(folds)
               if not (fold_dir(workdir, k) / 'eval' / 'test' / 'predictions.csv').exists()]
    if missing:
        logging.info('cross-validation: no summary yet (folds %s have no test predictions)',
                     missing)
        return
    summary = summarize(workdir, cohort, tuple(config.data.classes), folds)
    logging.info('cross-validation: %d folds, test AUC %.3f +/- %.3f (mean +/- sd); pooled '
                 'out-of-fold AUC %.3f (95%% CI %.3f-%.3f); see %s', folds,
                 summary['mean']['auc'], summary['sd']['auc'], summary['auc'],
                 *summary['auc_ci95'], workdir / 'cv' / 'summary.json')


def scan_then_check_folds(config, workdir: pathlib.Path, manifest: pathlib.Path, cohort: Cohort,
                          run_fold: Callable, first: int) -> None:
    """Scans every slide (the tile stage of fold `first`, the first to run: the scans are
    shared; with imported features, the headers of their files), then checks that every fold can
    train (`split_check`); raises UsageError naming each fold that cannot, before any fold
    trains."""
    if feature_sources.importing(config):
        counts = split_check.imported_patch_counts(
            feature_sources.Sources.from_config(config, workdir), cohort.slides)
    else:
        if sharding.is_leader():
            link_shared(workdir, first)
        sharding.barrier(f'pathjax fold {first} links')
        run_fold(fold_config(config, first, manifest), fold_dir(workdir, first), ['tile'])
        counts = split_check.patch_counts(
            {r.slide_id: slide_file(workdir, SHARED['tiles/.scan'], r.slide_id, '.npz')
             for r in cohort.slides})
    problems, unsplit = [], [dataclasses.replace(r, split='') for r in cohort.slides]
    for fold in range(config.data.folds):
        records = assign_splits(unsplit, fractions=tuple(config.data.split_fractions),
                                folds=config.data.folds, fold=fold, seed=config.data.split_seed,
                                fold_by=config.data.fold_by)
        problems += [f'fold {fold}: {problem}' for problem in split_check.problems(
            config, records, counts)]
    if problems:
        raise UsageError(
            f'cross-validation: {len(problems)} problem(s) found after the tile stage, before '
            'any fold trains (the tiles are kept):\n  ' + '\n  '.join(problems)
            + f'\n  Fewer folds (data.folds={config.data.folds}), another data.split_seed or '
            'more slides give every fold what it needs.')


def folds_csv(cohort: Cohort, folds: int, seed: int, fold_by: str = 'case') -> str:
    """The cohort with the fold that tests each slide (its case's), instead of one fold's
    splits, as CSV text (the root's cohort.csv; each fold's has its splits), through
    `csv_cells`."""
    fold_of = (kfold_by_site if fold_by == 'site' else kfold_by_case)(list(cohort.slides), folds,
                                                                       seed)
    return csv_cells.to_text([
        ('slide_id', 'path', 'label', 'case_id', 'test_fold', 'manifest_line'),
        *((s.slide_id, s.path, s.label, s.case_id, fold_of[s.case_id], s.line)
          for s in cohort.slides)])


def summarize(workdir: pathlib.Path, cohort: Cohort, classes: tuple[str, ...],
              folds: int) -> dict:
    """Writes cv/summary.json, cv/summary.csv and cv/predictions.csv (the out-of-fold
    predictions of every fold's test slides); returns the summary."""
    per_fold, rows = [], []
    for fold in range(folds):
        folder = fold_dir(workdir, fold) / 'eval' / 'test'
        metrics = json.loads((folder / 'metrics.json').read_text())
        per_fold.append({'fold': fold, **{k: metrics[k] for k in
                                          (*SUMMARY_METRICS, 'auc_ci95', 'num_slides')},
                         'patient_auc': metrics['patient']['auc']})
        slide_ids, labels, probabilities = report.read_predictions(folder / 'predictions.csv',
                                                                   classes)
        rows += [(fold, s, label, p) for s, label, p in zip(slide_ids, labels, probabilities)]
    case_of = {r.slide_id: r.case_id for r in cohort.slides}
    labels = np.array([label for _, _, label, _ in rows], np.int64)
    probabilities = np.array([p for _, _, _, p in rows], np.float64).reshape(len(rows), -1)
    pooled = split_metrics(probabilities, labels, [case_of[s] for _, s, _, _ in rows], classes)
    values = {k: np.array([f[k] if f[k] is not None else np.nan for f in per_fold], np.float64)
              for k in (*SUMMARY_METRICS, 'patient_auc')}
    summary = to_json_safe({
        'folds': per_fold,
        'mean': {k: float(np.nanmean(v)) for k, v in values.items()},
        'sd': {k: float(np.nanstd(v, ddof=1)) for k, v in values.items()},
        'auc': pooled['auc'], 'auc_ci95': pooled['auc_ci95'], 'pooled': pooled,
        'num_slides': len(rows), 'classes': list(classes)})
    out = workdir / 'cv'
    artifacts.save_json(out / 'summary.json', summary)
    artifacts.save_text(out / 'summary.csv', _summary_csv(summary))
    artifacts.save_text(out / 'predictions.csv', csv_cells.to_text([
        ['fold', *report.prediction_columns(classes)],
        *([fold, slide_id, classes[label], *(f'{p:.6f}' for p in row),
           classes[int(np.argmax(row))]] for fold, slide_id, label, row in rows)]))
    return summary


def _summary_csv(summary: dict) -> str:
    """One row per fold, then mean, sd and the pooled out-of-fold row (through `csv_cells`)."""
    columns = [*SUMMARY_METRICS, 'auc_ci95_low', 'auc_ci95_high', 'patient_auc', 'num_slides']

    def cell(value):
        return '' if value is None else f'{value:.4f}' if isinstance(value, float) else value

    rows = [['fold', *columns]]
    for fold in summary['folds']:
        low, high = fold['auc_ci95']
        rows.append([fold['fold'], *(cell(fold[k]) for k in SUMMARY_METRICS), cell(low),
                     cell(high), cell(fold['patient_auc']), fold['num_slides']])
    for name in ('mean', 'sd'):
        rows.append([name, *(cell(summary[name][k]) for k in SUMMARY_METRICS), '', '',
                     cell(summary[name]['patient_auc']), ''])
    pooled = summary['pooled']
    rows.append(['pooled', *(cell(pooled[k]) for k in SUMMARY_METRICS),
                 *(cell(x) for x in pooled['auc_ci95']), cell(pooled['patient']['auc']),
                 summary['num_slides']])
    return csv_cells.to_text(rows)


def deploy(config, workdir: pathlib.Path, manifest: pathlib.Path, run_predict: Callable) -> None:
    """`--stages predict` on a cross-validation root: every fold's model predicts the new slides
    (`run_predict(fold_config, fold_folder)`: tiled, normalized and extracted as that fold was
    trained), then `<workdir>/predict/predictions.csv` holds their mean probabilities (as STAMP's
    deployment does) and each fold's as its own columns (`fold<k>_prob_<class>`), with
    `metrics.json` and `roc.png` for the labelled rows."""
    classes = tuple(config.data.classes)
    for fold in range(config.data.folds):
        logging.info('predict: with the model of fold %d/%d', fold + 1, config.data.folds)
        run_predict(fold_config(config, fold, manifest), fold_dir(workdir, fold))
    if not sharding.is_leader():
        return
    per_fold = [report.read_predictions(fold_dir(workdir, k) / 'predict' / 'predictions.csv',
                                        classes) for k in range(config.data.folds)]
    slide_ids = list(dict.fromkeys(s for ids, _, _ in per_fold for s in ids))
    found = [dict(zip(ids, zip(labels, probs))) for ids, labels, probs in per_fold]
    mean = np.asarray([np.mean([f[s][1] for f in found if s in f], axis=0) for s in slide_ids])
    labels = np.asarray([next(f[s][0] for f in found if s in f) for s in slide_ids])
    extra = {f'fold{k}_prob_{name}': [f'{f[s][1][c]:.6f}' if s in f else '' for s in slide_ids]
             for k, f in enumerate(found) for c, name in enumerate(classes)}
    folder = workdir / 'predict'
    report.write_predictions(folder / 'predictions.csv', slide_ids, labels, mean, classes, extra)
    labelled = labels != UNLABELLED
    if labelled.any():
        report.write_metrics(folder / 'metrics.json', {
            **split_metrics(mean[labelled], labels[labelled], list(np.asarray(slide_ids)[labelled]),
                            classes), 'split': 'predict', 'folds': config.data.folds,
            'unlabelled_slides': int((~labelled).sum())})
        report.plot_roc(folder / 'roc.png', mean[labelled], labels[labelled], classes)
    logging.info('predict: the mean of %d fold models for %d slides: %s', config.data.folds,
                 len(slide_ids), folder / 'predictions.csv')
