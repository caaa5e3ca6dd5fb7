"""DeLong's test vs the O(mn) definitions, pROC's published aSAH results, and scikit-learn."""

import math
import warnings

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pathjax import delong

# pROC's `aSAH` data set (R package pROC, data/aSAH.RData; Turck et al. 2010, Intensive Care
# Medicine 36: 107-115), in its row order: outcome (1 = Poor, the cases; 0 = Good), WFNS grade
# (an ordered factor, as its level), and the S100B and NDKA biomarkers.
ASAH_POOR = ('00001101001011001011101000000000100110110000000001100010001010011101101111'
             '000110100000010000000000001111110001000')
ASAH_WFNS = ('11113254125255125225211112121134214541425511241125521251222151125214524414'
             '121421232421451154221113125225552445111')
ASAH_S100B = """
0.13 0.14 0.1 0.04 0.13 0.1 0.47 0.16 0.18 0.1 0.12 0.1 0.44 0.71 0.04 0.08 0.49 0.04 0.07
0.33 0.09 0.09 0.07 0.11 0.07 0.17 0.07 0.11 0.13 0.19 0.05 0.16 0.41 0.14 0.34 0.35 0.48
0.09 0.96 0.25 0.5 0.46 0.16 0.07 0.43 0.45 0.11 0.08 0.09 0.86 0.52 0.08 0.06 0.13 2.07 0.1
0.14 0.15 0.07 0.06 0.77 0.05 0.09 0.3 0.03 0.09 0.04 0.23 0.7 0.09 0.27 0.71 0.08 0.26 0.08
0.16 0.09 0.13 0.1 0.08 0.11 0.33 0.11 0.28 0.07 0.1 0.32 0.22 0.07 0.05 0.24 0.38 0.1 0.15
0.08 0.14 0.1 0.07 0.04 0.19 0.56 0.14 0.58 0.32 0.82 0.74 0.15 0.47 0.17 0.44 0.15 0.5 0.48
"""
ASAH_NDKA = """
3.01 8.54 8.09 10.42 17.4 12.75 6.0 13.2 15.54 6.01 15.96 17.86 5.18 8.9 13.41 20.75 11.6
16.11 32.37 54.82 32.41 49.94 40.34 9.47 6.29 12.53 6.54 6.3 80.3 12.8 9.8 9.81 9.85 18.21
5.03 14.04 21.93 8.02 7.42 8.38 6.59 9.63 13.12 7.96 14.34 41.43 7.63 7.06 12.59 13.56 3.87
9.44 7.66 12.98 419.19 27.19 22.27 9.95 21.22 11.73 10.4 58.83 6.39 11.09 12.22 13.67 17.21
22.63 12.9 9.7 21.57 8.23 72.57 15.54 10.51 10.6 14.57 5.19 9.63 4.61 21.48 17.3 12.71 9.44
11.07 19.46 10.83 5.37 11.97 7.75 9.83 10.55 28.49 8.53 12.57 12.9 46.83 11.68 12.67 9.01
9.57 34.06 11.72 14.26 47.61 11.67 24.58 10.33 13.87 15.89 22.43 6.79 13.45
"""


def asah():
    """labels [113] and the markers' scores {'wfns', 's100b', 'ndka': [113]}."""
    labels = np.array([int(c) for c in ASAH_POOR])
    scores = {'wfns': np.array([float(c) for c in ASAH_WFNS]),
              's100b': np.array(ASAH_S100B.split(), dtype=float),
              'ndka': np.array(ASAH_NDKA.split(), dtype=float)}
    assert all(len(s) == 113 for s in scores.values()) and labels.sum() == 41
    return labels, scores


def direct_delong(scores, labels):
    """DeLong et al. (1988) by their definitions, O(m n) per model: aucs [K], covariance [K, K]."""
    positives = labels.astype(bool)
    v10, v01 = [], []
    for row in scores:
        x, y = row[positives][:, None], row[~positives][None, :]
        psi = (x > y) + 0.5 * (x == y)  # [m, n]
        v10.append(psi.mean(axis=1))  # structural component of each positive
        v01.append(psi.mean(axis=0))  # ... and of each negative
    v10, v01 = np.array(v10), np.array(v01)
    s10, s01 = np.cov(v10), np.cov(v01)
    return v10.mean(axis=1), s10 / positives.sum() + s01 / (~positives).sum()


