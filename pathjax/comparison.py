"""Slide models compared on the same features and folds, in one command, with paired tests.

`compare.models` lists slide models (`slide_net.model` names), each optionally with slide_net
overrides: `'graph_transformer:gcn_layers=0,position_encoding=False'`. With cross-validation
(`data.folds` = K, `data.fold` = -1), every fold runs the whole method once with the first model
(`<workdir>/folds/<k>/`: tiles, patch dataset, feature network, features and graphs are made once
per fold), then trains and evaluates each other model on the same fold's features and splits in
`<workdir>/folds/<k>/compare/<name>/` (its features, graphs, tiles and thumbnails are the fold's,
linked). A killed comparison resumes at the model and fold where it stopped (each model's
training resumes from its checkpoints; finished work is skipped).

`compare/summary.json` and `.csv` hold per model: the fold test AUCs, their mean and sd, the
pooled out-of-fold AUC with its DeLong 95% CI, and against the first model the paired difference
of pooled AUCs with a 95% CI and DeLong's p-value for correlated ROC curves, at slide and patient
level (binary tasks); `compare/forest.png` draws the differences.
"""

import json
import pathlib
from typing import Callable

import numpy as np
from absl import logging

from pathjax import artifacts, csv_cells, delong
from pathjax.cross_validation import fold_dir, link_folder
from pathjax.evaluate import figures, report
from pathjax.metrics import auprc, per_case, to_json_safe
from pathjax.models.slide.factory import MODELS
from pathjax.runtime import sharding
from pathjax.slide_paths import id_problem

LINKED = ('features', 'graphs', 'tiles', 'thumbnails', 'imported')  # a fold's, for each model
MODEL_STAGES = ['train_slide', 'evaluate']


def parse_entry(entry: str, slide_net) -> tuple[str, dict]:
    """('abmil', {}) or ('graph_transformer', {'gcn_layers': 0}) from a `compare.models` entry;
    values take the type of the slide_net field they set. Raises ValueError naming the problem."""
    model, _, overrides = entry.partition(':')
    if model not in MODELS:
        raise ValueError(f'compare.models: {entry!r}: model {model!r} is not one of '
                         f'{", ".join(MODELS)}')
    values = {}
    for item in filter(None, overrides.split(',')):
        field, sep, text = item.partition('=')
        if not sep or field not in slide_net or field == 'model':
            raise ValueError(f'compare.models: {entry!r}: {item!r} is not <slide_net field>='
                             f'<value> (fields: {", ".join(k for k in slide_net if k != "model")})')
        kind = type(slide_net[field])
        if kind is bool:
            if text not in ('True', 'False', 'true', 'false', '1', '0'):
                raise ValueError(f'compare.models: {entry!r}: {field} takes True or False')
            values[field] = text in ('True', 'true', '1')
        else:
            try:
                values[field] = kind(text)
            except ValueError:
                raise ValueError(f'compare.models: {entry!r}: {field}={text!r} is not a '
                                 f'{kind.__name__}') from None
    return model, values


def folder_name(entry: str) -> str:
    """A model entry as a folder name: 'graph_transformer:gcn_layers=0' ->
    'graph_transformer__gcn_layers-0'."""
    return entry.replace(':', '__').replace('=', '-').replace(',', '_')


def problems(config) -> list[str]:
    """What is wrong with `compare.models` ([] when nothing or no comparison)."""
    entries = list(config.compare.models)
    if not entries:
        return []
    found = []
    if not (config.data.folds > 1 and config.data.fold == -1):
        found.append('compare.models compares models over folds: set data.folds=K (> 1) and '
                     'data.fold=-1')
    for entry in entries:
        try:
            parse_entry(entry, config.slide_net)
        except ValueError as error:
            found.append(str(error))
            continue
        why = id_problem(folder_name(entry))
        if why:
            found.append(f'compare.models: {entry!r} cannot name a folder ({why})')
    if len(set(entries)) != len(entries):
        found.append(f'compare.models: an entry is listed twice: {entries}')
    return found


def model_config(config, entry: str):
    """`config` with the entry's model and slide_net overrides."""
    config = config.copy_and_resolve_references()
    model, values = parse_entry(entry, config.slide_net)
    config.slide_net.model = model
    for field, value in values.items():
        config.slide_net[field] = value
    return config


def model_dir(fold_folder: pathlib.Path, entry: str) -> pathlib.Path:
    return fold_folder / 'compare' / folder_name(entry)


def link_fold(fold_folder: pathlib.Path, folder: pathlib.Path) -> None:
    """(Process 0) Points a model's folder at its fold's features, graphs, tiles, thumbnails and
    imported layouts (relative links)."""
    for name in LINKED:
        link_folder(folder / name, fold_folder / name, 'the comparison shares between models')


def fold_runner(config, run_stages: Callable) -> Callable:
    """run_fold(fold_config, folder, stages) for cross-validation: the fold's stages with the
    first model, then each other model's training and evaluation on the fold's features."""
    first, *others = config.compare.models

    def run_fold(fold_config, folder: pathlib.Path, stages) -> None:
        run_stages(model_config(fold_config, first), folder, stages)
        wanted = [s for s in MODEL_STAGES if not stages or s in stages]
        for entry in others if wanted else []:
            target = model_dir(folder, entry)
            if sharding.is_leader():
                link_fold(folder, target)
            sharding.barrier(f'pathjax compare links {target}')
            logging.info('compare: %s in %s', entry, target)
            run_stages(model_config(fold_config, entry), target, wanted)

    return run_fold


