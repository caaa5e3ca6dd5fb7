"""Evaluation artifacts of one split: predictions.csv, metrics.json, roc.png and (binary tasks)
a reliability diagram, each written atomically.

predictions.csv has one row per slide, `slide_id,label,prob_<class>...,pred`, with label and
pred as class names (label empty for a new slide of unknown class) and probabilities to 6
decimals; `read_predictions` reads it back. Text cells are written with `csv_cells` (no cell a
spreadsheet would run as a formula).
"""

import os
from typing import Any, Sequence

from absl import logging
import numpy as np

from pathjax import artifacts, csv_cells
from pathjax import metrics as metrics_lib
from pathjax.data.slide_sets import UNLABELLED
from pathjax.evaluate import figures


def prediction_columns(class_names: Sequence[str]) -> list[str]:
    """The header of predictions.csv."""
    return ['slide_id', 'label', *(f'prob_{name}' for name in class_names), 'pred']


def write_predictions(path: str | os.PathLike, slide_ids: Sequence[str], labels: np.ndarray,
                      probabilities: np.ndarray, class_names: Sequence[str],
                      extra: dict[str, Sequence[str]] | None = None) -> None:
    """Writes predictions.csv.

    Args:
        path: the CSV file.
        slide_ids: N slide ids.
        labels: int [N], true class indices, or UNLABELLED (written as an empty label).
        probabilities: float [N, C]; the predicted class is the argmax.
        class_names: C names, in class-index order.
        extra: more columns after those, {name: N cells}.
    """
    extra = extra or {}
    labels = np.asarray(labels).reshape(-1)
    known = labels != UNLABELLED
    probabilities, _ = metrics_lib.check_predictions(probabilities, np.where(known, labels, 0),
                                                     class_names)
    if len(slide_ids) != len(labels):
        raise ValueError(f'{len(slide_ids)} slide ids for {len(labels)} predictions')
    rows = [[slide_id, class_names[label] if label != UNLABELLED else '',
             *(f'{p:.6f}' for p in row), class_names[int(row.argmax())],
             *(cells[i] for cells in extra.values())]
            for i, (slide_id, label, row) in enumerate(zip(slide_ids, labels, probabilities))]
    artifacts.save_text(path, csv_cells.to_text([prediction_columns(class_names) + list(extra),
                                                 *rows]))


def read_predictions(path: str | os.PathLike, class_names: Sequence[str]
                     ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Reads predictions.csv back: slide ids [N], labels int [N] (UNLABELLED where empty),
    probabilities float [N, C]."""
    index = {name: c for c, name in enumerate(class_names)} | {'': UNLABELLED}
    header, *rows = csv_cells.read(path) or [None]
    if header != prediction_columns(class_names):
        raise ValueError(f'{path}: header {header} does not match classes {list(class_names)}')
    unknown = sorted({row[1] for row in rows} - index.keys())
    if unknown:
        raise ValueError(f'{path}: unknown labels {unknown}')
    slide_ids = [row[0] for row in rows]
    labels = np.array([index[row[1]] for row in rows], np.int64)
    probabilities = np.array([[float(p) for p in row[2:-1]] for row in rows], np.float64)
    return slide_ids, labels, probabilities.reshape(len(rows), len(class_names))


def write_metrics(path: str | os.PathLike, metrics: dict[str, Any]) -> None:
    """Writes `metrics` as JSON, NaN and infinities as null."""
    artifacts.save_json(path, metrics_lib.to_json_safe(metrics))


def plot_roc(path: str | os.PathLike, probabilities: np.ndarray, labels: np.ndarray,
             class_names: Sequence[str]) -> None:
    """Writes the ROC curve(s) as a PNG.

    Binary: the curve of class 1. More classes: one curve per class against the rest. Curves
    that are undefined (a class with no slides, or no others) are left out; when none is left
    the figure says so.

    Args:
        path: the PNG file.
        probabilities: float [N, C].
        labels: int [N].
        class_names: C names.
    """
    probabilities, labels = metrics_lib.check_predictions(probabilities, labels, class_names)
    fig = figures.new(figsize=(5, 5), dpi=120, layout='tight')
    axes = fig.add_subplot()
    aucs = []
    for c, scores, positives in metrics_lib.one_vs_rest(probabilities, labels):
        auc = metrics_lib.roc_auc(scores, positives)
        if np.isnan(auc):
            continue
        aucs.append(auc)
        fpr, tpr, _ = metrics_lib.roc_curve(scores, positives)
        name = class_names[c] if len(class_names) == 2 else f'{class_names[c]} vs rest'
        axes.plot(fpr, tpr, label=f'{name} (AUC = {auc:.3f})')
    title = f'ROC, {len(labels)} slides'
    if aucs:
        axes.plot([0, 1], [0, 1], linestyle='--', color='grey', label='chance')
        axes.legend(loc='lower right')
        if len(class_names) > 2:
            title += f', macro AUC = {np.mean(aucs):.3f}'
    else:
        logging.warning('ROC undefined for %s: the split needs slides of two classes', path)
        axes.text(0.5, 0.5, 'ROC undefined:\nthe split needs slides of two classes',
                  ha='center', va='center', transform=axes.transAxes)
    axes.set(xlim=(0, 1), ylim=(0, 1.01), xlabel='False positive rate',
             ylabel='True positive rate', title=title, aspect='equal')
    figures.save(fig, path)


def plot_calibration(path: str | os.PathLike, probabilities: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str]) -> bool:
    """Writes the reliability diagram of a binary task as a PNG: per non-empty bin of
    `metrics.calibration_bins` (10 equal-width bins), the observed fraction of class 1 against
    the mean predicted probability of class 1, labelled with the bin's slide count, beside the
    diagonal of perfect calibration; the title gives the ECE.

    Args:
        path: the PNG file.
        probabilities: float [N, C].
        labels: int [N].
        class_names: C names.

    Returns:
        True when written; False, writing nothing, when there are more than two classes.
    """
    probabilities, labels = metrics_lib.check_predictions(probabilities, labels, class_names)
    if len(class_names) != 2:
        return False
    calibration = metrics_lib.calibration_bins(probabilities[:, 1], labels == 1)
    fig = figures.new(figsize=(5, 5), dpi=120, layout='tight')
    axes = fig.add_subplot()
    axes.plot([0, 1], [0, 1], linestyle='--', color='grey', label='perfect calibration')
    title = f'Calibration, {len(labels)} slides'
    if calibration['bins']:
        predicted = [b['mean_predicted'] for b in calibration['bins']]
        observed = [b['observed'] for b in calibration['bins']]
        axes.plot(predicted, observed, marker='o', label=f'{class_names[1]} (bins of 0.1)')
        for b in calibration['bins']:
            axes.annotate(f'n={b["count"]}', (b['mean_predicted'], b['observed']),
                          textcoords='offset points',
                          xytext=(4, -10 if b['observed'] > 0.5 else 4), fontsize=7)
        title += f', ECE = {calibration["ece"]:.3f}'
        axes.legend(loc='upper left')
    else:
        axes.text(0.5, 0.5, 'no slides', ha='center', va='center', transform=axes.transAxes)
    axes.set(xlim=(0, 1), ylim=(-0.02, 1.02), xlabel=f'Mean predicted probability of '
             f'{class_names[1]}', ylabel=f'Observed fraction of {class_names[1]}', title=title,
             aspect='equal')
    figures.save(fig, path)
    return True