def random_scores(seed, num_models, num_positive, num_negative, decimals=1):
    """Scores [K, S] rounded so that many tie, and shuffled labels [S] with both classes."""
    rng = np.random.default_rng(seed)
    labels = np.r_[np.ones(num_positive, int), np.zeros(num_negative, int)]
    rng.shuffle(labels)
    signal = rng.uniform(0.2, 1.5, size=(num_models, 1))
    scores = np.round(rng.normal(size=(num_models, labels.size)) + signal * labels, decimals)
    return scores, labels


@pytest.mark.parametrize('seed, num_positive, num_negative', [(0, 17, 29), (1, 40, 9), (2, 3, 5)])
def test_matches_direct_computation_with_ties(seed, num_positive, num_negative):
    scores, labels = random_scores(seed, 3, num_positive, num_negative)
    aucs, covariance = delong.auc_and_covariance(scores, labels)
    expected_aucs, expected_covariance = direct_delong(scores, labels)
    assert aucs.shape == (3,) and covariance.shape == (3, 3)
    np.testing.assert_allclose(aucs, expected_aucs, rtol=0, atol=1e-12)
    np.testing.assert_allclose(covariance, expected_covariance, rtol=0, atol=1e-12)
    np.testing.assert_array_equal(covariance, covariance.T)


def test_matches_proc_roc_test_on_asah():
    # pROC's own tests (tests/testthat/test-roc.test.R, test-ci.auc.R; AUCs printed to 4
    # decimals in its documentation: wfns 0.8237, s100b 0.7314, ndka 0.612).
    labels, scores = asah()
    expected = [  # (a, b, z, p, ci low, ci high) of roc.test(roc(outcome, a), roc(outcome, b))
        ('wfns', 's100b', 2.20898359144091, 0.0271757822291882,
         0.0104061769564846, 0.174214419249478),
        ('wfns', 'ndka', 2.79777591868904, 0.00514557970691098,
         0.0634011709339876, 0.3600405634833566),
        ('ndka', 's100b', -1.39077002573558, 0.164295175223054,
         -0.2876917446341914, 0.0488706064228094)]
    for a, b, z, p, low, high in expected:
        result = delong.paired_test(scores[a], scores[b], labels)
        assert result['z'] == pytest.approx(z, rel=1e-10)
        assert result['p_value'] == pytest.approx(p, rel=1e-10)
        assert result['ci'] == pytest.approx([low, high], rel=1e-10)
        assert (result['n_positive'], result['n_negative']) == (41, 72)
    result = delong.paired_test(scores['s100b'], scores['wfns'], labels)
    assert (round(result['auc_a'], 4), round(result['auc_b'], 4)) == (0.7314, 0.8237)
    assert result['difference'] == pytest.approx(0.7314 - 0.8237, abs=1e-4)
    # ci.auc(roc(outcome, ndka)), DeLong's method.
    assert delong.auc_ci(scores['ndka'], labels) == pytest.approx(
        (0.611957994579946, 0.501244999271703, 0.722670989888189), rel=1e-10)


@pytest.mark.parametrize('seed', range(3))
def test_auc_matches_sklearn(seed):
    scores, labels = random_scores(seed, 2, 23, 31)
    result = delong.paired_test(scores[0], scores[1], labels)
    assert result['auc_a'] == pytest.approx(roc_auc_score(labels, scores[0]), abs=1e-12)
    assert result['auc_b'] == pytest.approx(roc_auc_score(labels, scores[1]), abs=1e-12)
    auc, low, high = delong.auc_ci(scores[0], labels > 0)  # bool labels work too
    assert auc == pytest.approx(roc_auc_score(labels, scores[0]), abs=1e-12)
    assert 0.0 <= low < auc < high <= 1.0