def predictions_of(workdir: pathlib.Path, entry: str, first: bool, folds: int,
                   classes: tuple[str, ...]) -> tuple[dict, list]:
    """({slide id: (label, probabilities [C])} pooled over the folds' test splits, fold AUCs)
    of one model."""
    pooled, aucs = {}, []
    for fold in range(folds):
        folder = fold_dir(workdir, fold)
        folder = (folder if first else model_dir(folder, entry)) / 'eval' / 'test'
        ids, labels, probabilities = report.read_predictions(folder / 'predictions.csv', classes)
        pooled.update(zip(ids, zip(labels, probabilities)))
        aucs.append(json.loads((folder / 'metrics.json').read_text())['auc'])
    return pooled, aucs


def compare_level(scores: dict[str, np.ndarray], labels: np.ndarray, first: str) -> dict:
    """Per model: pooled AUC with its DeLong CI, AUPRC and Brier score, and the paired test
    against `first`, on positive-class probabilities [S] (same slides or cases, same order) and
    labels [S]."""
    out = {}
    for entry, values in scores.items():
        auc, low, high = delong.auc_ci(values, labels)
        row = {'auc': auc, 'auc_ci95': [low, high], 'auprc': auprc(values, labels == 1),
               'brier': float(np.mean((values - labels) ** 2))}
        if entry != first:
            test = delong.paired_test(values, scores[first], labels)
            row['vs_first'] = {'difference': test['difference'], 'ci95': test['ci'],
                               'p_value': test['p_value']}
        out[entry] = row
    return out


def summarize(workdir: pathlib.Path, cohort, config) -> dict | None:
    """(Process 0) compare/summary.json, .csv and forest.png from every model's fold
    predictions; None (with a log line) while some are missing."""
    classes, folds = tuple(config.data.classes), config.data.folds
    entries = list(config.compare.models)
    try:
        results = {e: predictions_of(workdir, e, i == 0, folds, classes)
                   for i, e in enumerate(entries)}
    except FileNotFoundError as error:
        logging.info('compare: no summary yet (%s)', error)
        return None
    slide_ids = sorted(set.intersection(*(set(p) for p, _ in results.values())))
    labels = np.asarray([results[entries[0]][0][s][0] for s in slide_ids])
    summary = {'models': entries, 'classes': list(classes), 'num_slides': len(slide_ids),
               'folds': {e: aucs for e, (_, aucs) in results.items()},
               'mean': {e: float(np.nanmean(a)) for e, (_, a) in results.items()},
               'sd': {e: float(np.nanstd(a, ddof=1)) for e, (_, a) in results.items()}}
    if len(classes) == 2:
        scores = {e: np.asarray([p[s][1][1] for s in slide_ids]) for e, (p, _) in results.items()}
        summary['slide'] = compare_level(scores, labels, entries[0])
        case_of = {r.slide_id: r.case_id for r in cohort.slides}
        cases = [case_of[s] for s in slide_ids]
        case_ids, _, case_labels = per_case(cases, scores[entries[0]], labels)
        summary['patient'] = compare_level(
            {e: per_case(cases, v, labels)[1][:, 0] for e, v in scores.items()}, case_labels,
            entries[0])
        summary['num_cases'] = len(case_ids)
    summary = to_json_safe(summary)
    out = workdir / 'compare'
    artifacts.save_json(out / 'summary.json', summary)
    artifacts.save_text(out / 'summary.csv', summary_csv(summary))
    if 'slide' in summary:
        plot_forest(out / 'forest.png', summary)
    return summary


def summary_csv(summary: dict) -> str:
    """One row per model and level (through `csv_cells`)."""
    rows = [['model', 'level', 'fold_aucs', 'mean_auc', 'sd_auc', 'pooled_auc', 'ci95_low',
             'ci95_high', 'auprc', 'brier', 'difference_vs_first', 'difference_ci95_low',
             'difference_ci95_high', 'p_value']]

    def cell(value):
        return '' if value is None else f'{value:.4f}' if isinstance(value, float) else value

    for entry in summary['models']:
        for level in ('slide', 'patient'):
            row = summary.get(level, {}).get(entry)
            if row is None:
                continue
            paired = row.get('vs_first', {})
            low, high = paired.get('ci95') or (None, None)
            rows.append([entry, level, ' '.join(cell(a) for a in summary['folds'][entry]),
                         cell(summary['mean'][entry]), cell(summary['sd'][entry]),
                         cell(row['auc']), *map(cell, row['auc_ci95']), cell(row['auprc']),
                         cell(row['brier']), cell(paired.get('difference')), cell(low), cell(high),
                         cell(paired.get('p_value'))])
    return csv_cells.to_text(rows)


def plot_forest(path: pathlib.Path, summary: dict) -> None:
    """Each model's pooled AUC minus the first model's, with its 95% CI (slide level)."""
    entries = summary['models']
    rows = summary['slide']
    fig = figures.new(figsize=(7, 0.5 * len(entries) + 1.4), dpi=100)
    axes = fig.add_subplot()
    for i, entry in enumerate(entries):
        paired = rows[entry].get('vs_first')
        if paired and paired['difference'] is not None:
            low, high = paired['ci95']
            axes.errorbar(paired['difference'], i, xerr=[[paired['difference'] - low],
                                                         [high - paired['difference']]],
                          fmt='o', color='#1f77b4', capsize=3)
    axes.axvline(0.0, color='grey', linestyle='--', linewidth=1)
    axes.set_yticks(range(len(entries)))
    axes.set_yticklabels([f'{e} (AUC {rows[e]["auc"]:.3f})' if rows[e]['auc'] is not None
                          else e for e in entries])
    axes.invert_yaxis()
    axes.set_xlabel(f'pooled out-of-fold AUC minus {entries[0]}\'s (95% CI, DeLong)')
    figures.save(fig, path, bbox_inches='tight')
