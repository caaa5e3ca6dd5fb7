"""DeLong's test for the AUCs of correlated ROC curves (numpy only).

DeLong, DeLong & Clarke-Pearson (1988), "Comparing the areas under two or more correlated
receiver operating characteristic curves: a nonparametric approach", Biometrics 44: each
model's AUC is the Mann-Whitney statistic (ties count 1/2), and the covariance of the AUCs of
models scored on the same slides comes from their structural components. These are computed
with midranks in O(S log S) per model (Sun & Xu 2014, "Fast implementation of DeLong's
algorithm for comparing the areas under correlated receiver operating characteristic curves",
IEEE Signal Processing Letters 21).

A patient-level comparison is the same computation on per-patient scores (e.g. the mean score
of each patient's slides) and labels. Undefined results are NaN: every result when a class is
absent, variances and everything derived from them when a class has a single member.
"""

import math
import statistics

import numpy as np


def auc_and_covariance(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """AUCs of K models scored on the same slides, and DeLong's covariance of those AUCs.

    Args:
        scores: float [K, S], each model's positive-class scores for the same S slides.
        labels: [S], 1 (or True) for positive slides, 0 (or False) for negative ones.

    Returns:
        aucs [K] (ties count 1/2) and covariance [K, K] = S10 / m + S01 / n, with m (n) the
        number of positives (negatives) and S10 (S01) the sample covariance of the models'
        structural components over the positives (negatives). All NaN when a class is absent;
        the covariance is NaN when a class has a single slide.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if scores.ndim != 2:
        raise ValueError(f'scores must be [K, S], got shape {scores.shape}')
    if not np.isfinite(scores).all():
        raise ValueError('scores must be finite')
    positives = _positives(labels, scores.shape[1])
    num_models, num_positive = scores.shape[0], int(positives.sum())
    num_negative = scores.shape[1] - num_positive
    if num_positive == 0 or num_negative == 0:
        return np.full(num_models, math.nan), np.full((num_models, num_models), math.nan)
    x, y = scores[:, positives], scores[:, ~positives]
    combined = _midranks(np.concatenate([x, y], axis=1))
    # V10[k, i]: fraction of negatives that positive i outscores; V01[k, j]: fraction of
    # positives that outscore negative j (ties 1/2 in both).
    v10 = (combined[:, :num_positive] - _midranks(x)) / num_negative
    v01 = 1.0 - (combined[:, num_positive:] - _midranks(y)) / num_positive
    covariance = _covariance(v10) / num_positive + _covariance(v01) / num_negative
    return v10.mean(axis=1), covariance


def paired_test(scores_a: np.ndarray, scores_b: np.ndarray, labels: np.ndarray,
                level: float = 0.95) -> dict[str, float | list[float] | int]:
    """DeLong's two-sided test of AUC(a) = AUC(b) for two models scored on the same slides.

    Args:
        scores_a: float [S], model a's positive-class scores.
        scores_b: float [S], model b's, for the same slides in the same order.
        labels: [S], 1 (or True) for positive slides.
        level: confidence level of the interval, in (0, 1).

    Returns:
        `auc_a`, `auc_b`, `difference` (auc_a - auc_b), `ci` ([low, high], normal interval of
        the difference), `z`, `p_value`, `n_positive`, `n_negative`. When the variance of the
        difference is 0 (e.g. identical scores) the interval is [difference, difference] and
        z is 0 with p = 1 if the difference is 0, else z = +-inf with p = 0.
    """
    scores_a, scores_b = np.asarray(scores_a), np.asarray(scores_b)
    if scores_a.ndim != 1 or scores_a.shape != scores_b.shape:
        raise ValueError(f'scores_a and scores_b must be [S] vectors of one length, got shapes '
                         f'{scores_a.shape} and {scores_b.shape}')
    quantile = _normal_quantile(level)
    (auc_a, auc_b), covariance = auc_and_covariance(np.stack([scores_a, scores_b]), labels)
    difference = float(auc_a - auc_b)
    variance = float(covariance[0, 0] + covariance[1, 1] - 2.0 * covariance[0, 1])
    if variance > 0.0 or math.isnan(variance):
        z, half_width = difference / math.sqrt(variance), quantile * math.sqrt(variance)
    else:  # 0, or below 0 by rounding
        z = 0.0 if difference == 0.0 else math.copysign(math.inf, difference)
        half_width = 0.0
    num_positive = int(_positives(labels, scores_a.shape[0]).sum())
    return {'auc_a': float(auc_a), 'auc_b': float(auc_b), 'difference': difference,
            'ci': [difference - half_width, difference + half_width], 'z': z,
            'p_value': math.erfc(abs(z) / math.sqrt(2.0)), 'n_positive': num_positive,
            'n_negative': scores_a.shape[0] - num_positive}


def auc_ci(scores: np.ndarray, labels: np.ndarray, level: float = 0.95
           ) -> tuple[float, float, float]:
    """AUC with DeLong's normal confidence interval.

    Args:
        scores: float [S], positive-class scores.
        labels: [S], 1 (or True) for positive slides.
        level: confidence level, in (0, 1).

    Returns:
        (auc, low, high), the interval clipped to [0, 1].
    """
    scores = np.asarray(scores)
    if scores.ndim != 1:
        raise ValueError(f'scores must be an [S] vector, got shape {scores.shape}')
    quantile = _normal_quantile(level)
    aucs, covariance = auc_and_covariance(scores[None], labels)
    auc, half_width = float(aucs[0]), quantile * math.sqrt(covariance[0, 0])
    low, high = np.clip([auc - half_width, auc + half_width], 0.0, 1.0)
    return auc, float(low), float(high)


def _positives(labels: np.ndarray, num_slides: int) -> np.ndarray:
    """labels [S] in {0, 1} -> bool [S], checking the length against num_slides."""
    labels = np.asarray(labels)
    if labels.shape != (num_slides,):
        raise ValueError(f'labels must have shape ({num_slides},), got {labels.shape}')
    if not np.isin(labels, (0, 1)).all():
        raise ValueError('labels must be 0 or 1')
    return labels.astype(bool)


def _normal_quantile(level: float) -> float:
    """The standard normal quantile at (1 + level) / 2."""
    if not 0.0 < level < 1.0:
        raise ValueError(f'level must be in (0, 1), got {level}')
    return statistics.NormalDist().inv_cdf((1.0 + level) / 2.0)


def _midranks(values: np.ndarray) -> np.ndarray:
    """Ranks within each row, 1-based, tied values sharing their mean rank: [K, N] -> [K, N]."""
    order = np.argsort(values, axis=1, kind='stable')
    ordered = np.take_along_axis(values, order, axis=1)
    index = np.broadcast_to(np.arange(values.shape[1]), values.shape)
    starts = np.ones(values.shape, dtype=bool)  # first position of each run of equal values
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    ends = np.ones(values.shape, dtype=bool)  # last position of each run
    ends[:, :-1] = starts[:, 1:]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=1)
    last = np.minimum.accumulate(np.where(ends, index, values.shape[1])[:, ::-1], axis=1)[:, ::-1]
    ranks = np.empty(values.shape)
    np.put_along_axis(ranks, order, (first + last) / 2.0 + 1.0, axis=1)
    return ranks


def _covariance(components: np.ndarray) -> np.ndarray:
    """Sample covariance (ddof 1) of the rows: [K, N] -> [K, K]; NaN when N < 2."""
    num_models, num_samples = components.shape
    if num_samples < 2:
        return np.full((num_models, num_models), math.nan)
    centered = components - components.mean(axis=1, keepdims=True)
    return centered @ centered.T / (num_samples - 1)