def test_identical_scores_and_swapped_models():
    scores, labels = random_scores(3, 2, 20, 25)
    same = delong.paired_test(scores[0], scores[0] * 2.0 + 1.0, labels)  # the same ranking
    assert (same['difference'], same['z'], same['p_value']) == (0.0, 0.0, 1.0)
    assert same['ci'] == [0.0, 0.0]
    forward = delong.paired_test(scores[0], scores[1], labels, level=0.9)
    backward = delong.paired_test(scores[1], scores[0], labels, level=0.9)
    assert backward['difference'] == -forward['difference'] != 0.0
    assert backward['z'] == pytest.approx(-forward['z'], rel=1e-12)
    assert backward['p_value'] == pytest.approx(forward['p_value'], rel=1e-12)
    assert backward['ci'] == pytest.approx([-forward['ci'][1], -forward['ci'][0]], rel=1e-12)
    wider = delong.paired_test(scores[0], scores[1], labels, level=0.99)['ci']
    assert wider[0] < forward['ci'][0] < forward['difference'] < forward['ci'][1] < wider[1]


def test_zero_variance_with_a_difference():
    labels = np.array([1, 1, 0, 0, 0])
    perfect, constant = np.array([0.9, 0.8, 0.1, 0.2, 0.3]), np.full(5, 0.5)
    result = delong.paired_test(perfect, constant, labels)
    assert (result['difference'], result['z'], result['p_value']) == (0.5, math.inf, 0.0)
    assert result['ci'] == [0.5, 0.5]
    assert delong.auc_ci(perfect, labels) == (1.0, 1.0, 1.0)


def test_undefined_cases_are_nan_without_warnings():
    scores = np.array([0.3, 0.6, 0.2, 0.9])
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for labels in ([1, 1, 1, 1], [0, 0, 0, 0]):
            result = delong.paired_test(scores, scores[::-1], labels)
            assert all(math.isnan(result[k]) for k in ('auc_a', 'auc_b', 'difference', 'z',
                                                       'p_value'))
            assert all(math.isnan(v) for v in result['ci'])
            assert (result['n_positive'] + result['n_negative']) == 4
            assert all(math.isnan(v) for v in delong.auc_ci(scores, labels))
        # A single positive: the AUCs exist, their variances do not.
        result = delong.paired_test(scores, scores[::-1], [0, 0, 1, 0])
        assert (result['auc_a'], result['auc_b']) == (0.0, 2 / 3)
        assert math.isnan(result['z']) and math.isnan(result['p_value'])
        auc, low, high = delong.auc_ci(scores, [0, 0, 0, 1])
        assert auc == 1.0 and math.isnan(low) and math.isnan(high)


def test_invalid_inputs_raise():
    with pytest.raises(ValueError, match='labels must be 0 or 1'):
        delong.auc_ci(np.zeros(3), [0, 1, 2])
    with pytest.raises(ValueError, match='labels must have shape'):
        delong.auc_ci(np.zeros(3), [0, 1])
    with pytest.raises(ValueError, match='one length'):
        delong.paired_test(np.zeros(3), np.zeros(4), [0, 1, 1])
    with pytest.raises(ValueError, match='finite'):
        delong.auc_and_covariance(np.array([[0.1, np.nan]]), [0, 1])
    with pytest.raises(ValueError, match='level'):
        delong.auc_ci(np.zeros(2), [0, 1], level=95)


def test_p_values_are_calibrated_under_the_null():
    # Two independent noisy reads of the same underlying score: equal true AUCs, correlated
    # estimates. The rejection rate at 0.05 over 300 data sets of 200 slides should be near 5%.
    rng = np.random.default_rng(0)
    rejections = 0
    for _ in range(300):
        labels = rng.integers(0, 2, 200)
        underlying = rng.normal(size=200) + labels
        noisy = underlying + rng.normal(scale=0.7, size=(2, 200))
        rejections += delong.paired_test(noisy[0], noisy[1], labels)['p_value'] < 0.05
    assert 0.02 <= rejections / 300 <= 0.09
