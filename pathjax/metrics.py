"""Slide-level classification metrics (numpy only): ROC curve and AUC, accuracy, balanced
accuracy, F1, confusion matrix; and clinical ones: average precision, Brier score, Youden's
threshold, sensitivity/specificity/PPV/NPV at a threshold, calibration bins and ECE.

Definitions follow scikit-learn, with undefined values made explicit instead of warned about:
an AUC needs both classes (NaN otherwise), a ratio with a zero denominator (precision of a class
never predicted, recall of a class with no slides) is 0, and every metric of an empty split is NaN.
`to_json_safe` turns the result into plain JSON values (NaN and infinities become null).
"""

import math
from typing import Any, Sequence

import numpy as np


def roc_curve(scores: np.ndarray, positives: np.ndarray
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC curve with one point per distinct score (tied scores move together).

    Args:
        scores: float [N], higher means more likely positive.
        positives: bool [N].

    Returns:
        fpr [K], tpr [K], thresholds [K], K = distinct scores + 1: the curve starts at (0, 0)
        with threshold +inf and ends at (1, 1); point i counts `scores >= thresholds[i]` as
        positive. fpr (tpr) is NaN when there are no negatives (positives).
    """
    true_positives, false_positives, thresholds = _threshold_counts(
        *_as_vectors(scores, positives))
    return (_ratio(false_positives, false_positives[-1]),
            _ratio(true_positives, true_positives[-1]), thresholds)


def roc_auc(scores: np.ndarray, positives: np.ndarray) -> float:
    """Area under the ROC curve: scores float [N], positives bool [N] -> float.

    Equals the probability that a random positive scores above a random negative (ties count
    1/2, the Mann-Whitney U statistic over the number of pairs). NaN unless both classes occur.
    """
    scores, positives = _as_vectors(scores, positives)
    if positives.all() or not positives.any():
        return math.nan
    fpr, tpr, _ = roc_curve(scores, positives)
    return float(np.trapezoid(tpr, fpr))


def one_vs_rest(probabilities: np.ndarray, labels: np.ndarray
                ) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """The ROC problems of a C-class prediction: probabilities [N, C], labels int [N].

    Returns:
        (class index, scores [N], positives bool [N]) per problem: class 1 alone when C == 2,
        each class against the rest otherwise.
    """
    classes = [1] if probabilities.shape[1] == 2 else range(probabilities.shape[1])
    return [(c, probabilities[:, c], labels == c) for c in classes]


def slide_metrics(probabilities: np.ndarray, labels: np.ndarray,
                  class_names: Sequence[str]) -> dict[str, Any]:
    """Metrics of slide predictions; the predicted class is the argmax.

    Args:
        probabilities: float [N, C], C = len(class_names).
        labels: int [N], true class indices in [0, C).
        class_names: C names, in class-index order.

    Returns:
        `auc` (binary: of probabilities[:, 1]; more classes: mean one-vs-rest AUC over the
        classes where it is defined), `accuracy`, `balanced_accuracy` (mean recall over classes
        present in `labels`), `f1` (binary: of class 1; more classes: macro F1 over classes
        present in labels or predictions), `confusion_matrix` (C x C ints, rows true, columns
        predicted), `num_slides`, `class_names` and `per_class` (name -> support, recall,
        precision, one-vs-rest AUC). Undefined values are NaN; see `to_json_safe`.
    """
    probabilities, labels = check_predictions(probabilities, labels, class_names)
    num_slides, num_classes = probabilities.shape
    predictions = probabilities.argmax(axis=1)
    confusion = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(confusion, (labels, predictions), 1)

    hits = np.diag(confusion)
    support, predicted = confusion.sum(axis=1), confusion.sum(axis=0)
    recall, precision = _ratio(hits, support, empty=0.0), _ratio(hits, predicted, empty=0.0)
    f1 = _ratio(2 * hits, support + predicted, empty=0.0)
    f1_summary = f1[1] if num_classes == 2 else _mean(f1[(support + predicted) > 0])
    return {
        'auc': macro_auc(probabilities, labels),
        'accuracy': float(hits.sum() / num_slides) if num_slides else math.nan,
        'balanced_accuracy': _mean(recall[support > 0]),
        'f1': float(f1_summary) if num_slides else math.nan,
        'confusion_matrix': confusion.tolist(),
        'num_slides': int(num_slides),
        'class_names': list(class_names),
        'per_class': {
            name: {'support': int(support[c]), 'recall': float(recall[c]),
                   'precision': float(precision[c]),
                   'auc': roc_auc(probabilities[:, c], labels == c)}
            for c, name in enumerate(class_names)},
    }


def macro_auc(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """The `auc` of `slide_metrics`: binary, the AUC of class 1; more classes, the mean
    one-vs-rest AUC over the classes where it is defined; NaN when none is."""
    aucs = np.array([roc_auc(scores, positives)
                     for _, scores, positives in one_vs_rest(probabilities, labels)])
    return _mean(aucs[~np.isnan(aucs)])


def auc_ci95(probabilities: np.ndarray, labels: np.ndarray, resamples: int = 1000,
             seed: int = 0) -> tuple[float, float]:
    """A 95% confidence interval of `macro_auc` by a stratified percentile bootstrap: each
    resample draws, with replacement, as many slides of each class as there are (so every
    resample has the classes of the original), and the interval is the 2.5th and 97.5th
    percentiles of the resamples' AUCs. Seeded: the same inputs give the same interval.
    (NaN, NaN) when the AUC is undefined.

    Args:
        probabilities: float [N, C]; labels: int [N].
    """
    probabilities, labels = np.asarray(probabilities, np.float64), np.asarray(labels)
    if math.isnan(macro_auc(probabilities, labels)):
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    members = [np.flatnonzero(labels == c) for c in np.unique(labels)]
    values = []
    for _ in range(resamples):
        rows = np.concatenate([rng.choice(m, len(m)) for m in members])
        values.append(macro_auc(probabilities[rows], labels[rows]))
    low, high = np.percentile(values, [2.5, 97.5])
    return float(low), float(high)


def auprc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the precision-recall curve as average precision (scikit-learn's
    `average_precision_score`): sum over the distinct scores t, highest first, of
    (R(t) - R(t_prev)) P(t), with precision P and recall R counting `scores >= t` as positive
    (tied scores move together; R of the first step's predecessor is 0).

    Args:
        scores: float [N], higher means more likely positive.
        labels: bool or 0/1 [N], true (1) for the positives.

    Returns:
        The average precision; NaN unless both classes occur.
    """
    true_positives, false_positives, _ = _threshold_counts(*_as_vectors(scores, labels))
    if not true_positives[-1] or not false_positives[-1]:
        return math.nan
    precision = true_positives[1:] / (true_positives[1:] + false_positives[1:])
    return float(np.sum(np.diff(true_positives) * precision) / true_positives[-1])


def brier(probabilities: np.ndarray, labels: np.ndarray) -> float:
    """Brier score, as scikit-learn's `brier_score_loss` (0 is perfect).

    Binary (C == 2): the usual binary score mean((p_1 - y)^2) over slides, y = [label == 1], in
    [0, 1]. More classes: the multi-class form, the mean over slides of
    sum_c (p_c - [label == c])^2, in [0, 2] (for C == 2 this sum would be twice the binary score).

    Args:
        probabilities: float [N, C]; labels: int [N], class indices.

    Returns:
        The score; NaN when there are no slides.
    """
    probabilities = np.asarray(probabilities, np.float64)
    probabilities, labels = check_predictions(probabilities, labels,
                                              range(probabilities.shape[-1]))
    if not len(labels):
        return math.nan
    if probabilities.shape[1] == 2:
        return float(np.mean((probabilities[:, 1] - (labels == 1)) ** 2))
    one_hot = np.eye(probabilities.shape[1])[labels]
    return float(np.mean(np.sum((probabilities - one_hot) ** 2, axis=1)))


def youden_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """The threshold maximizing Youden's J = sensitivity + specificity - 1, where a slide is
    called positive when `score >= threshold`.

    The candidates are the distinct scores (the ROC points but its +inf start; the lowest
    score, calling every slide positive, has J = 0). J is compared exactly (as the integer
    tp * negatives - fp * positives), and of tied candidates the largest, the one with the
    highest specificity, wins. The threshold returned is the midpoint between the winning score
    and the next lower distinct score (as pROC's coords(..., 'best')): every threshold in between
    calls the same slides, and the midpoint does not sit on the edge of one class, which on
    perfectly separated validation slides would be the lowest positive score (the winner itself
    when it is the lowest score).

    Args:
        scores: float [N], higher means more likely positive.
        labels: bool or 0/1 [N], true (1) for the positives.

    Returns:
        The threshold; NaN unless both classes occur.
    """
    true_positives, false_positives, thresholds = _threshold_counts(
        *_as_vectors(scores, labels))
    num_positives, num_negatives = true_positives[-1], false_positives[-1]
    if not num_positives or not num_negatives:
        return math.nan
    scaled_j = true_positives[1:] * num_negatives - false_positives[1:] * num_positives
    candidates = thresholds[1:]  # distinct scores, descending
    best = int(np.argmax(scaled_j))  # the first maximum: the largest threshold
    if best + 1 == len(candidates):
        return float(candidates[best])
    return float((candidates[best] + candidates[best + 1]) / 2)


def operating_point(scores: np.ndarray, labels: np.ndarray, threshold: float
                    ) -> dict[str, float | int]:
    """The confusion counts and rates when slides with `score >= threshold` are called positive.

    Args:
        scores: float [N], higher means more likely positive.
        labels: bool or 0/1 [N], true (1) for the positives.
        threshold: the decision threshold; NaN (no threshold could be chosen) makes every value
            NaN.

    Returns:
        `threshold`, `sensitivity` tp / (tp + fn), `specificity` tn / (tn + fp), `ppv`
        tp / (tp + fp), `npv` tn / (tn + fn) (each NaN when its denominator is 0), and the counts
        `tp`, `fp`, `tn`, `fn` (ints).
    """
    scores, positives = _as_vectors(scores, labels)
    keys = ('sensitivity', 'specificity', 'ppv', 'npv', 'tp', 'fp', 'tn', 'fn')
    if math.isnan(threshold):
        return {'threshold': math.nan, **dict.fromkeys(keys, math.nan)}
    called = scores >= threshold
    tp, fp = int(np.sum(called & positives)), int(np.sum(called & ~positives))
    fn, tn = int(np.sum(~called & positives)), int(np.sum(~called & ~positives))
    rates = _ratio([tp, tn, tp, tn], [tp + fn, tn + fp, tp + fp, tn + fn])
    return {'threshold': float(threshold), **dict(zip(keys, [*map(float, rates), tp, fp, tn, fn]))}


def calibration_bins(probabilities_positive: np.ndarray, labels: np.ndarray, bins: int = 10
                     ) -> dict[str, Any]:
    """Reliability of predicted probabilities over `bins` equal-width bins of [0, 1].

    Bin i holds the probabilities p with i / bins <= p < (i + 1) / bins; the last bin also holds
    p = 1 (and values outside [0, 1] fall in the end bins).

    Args:
        probabilities_positive: float [N], the predicted probability of the positive class.
        labels: bool or 0/1 [N], true (1) for the positives.
        bins: the number of bins.

    Returns:
        `bins`: one dict per non-empty bin, in order: `lower`, `upper` (its edges), `count`,
        `mean_predicted` (mean probability) and `observed` (fraction of positives); and `ece`,
        the expected calibration error sum over bins of count / N |observed - mean_predicted|
        (NaN when there are no slides).
    """
    probabilities, positives = _as_vectors(probabilities_positive, labels)
    edges = np.arange(bins + 1) / bins
    index = np.clip(np.searchsorted(edges, probabilities, side='right') - 1, 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    mean_predicted = _ratio(np.bincount(index, probabilities, minlength=bins), counts)
    observed = _ratio(np.bincount(index, positives, minlength=bins), counts)
    filled = np.flatnonzero(counts)
    gaps = counts[filled] * np.abs(observed[filled] - mean_predicted[filled])
    return {
        'bins': [{'lower': float(edges[i]), 'upper': float(edges[i + 1]),
                  'count': int(counts[i]), 'mean_predicted': float(mean_predicted[i]),
                  'observed': float(observed[i])} for i in filled],
        'ece': float(gaps.sum() / len(positives)) if len(positives) else math.nan,
    }


def clinical_metrics(probabilities: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str], threshold: float | None = None
                     ) -> dict[str, Any]:
    """Clinical metrics of slide predictions.

    Args:
        probabilities: float [N, C], C = len(class_names).
        labels: int [N], true class indices in [0, C).
        class_names: C names, in class-index order.
        threshold: binary only, a decision threshold on probabilities[:, 1] chosen elsewhere
            (e.g. `youden_threshold` on the validation split), or None.

    Returns:
        Binary (the positive class is index 1, its score probabilities[:, 1]): `auprc`, `brier`,
        `at_0.5` (`operating_point` at 0.5: a slide at exactly 0.5 is called positive, whereas
        the argmax of `slide_metrics` calls it class 0), `at_threshold` (`operating_point` at
        `threshold`, only when it is given) and `calibration` (`calibration_bins`, 10 bins).
        More classes: `brier` (multi-class form) and `auprc`, class name -> one-vs-rest average
        precision.
    """
    probabilities, labels = check_predictions(probabilities, labels, class_names)
    if len(class_names) > 2:
        return {'brier': brier(probabilities, labels),
                'auprc': {name: auprc(probabilities[:, c], labels == c)
                          for c, name in enumerate(class_names)}}
    scores, positives = probabilities[:, 1], labels == 1
    result = {'auprc': auprc(scores, positives), 'brier': brier(probabilities, labels),
              'at_0.5': operating_point(scores, positives, 0.5)}
    if threshold is not None:
        result['at_threshold'] = operating_point(scores, positives, threshold)
    result['calibration'] = calibration_bins(scores, positives)
    return result


def per_case(case_ids: Sequence[str], probabilities: np.ndarray, labels: np.ndarray
             ) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Patient-level predictions: each case's slides aggregated by the mean of their
    probabilities; cases in order of first appearance.

    Args:
        case_ids: [N] the case of each slide; probabilities: float [N, C]; labels: int [N] (a
            case's slides share its label: the cohort checks it).

    Returns:
        (case ids [K], probabilities [K, C], labels [K]).
    """
    probabilities = np.asarray(probabilities, np.float64).reshape(len(case_ids), -1)
    cases = list(dict.fromkeys(case_ids))
    index = {case: i for i, case in enumerate(cases)}
    rows = np.array([index[c] for c in case_ids], np.int64)
    sums = np.zeros((len(cases), probabilities.shape[1]))
    np.add.at(sums, rows, probabilities)
    counts = np.bincount(rows, minlength=len(cases))[:, None]
    first = {}
    for row, case in enumerate(case_ids):
        first.setdefault(case, row)
    return cases, sums / np.maximum(counts, 1), np.asarray(labels)[[first[c] for c in cases]]


def split_metrics(probabilities: np.ndarray, labels: np.ndarray, case_ids: Sequence[str],
                  class_names: Sequence[str], seed: int = 0, threshold: float | None = None
                  ) -> dict[str, Any]:
    """What a paper reports for one split: `slide_metrics` with `auc_ci95` and `clinical`
    (`clinical_metrics` at `threshold`), and the same under 'patient' for the cases (slides of a
    case aggregated by `per_case`; the same threshold applies to their mean probabilities)."""
    result = {**slide_metrics(probabilities, labels, class_names),
              'auc_ci95': list(auc_ci95(probabilities, labels, seed=seed)),
              'clinical': clinical_metrics(probabilities, labels, class_names, threshold)}
    _, case_probabilities, case_labels = per_case(case_ids, probabilities, labels)
    result['patient'] = {**slide_metrics(case_probabilities, case_labels, class_names),
                         'auc_ci95': list(auc_ci95(case_probabilities, case_labels, seed=seed)),
                         'clinical': clinical_metrics(case_probabilities, case_labels,
                                                      class_names, threshold)}
    result['patient']['num_cases'] = result['patient'].pop('num_slides')
    return result


def to_json_safe(value: Any) -> Any:
    """`value` with numpy scalars and arrays as Python values and NaN/inf floats as None,
    through dicts, lists and tuples."""
    if isinstance(value, dict):
        return {key: to_json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json_safe(item) for item in
                (value.tolist() if isinstance(value, np.ndarray) else value)]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def check_predictions(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]
                      ) -> tuple[np.ndarray, np.ndarray]:
    """probabilities [N, C] and labels [N] as float64 and int64 arrays; ValueError when their
    shapes disagree with each other or with the classes, a probability is NaN or a label is not
    a class index."""
    num_classes = len(class_names)
    probabilities = np.asarray(probabilities, np.float64)
    if probabilities.size == 0:
        probabilities = probabilities.reshape(0, num_classes)
    labels = np.asarray(labels).reshape(-1)
    if probabilities.shape != (len(labels), num_classes):
        raise ValueError(f'expected probabilities [N, {num_classes}] and labels [N], got '
                         f'{probabilities.shape} and {labels.shape}')
    if np.isnan(probabilities).any():
        raise ValueError(f'probabilities of {np.isnan(probabilities).any(axis=1).sum()} slides '
                         'are NaN')
    if labels.size and not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f'labels must be integer class indices, got dtype {labels.dtype}')
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f'labels must be class indices in [0, {num_classes}), got values from '
                         f'{labels.min()} to {labels.max()}')
    return probabilities, labels.astype(np.int64)


def _as_vectors(scores: np.ndarray, positives: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, np.float64).reshape(-1)
    positives = np.asarray(positives, bool).reshape(-1)
    if scores.shape != positives.shape:
        raise ValueError(f'scores {scores.shape} and positives {positives.shape} differ in length')
    if np.isnan(scores).any():
        raise ValueError(f'{np.isnan(scores).sum()} scores are NaN')
    return scores, positives


def _threshold_counts(scores: np.ndarray, positives: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Counts at each distinct threshold, highest first, after a +inf start: true positives
    [K], false positives [K] (ints, of `scores >= threshold`) and thresholds [K], K = distinct
    scores + 1."""
    order = np.argsort(-scores, kind='stable')
    scores, positives = scores[order], positives[order]
    # The last index of each run of equal scores: one point per distinct threshold.
    last = np.flatnonzero(np.diff(scores, append=-np.inf) != 0)
    true_positives = np.concatenate([[0], np.cumsum(positives)[last]])
    false_positives = np.concatenate([[0], last + 1 - true_positives[1:]])
    return true_positives, false_positives, np.concatenate([[np.inf], scores[last]])


def _ratio(numerator: np.ndarray, denominator: np.ndarray | int,
           empty: float = math.nan) -> np.ndarray:
    """numerator / denominator elementwise, `empty` where the denominator is 0 (no warning)."""
    numerator = np.asarray(numerator, np.float64)
    denominator = np.broadcast_to(np.asarray(denominator, np.float64), numerator.shape)
    out = np.full(numerator.shape, empty)
    np.divide(numerator, denominator, out=out, where=denominator != 0)
    return out


def _mean(values: Sequence[float] | np.ndarray) -> float:
    """Mean of `values`; NaN (without a warning) when there are none."""
    values = np.asarray(values, np.float64)
    return float(values.mean()) if values.size else math.nan
