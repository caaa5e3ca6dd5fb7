"""Slide metrics vs scikit-learn (test dependency only), with ties and degenerate splits."""

import contextlib
import json
import math
import warnings

import numpy as np
import pytest
from sklearn import metrics as sk

from pathjax import metrics

BINARY = ['wild_type', 'mutant']
THREE = ['a', 'b', 'c']


def random_predictions(seed: int, num_slides: int, num_classes: int, decimals: int = 1):
    """Probabilities [N, C] rounded so that many scores tie, and labels [N] with every class."""
    rng = np.random.default_rng(seed)
    labels = np.concatenate([np.arange(num_classes),
                             rng.integers(0, num_classes, num_slides - num_classes)])
    logits = rng.normal(size=(num_slides, num_classes)) + 1.5 * np.eye(num_classes)[labels]
    probabilities = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return np.round(probabilities, decimals), labels


@contextlib.contextmanager
def no_warnings():
    """A block in which any warning fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        yield


@pytest.mark.parametrize('seed', range(5))
def test_roc_curve_matches_sklearn_with_ties(seed):
    probabilities, labels = random_predictions(seed, 60, 2)
    positives = labels == 1
    fpr, tpr, thresholds = metrics.roc_curve(probabilities[:, 1], positives)
    sk_fpr, sk_tpr, sk_thresholds = sk.roc_curve(positives, probabilities[:, 1],
                                                 drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr)
    np.testing.assert_allclose(tpr, sk_tpr)
    np.testing.assert_allclose(thresholds, sk_thresholds)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert thresholds[0] == np.inf and np.all(np.diff(thresholds) < 0)
    assert len(thresholds) == len(np.unique(probabilities[:, 1])) + 1


@pytest.mark.parametrize('seed', range(5))
def test_roc_auc_matches_sklearn_and_mann_whitney(seed):
    probabilities, labels = random_predictions(seed, 50, 2)
    scores, positives = probabilities[:, 1], labels == 1
    auc = metrics.roc_auc(scores, positives)
    assert auc == pytest.approx(sk.roc_auc_score(positives, scores), abs=1e-12)
    difference = scores[positives][:, None] - scores[~positives][None, :]
    mann_whitney = ((difference > 0) + 0.5 * (difference == 0)).mean()
    assert auc == pytest.approx(mann_whitney, abs=1e-12)


def test_roc_auc_perfect_inverted_constant():
    positives = np.array([0, 0, 1, 1, 0, 1], bool)
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert metrics.roc_auc(scores, positives) == 1.0
    assert metrics.roc_auc(-scores, positives) == 0.0
    assert metrics.roc_auc(np.full(6, 0.5), positives) == 0.5
    fpr, tpr, _ = metrics.roc_curve(np.full(6, 0.5), positives)
    np.testing.assert_array_equal(fpr, [0, 1])
    np.testing.assert_array_equal(tpr, [0, 1])


def test_roc_auc_single_class_or_empty_is_nan_without_warning():
    with no_warnings():
        assert math.isnan(metrics.roc_auc([0.1, 0.9, 0.4], [True, True, True]))
        assert math.isnan(metrics.roc_auc([0.1, 0.9, 0.4], [False, False, False]))
        assert math.isnan(metrics.roc_auc([], []))
        fpr, tpr, thresholds = metrics.roc_curve([0.2, 0.3], [True, True])
    assert np.isnan(fpr).all() and np.array_equal(tpr, [0, 0.5, 1])
    assert thresholds[0] == np.inf


def test_roc_rejects_mismatched_lengths():
    with pytest.raises(ValueError, match='differ in length'):
        metrics.roc_curve([0.1, 0.2], [True])
    with pytest.raises(ValueError, match='NaN'):
        metrics.roc_auc([0.1, np.nan], [True, False])


def assert_matches_sklearn(result, probabilities, labels, class_names):
    num_classes = len(class_names)
    predictions = probabilities.argmax(axis=1)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore')  # sklearn warns about 0/0; we compare the values
        assert result['accuracy'] == pytest.approx(sk.accuracy_score(labels, predictions))
        assert result['balanced_accuracy'] == pytest.approx(
            sk.balanced_accuracy_score(labels, predictions))
        average = 'binary' if num_classes == 2 else 'macro'
        assert result['f1'] == pytest.approx(
            sk.f1_score(labels, predictions, average=average, zero_division=0))
        precision, recall, _, support = sk.precision_recall_fscore_support(
            labels, predictions, labels=range(num_classes), zero_division=0)
    np.testing.assert_array_equal(
        result['confusion_matrix'],
        sk.confusion_matrix(labels, predictions, labels=range(num_classes)))
    for c, name in enumerate(class_names):
        one_vs_rest = (sk.roc_auc_score(labels == c, probabilities[:, c])
                       if 0 < (labels == c).sum() < len(labels) else pytest.approx(math.nan,
                                                                                   nan_ok=True))
        assert result['per_class'][name] == {
            'support': support[c], 'recall': pytest.approx(recall[c]),
            'precision': pytest.approx(precision[c]), 'auc': pytest.approx(one_vs_rest)}
    assert result['num_slides'] == len(labels)
    assert result['class_names'] == class_names


@pytest.mark.parametrize('seed', range(4))
def test_binary_slide_metrics_match_sklearn(seed):
    probabilities, labels = random_predictions(seed, 40, 2)
    with no_warnings():
        result = metrics.slide_metrics(probabilities, labels, BINARY)
    assert_matches_sklearn(result, probabilities, labels, BINARY)
    assert result['auc'] == pytest.approx(sk.roc_auc_score(labels, probabilities[:, 1]))


@pytest.mark.parametrize('seed', range(4))
def test_three_class_slide_metrics_match_sklearn(seed):
    probabilities, labels = random_predictions(seed, 45, 3, decimals=2)
    probabilities /= probabilities.sum(axis=1, keepdims=True)  # sklearn's ovr wants rows of sum 1
    with no_warnings():
        result = metrics.slide_metrics(probabilities, labels, THREE)
    assert_matches_sklearn(result, probabilities, labels, THREE)
    assert result['auc'] == pytest.approx(
        sk.roc_auc_score(labels, probabilities, multi_class='ovr', average='macro'))


def test_three_class_with_absent_class():
    probabilities, labels = random_predictions(7, 30, 3)
    labels = np.where(labels == 2, 0, labels)  # class c has no slides, but may be predicted
    probabilities[0] = [0.1, 0.1, 0.8]
    with no_warnings():
        result = metrics.slide_metrics(probabilities, labels, THREE)
    assert_matches_sklearn(result, probabilities, labels, THREE)
    expected_auc = np.mean([sk.roc_auc_score(labels == c, probabilities[:, c]) for c in (0, 1)])
    assert result['auc'] == pytest.approx(expected_auc)
    assert result['per_class']['c']['support'] == 0


def test_perfect_and_inverted_classifiers():
    labels = np.array([0, 1, 0, 1, 1, 0])
    perfect = np.eye(2)[labels] * 0.8 + 0.1
    result = metrics.slide_metrics(perfect, labels, BINARY)
    assert (result['auc'], result['accuracy'], result['balanced_accuracy'], result['f1']) == (
        1.0, 1.0, 1.0, 1.0)
    assert result['confusion_matrix'] == [[3, 0], [0, 3]]
    result = metrics.slide_metrics(perfect[:, ::-1], labels, BINARY)
    assert (result['auc'], result['accuracy'], result['balanced_accuracy'], result['f1']) == (
        0.0, 0.0, 0.0, 0.0)
    assert result['confusion_matrix'] == [[0, 3], [3, 0]]


def test_all_predictions_one_class_gives_zero_precision_without_warning():
    probabilities, labels = random_predictions(3, 20, 3)
    probabilities[:] = [0.2, 0.5, 0.3]
    with no_warnings():
        result = metrics.slide_metrics(probabilities, labels, THREE)
    assert_matches_sklearn(result, probabilities, labels, THREE)
    assert result['per_class']['a']['precision'] == 0.0
    assert result['per_class']['b']['recall'] == 1.0
    assert result['auc'] == 0.5
    assert result['balanced_accuracy'] == pytest.approx(1 / 3)


def test_single_class_split():
    labels = np.zeros(5, np.int64)
    probabilities = np.array([[0.9, 0.1], [0.4, 0.6], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    with no_warnings():
        result = metrics.slide_metrics(probabilities, labels, BINARY)
    assert math.isnan(result['auc'])
    assert result['accuracy'] == 0.8 and result['balanced_accuracy'] == 0.8
    assert result['f1'] == 0.0  # no true positives of class 1: 0 / 1
    assert_matches_sklearn(result, probabilities, labels, BINARY)


def test_empty_split():
    with no_warnings():
        result = metrics.slide_metrics(np.zeros((0, 3)), np.zeros(0, np.int64), THREE)
    for key in ('auc', 'accuracy', 'balanced_accuracy', 'f1'):
        assert math.isnan(result[key]), key
    assert result['num_slides'] == 0
    assert result['confusion_matrix'] == [[0] * 3] * 3
    assert {k: v for k, v in result['per_class']['a'].items() if k != 'auc'} == {
        'support': 0, 'recall': 0.0, 'precision': 0.0}
    assert math.isnan(result['per_class']['a']['auc'])
    json.dumps(metrics.to_json_safe(result), allow_nan=False)
    # An empty list of labels works too.
    assert metrics.slide_metrics([], [], BINARY)['num_slides'] == 0


def test_rejects_bad_shapes_and_labels():
    with pytest.raises(ValueError, match='expected probabilities'):
        metrics.slide_metrics(np.zeros((4, 3)), np.zeros(4, np.int64), BINARY)
    with pytest.raises(ValueError, match='expected probabilities'):
        metrics.slide_metrics(np.zeros((4, 2)), np.zeros(3, np.int64), BINARY)
    with pytest.raises(ValueError, match='class indices'):
        metrics.slide_metrics(np.zeros((2, 2)), np.array([0, 2]), BINARY)
    with pytest.raises(ValueError, match='integer'):
        metrics.slide_metrics(np.zeros((2, 2)), np.array([0.0, 1.0]), BINARY)
    with pytest.raises(ValueError, match='of 1 slides are NaN'):
        metrics.slide_metrics(np.array([[0.5, 0.5], [np.nan, np.nan]]), np.array([0, 1]), BINARY)


def test_to_json_safe():
    value = {'a': math.nan, 'b': [1.0, math.inf, -math.inf, np.float32(2.5)],
             'c': (np.int64(3), np.bool_(True), 'text', None),
             'd': np.array([[np.nan, 1.0]]), 'e': {'f': np.float64('nan')}}
    safe = metrics.to_json_safe(value)
    assert safe == {'a': None, 'b': [1.0, None, None, 2.5], 'c': [3, True, 'text', None],
                    'd': [[None, 1.0]], 'e': {'f': None}}
    assert type(safe['c'][0]) is int and type(safe['c'][1]) is bool
    json.dumps(safe, allow_nan=False)


def test_auc_ci95_covers_the_true_auc_about_95_percent_of_the_time():
    """Scores N(0, 1) for negatives and N(d, 1) for positives have AUC Phi(d / sqrt 2); over 100
    simulated test sets of 40 + 40 slides, the bootstrap interval holds it about 95% of the time
    (percentile intervals run a little narrow at this size)."""
    rng = np.random.default_rng(0)
    shift = 1.0
    true_auc = 0.5 * (1 + math.erf(shift / 2))  # Phi(d / sqrt 2)
    covered, widths = 0, []
    for trial in range(100):
        labels = np.repeat([0, 1], 40)
        scores = rng.normal(size=80) + shift * labels
        probabilities = np.stack([1 - scores, scores], axis=1)  # only class 1's column is used
        low, high = metrics.auc_ci95(probabilities, labels, resamples=200, seed=trial)
        assert low <= metrics.macro_auc(probabilities, labels) <= high
        covered += low <= true_auc <= high
        widths.append(high - low)
    assert 85 <= covered <= 99, covered
    # The normal approximation of the AUC's standard error (Hanley & McNeil) at this size.
    q1, q2 = true_auc / (2 - true_auc), 2 * true_auc ** 2 / (1 + true_auc)
    se = math.sqrt((true_auc * (1 - true_auc) + 39 * (q1 - true_auc ** 2)
                    + 39 * (q2 - true_auc ** 2)) / 1600)
    assert np.median(widths) == pytest.approx(2 * 1.96 * se, rel=0.2)


def test_auc_ci95_is_seeded_and_undefined_with_one_class():
    probabilities, labels = random_predictions(0, 50, 3)
    first = metrics.auc_ci95(probabilities, labels, seed=3)
    assert metrics.auc_ci95(probabilities, labels, seed=3) == first
    assert metrics.auc_ci95(probabilities, labels, seed=4) != first
    assert first[0] < metrics.macro_auc(probabilities, labels) < first[1]
    with no_warnings():
        assert all(math.isnan(x) for x in metrics.auc_ci95(probabilities, np.zeros(50, int)))


def test_per_case_averages_each_cases_slides():
    rng = np.random.default_rng(0)
    case_ids = [f'case{i}' for i in rng.integers(0, 12, 40)]
    case_label = {c: int(c[4:]) % 2 for c in case_ids}
    labels = np.array([case_label[c] for c in case_ids])
    probabilities = rng.dirichlet([1, 1], 40)
    cases, case_probabilities, case_labels = metrics.per_case(case_ids, probabilities, labels)
    assert cases == list(dict.fromkeys(case_ids))
    for case, row, label in zip(cases, case_probabilities, case_labels):
        mine = [i for i, c in enumerate(case_ids) if c == case]
        np.testing.assert_allclose(row, probabilities[mine].mean(axis=0))
        assert label == case_label[case]


def test_split_metrics_at_slide_and_patient_level():
    probabilities, labels = random_predictions(1, 30, 2)
    one_slide_each = metrics.split_metrics(probabilities, labels, [f'c{i}' for i in range(30)],
                                           BINARY)
    assert one_slide_each['patient']['auc'] == one_slide_each['auc']
    assert one_slide_each['patient']['num_cases'] == 30
    paired = [f'c{i // 2}' for i in range(30)]  # two slides a case, labels made to agree
    labels = labels[::2].repeat(2)
    result = metrics.split_metrics(probabilities, labels, paired, BINARY)
    cases, case_probabilities, case_labels = metrics.per_case(paired, probabilities, labels)
    assert result['patient']['num_cases'] == 15
    assert result['patient']['auc'] == pytest.approx(
        sk.roc_auc_score(case_labels, case_probabilities[:, 1]))
    assert result['auc'] == pytest.approx(sk.roc_auc_score(labels, probabilities[:, 1]))
    assert json.loads(json.dumps(metrics.to_json_safe(result)))['auc_ci95'] == \
        result['auc_ci95']


# Clinical metrics.

# Ten slides worked by hand. Called positive when score >= threshold.
WORKED_SCORES = np.array([0.95, 0.85, 0.7, 0.6, 0.55, 0.5, 0.45, 0.3, 0.2, 0.1])
WORKED_LABELS = np.array([1, 0, 1, 1, 0, 1, 0, 0, 1, 0])


def binary_predictions(seed: int, num_slides: int, decimals: int = 1):
    """Binary probabilities [N, 2] with many tied scores and labels [N] with both classes."""
    probabilities, labels = random_predictions(seed, num_slides, 2, decimals)
    return np.stack([1 - probabilities[:, 1], probabilities[:, 1]], axis=1), labels


@pytest.mark.parametrize('seed', range(6))
def test_auprc_matches_sklearn_with_ties(seed):
    probabilities, labels = binary_predictions(seed, 50, decimals=seed % 3 + 1)
    with no_warnings():
        value = metrics.auprc(probabilities[:, 1], labels)
    assert value == pytest.approx(sk.average_precision_score(labels, probabilities[:, 1]),
                                  abs=1e-12)
    assert metrics.auprc(probabilities[:, 1], labels == 1) == value  # bool labels work the same


def test_auprc_worked_example_and_degenerate_inputs():
    # Recall steps of 1/5 at the positives' scores, each times the precision there.
    expected = 0.2 * (1 / 1 + 2 / 3 + 3 / 4 + 4 / 6 + 5 / 9)
    assert metrics.auprc(WORKED_SCORES, WORKED_LABELS) == pytest.approx(expected, abs=1e-12)
    assert metrics.auprc(WORKED_SCORES, WORKED_LABELS) == pytest.approx(
        sk.average_precision_score(WORKED_LABELS, WORKED_SCORES), abs=1e-12)
    with no_warnings():
        assert math.isnan(metrics.auprc(WORKED_SCORES, np.zeros(10, int)))
        assert math.isnan(metrics.auprc(WORKED_SCORES, np.ones(10, int)))
        assert math.isnan(metrics.auprc([], []))
        # All scores equal: one point, recall 1 at precision = the prevalence.
        assert metrics.auprc(np.full(10, 0.3), WORKED_LABELS) == pytest.approx(0.5)
    assert metrics.auprc(np.full(10, 0.3), WORKED_LABELS) == pytest.approx(
        sk.average_precision_score(WORKED_LABELS, np.full(10, 0.3)))
    assert metrics.auprc(WORKED_LABELS.astype(float), WORKED_LABELS) == 1.0


@pytest.mark.parametrize('seed', range(4))
def test_brier_matches_sklearn(seed):
    probabilities, labels = binary_predictions(seed, 40, decimals=2)
    with no_warnings():
        value = metrics.brier(probabilities, labels)
    assert value == pytest.approx(sk.brier_score_loss(labels, probabilities[:, 1]), abs=1e-12)
    assert value == pytest.approx(np.mean((probabilities[:, 1] - labels) ** 2), abs=1e-12)
    # The multi-class sum form would be twice the binary score.
    assert np.mean(np.sum((probabilities - np.eye(2)[labels]) ** 2, axis=1)) == pytest.approx(
        2 * value)

    probabilities, labels = random_predictions(seed, 45, 3, decimals=2)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    value = metrics.brier(probabilities, labels)
    assert value == pytest.approx(np.mean([sum((p[c] - (c == y)) ** 2 for c in range(3))
                                           for p, y in zip(probabilities, labels)]), abs=1e-12)
    assert value == pytest.approx(sk.brier_score_loss(labels, probabilities, labels=range(3)),
                                  abs=1e-12)


def test_brier_degenerate_inputs():
    with no_warnings():
        assert math.isnan(metrics.brier(np.zeros((0, 2)), np.zeros(0, int)))
        assert math.isnan(metrics.brier(np.zeros((0, 3)), np.zeros(0, int)))
        assert metrics.brier([[1.0, 0.0], [0.0, 1.0]], [0, 1]) == 0.0
        assert metrics.brier([[0.0, 1.0], [1.0, 0.0]], [0, 1]) == 1.0
        assert metrics.brier(np.full((4, 2), 0.5), np.zeros(4, int)) == 0.25  # one class
        assert metrics.brier([[0, 0, 1.0]], [0]) == 2.0
    with pytest.raises(ValueError, match='class indices'):
        metrics.brier([[0.5, 0.5]], [2])


def brute_force_youden(scores, labels):
    """Every distinct score as a threshold (score >= threshold is positive), J in exact
    fractions; (best J, the largest best score, the midpoint between it and the next lower
    distinct score or the score itself when it is the lowest)."""
    from fractions import Fraction
    positives = np.asarray(labels) == 1
    distinct = sorted(set(np.asarray(scores, float).tolist()), reverse=True)
    best = None
    for i, threshold in enumerate(distinct):
        called = np.asarray(scores) >= threshold
        j = (Fraction(int((called & positives).sum()), int(positives.sum()))
             + Fraction(int((~called & ~positives).sum()), int((~positives).sum())) - 1)
        if best is None or j > best[0]:
            below = distinct[i + 1] if i + 1 < len(distinct) else threshold
            best = (j, threshold, (threshold + below) / 2)
    return best


@pytest.mark.parametrize('seed', range(8))
def test_youden_threshold_matches_brute_force_and_roc(seed):
    probabilities, labels = binary_predictions(seed, 40 + seed, decimals=seed % 3 + 1)
    scores = probabilities[:, 1]
    with no_warnings():
        threshold = metrics.youden_threshold(scores, labels)
    best_j, best_score, midpoint = brute_force_youden(scores, labels)
    assert threshold == midpoint
    assert best_score in scores
    fpr, tpr, thresholds = sk.roc_curve(labels, scores, drop_intermediate=False)
    j = tpr - fpr
    assert float(best_j) == pytest.approx(j.max(), abs=1e-12)
    assert best_score == thresholds[np.isclose(j, j.max(), rtol=0, atol=1e-12)].max()
    # The midpoint calls the same slides positive as the best score does.
    assert np.array_equal(scores >= threshold, scores >= best_score)
    point = metrics.operating_point(scores, labels, threshold)
    assert point['sensitivity'] + point['specificity'] - 1 == pytest.approx(float(best_j))


def test_youden_ties_take_the_largest_threshold_compared_exactly():
    # J = 3/5 - 1/5 at 0.6 and 4/5 - 2/5 at 0.5: equal, but 0.6 - 0.2 < 0.8 - 0.4 in floats.
    assert 0.6 - 0.2 < 0.8 - 0.4
    # 0.6 wins; the next lower score is 0.55.
    assert metrics.youden_threshold(WORKED_SCORES, WORKED_LABELS) == (0.6 + 0.55) / 2
    assert brute_force_youden(WORKED_SCORES, WORKED_LABELS)[1:] == (0.6, (0.6 + 0.55) / 2)
    # Every threshold ties at J = 0 for a useless ranking: the largest score wins.
    assert metrics.youden_threshold([0.2, 0.9, 0.2, 0.9], [0, 0, 1, 1]) == (0.9 + 0.2) / 2


def test_youden_degenerate_inputs():
    with no_warnings():
        assert math.isnan(metrics.youden_threshold(WORKED_SCORES, np.zeros(10, int)))
        assert math.isnan(metrics.youden_threshold(WORKED_SCORES, np.ones(10, bool)))
        assert math.isnan(metrics.youden_threshold([], []))
        assert metrics.youden_threshold(np.full(10, 0.4), WORKED_LABELS) == 0.4
        # Perfect separation: halfway between the highest negative and the lowest positive.
        assert metrics.youden_threshold([0.1, 0.35, 0.4, 0.8], [0, 0, 1, 1]) == (0.35 + 0.4) / 2


def test_operating_point_worked_example():
    point = metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 0.5)
    # The six slides scoring >= 0.5 hold four positives; of the four below, one is positive.
    assert point == {'threshold': 0.5, 'tp': 4, 'fp': 2, 'tn': 3, 'fn': 1,
                     'sensitivity': 0.8, 'specificity': 0.6, 'ppv': pytest.approx(4 / 6),
                     'npv': 0.75}
    point = metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 0.6)
    assert point == {'threshold': 0.6, 'tp': 3, 'fp': 1, 'tn': 4, 'fn': 2,
                     'sensitivity': 0.6, 'specificity': 0.8, 'ppv': 0.75,
                     'npv': pytest.approx(4 / 6)}
    assert all(type(point[k]) is int for k in ('tp', 'fp', 'tn', 'fn'))


@pytest.mark.parametrize('seed', range(4))
def test_operating_point_matches_direct_counts(seed):
    probabilities, labels = binary_predictions(seed, 40)
    scores = probabilities[:, 1]
    for threshold in (0.0, 0.3, 0.5, 0.55, 1.0, 1.5):
        point = metrics.operating_point(scores, labels, threshold)
        called = (scores >= threshold).astype(int)
        (tn, fp), (fn, tp) = sk.confusion_matrix(labels, called, labels=[0, 1])
        assert (point['tp'], point['fp'], point['tn'], point['fn']) == (tp, fp, tn, fn)
        assert tp == np.sum((scores >= threshold) & (labels == 1))
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')  # 0/0 where nothing is called on one side
            expected = {'sensitivity': tp / (tp + fn), 'specificity': tn / (tn + fp),
                        'ppv': np.float64(tp) / (tp + fp), 'npv': np.float64(tn) / (tn + fn)}
        for key, value in expected.items():
            assert point[key] == pytest.approx(value, nan_ok=True), (threshold, key)


def test_operating_point_undefined_ratios_are_nan_and_json_null():
    with no_warnings():
        point = metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 2.0)  # nothing called
        single = metrics.operating_point(WORKED_SCORES, np.zeros(10, int), 0.5)
        empty = metrics.operating_point([], [], 0.5)
        undefined = metrics.operating_point(WORKED_SCORES, WORKED_LABELS, math.nan)
    assert (point['tp'], point['fp'], point['tn'], point['fn']) == (0, 0, 5, 5)
    assert math.isnan(point['ppv']) and point['sensitivity'] == 0.0 and point['npv'] == 0.5
    assert math.isnan(single['sensitivity']) and single['npv'] == 1.0
    assert single['ppv'] == 0.0 and single['specificity'] == 0.4
    assert (empty['tp'], empty['fp'], empty['tn'], empty['fn']) == (0, 0, 0, 0)
    assert all(math.isnan(empty[k]) for k in ('sensitivity', 'specificity', 'ppv', 'npv'))
    assert all(math.isnan(v) for v in undefined.values())
    safe = metrics.to_json_safe(point)
    assert safe['ppv'] is None
    json.dumps(metrics.to_json_safe([point, single, empty, undefined]), allow_nan=False)


def direct_calibration(probabilities, positives, bins):
    """Bins by a loop over their edges i / bins (the last closed), empty ones left out."""
    rows, gaps = [], 0.0
    for i in range(bins):
        lower, upper = i / bins, (i + 1) / bins
        inside = [(p, y) for p, y in zip(probabilities, positives)
                  if lower <= p < upper or (i == bins - 1 and p == upper)]
        if inside:
            predicted = sum(p for p, _ in inside) / len(inside)
            observed = sum(y for _, y in inside) / len(inside)
            rows.append({'lower': lower, 'upper': upper, 'count': len(inside),
                         'mean_predicted': pytest.approx(predicted, abs=1e-12),
                         'observed': pytest.approx(observed, abs=1e-12)})
            gaps += len(inside) * abs(observed - predicted)
    return rows, gaps / len(probabilities)


@pytest.mark.parametrize('seed,bins', [(0, 10), (1, 10), (2, 5), (3, 7), (4, 1)])
def test_calibration_bins_match_a_direct_loop(seed, bins):
    probabilities, labels = binary_predictions(seed, 60, decimals=1)  # scores on bin edges
    scores = np.concatenate([probabilities[:, 1], [0.0, 1.0, 0.3]])
    positives = np.concatenate([labels == 1, [False, True, True]])
    with no_warnings():
        result = metrics.calibration_bins(scores, positives, bins)
    rows, ece = direct_calibration(scores.tolist(), positives.tolist(), bins)
    assert result['bins'] == rows
    assert result['ece'] == pytest.approx(ece, abs=1e-12)
    assert sum(b['count'] for b in result['bins']) == len(scores)


def test_calibration_bins_edges_empty_bins_and_degenerate_inputs():
    result = metrics.calibration_bins([0.0, 0.3, 0.3, 1.0], [False, True, False, True])
    assert [(b['lower'], b['count']) for b in result['bins']] == [(0.0, 1), (0.3, 2), (0.9, 1)]
    assert [b['observed'] for b in result['bins']] == [0.0, 0.5, 1.0]
    assert result['ece'] == pytest.approx((0 + 2 * 0.2 + 0) / 4)
    with no_warnings():
        empty = metrics.calibration_bins([], [])
        constant = metrics.calibration_bins(np.full(8, 0.25), np.arange(8) % 4 == 0)
        single = metrics.calibration_bins([0.1, 0.9], [False, False])
    assert empty == {'bins': [], 'ece': pytest.approx(math.nan, nan_ok=True)}
    assert constant['bins'] == [{'lower': 0.2, 'upper': 0.3, 'count': 8, 'mean_predicted': 0.25,
                                 'observed': 0.25}] and constant['ece'] == 0.0
    assert single['ece'] == pytest.approx(0.5)
    json.dumps(metrics.to_json_safe(empty), allow_nan=False)


def test_clinical_metrics_binary():
    probabilities = np.stack([1 - WORKED_SCORES, WORKED_SCORES], axis=1)
    threshold = metrics.youden_threshold(WORKED_SCORES, WORKED_LABELS)
    result = metrics.clinical_metrics(probabilities, WORKED_LABELS, BINARY, threshold)
    assert list(result) == ['auprc', 'brier', 'at_0.5', 'at_threshold', 'calibration']
    assert result['auprc'] == metrics.auprc(WORKED_SCORES, WORKED_LABELS)
    assert result['brier'] == pytest.approx(sk.brier_score_loss(WORKED_LABELS, WORKED_SCORES))
    assert result['at_0.5'] == metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 0.5)
    assert result['at_threshold'] == metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 0.575)
    at_score = metrics.operating_point(WORKED_SCORES, WORKED_LABELS, 0.6)  # the same calls
    assert {**result['at_threshold'], 'threshold': 0.6} == at_score
    assert result['calibration'] == metrics.calibration_bins(WORKED_SCORES, WORKED_LABELS)
    assert 'at_threshold' not in metrics.clinical_metrics(probabilities, WORKED_LABELS, BINARY)
    # A probability of exactly 0.5 counts as positive at 0.5 (the argmax says class 0).
    tied = metrics.clinical_metrics([[0.5, 0.5]], [1], BINARY)
    assert tied['at_0.5']['tp'] == 1
    assert metrics.slide_metrics([[0.5, 0.5]], [1], BINARY)['confusion_matrix'] == [[0, 0], [1, 0]]


def test_clinical_metrics_three_classes():
    probabilities, labels = random_predictions(2, 45, 3, decimals=2)
    probabilities /= probabilities.sum(axis=1, keepdims=True)
    result = metrics.clinical_metrics(probabilities, labels, THREE, threshold=0.3)
    assert set(result) == {'brier', 'auprc'}
    assert result['brier'] == pytest.approx(
        sk.brier_score_loss(labels, probabilities, labels=range(3)))
    for c, name in enumerate(THREE):
        assert result['auprc'][name] == pytest.approx(
            sk.average_precision_score(labels == c, probabilities[:, c]), abs=1e-12)
    labels = np.where(labels == 2, 0, labels)
    with no_warnings():
        absent = metrics.clinical_metrics(probabilities, labels, THREE)
    assert math.isnan(absent['auprc']['c']) and not math.isnan(absent['auprc']['a'])


@pytest.mark.parametrize('class_names', [BINARY, THREE])
def test_clinical_metrics_degenerate_splits_without_warnings(class_names):
    num_classes = len(class_names)
    with no_warnings():
        empty = metrics.clinical_metrics(np.zeros((0, num_classes)), np.zeros(0, int),
                                         class_names, 0.5)
        single = metrics.clinical_metrics(np.full((6, num_classes), 1 / num_classes),
                                          np.zeros(6, int), class_names, math.nan)
    assert math.isnan(empty['brier'])
    json.dumps(metrics.to_json_safe([empty, single]), allow_nan=False)
    if num_classes == 2:
        assert math.isnan(single['auprc']) and single['brier'] == 0.25
        assert single['at_0.5']['fp'] == 6 and math.isnan(single['at_0.5']['sensitivity'])
        assert all(math.isnan(v) for v in single['at_threshold'].values())
        assert single['calibration']['ece'] == 0.5


def test_split_metrics_add_clinical_at_slide_and_patient_level():
    probabilities, labels = binary_predictions(5, 30)
    paired = [f'c{i // 2}' for i in range(30)]
    labels = labels[::2].repeat(2)
    plain = metrics.split_metrics(probabilities, labels, paired, BINARY)
    result = metrics.split_metrics(probabilities, labels, paired, BINARY, threshold=0.4)
    assert set(result) == {'auc', 'accuracy', 'balanced_accuracy', 'f1', 'confusion_matrix',
                           'num_slides', 'class_names', 'per_class', 'auc_ci95', 'clinical',
                           'patient'}
    assert set(result['patient']) == set(result) - {'patient', 'num_slides'} | {'num_cases'}
    safe = metrics.to_json_safe
    assert safe(result['clinical']) == safe(
        metrics.clinical_metrics(probabilities, labels, BINARY, 0.4))
    _, case_probabilities, case_labels = metrics.per_case(paired, probabilities, labels)
    assert safe(result['patient']['clinical']) == safe(
        metrics.clinical_metrics(case_probabilities, case_labels, BINARY, 0.4))
    assert result['patient']['clinical']['at_threshold']['tp'] + \
        result['patient']['clinical']['at_threshold']['fn'] == case_labels.sum()
    assert 'at_threshold' not in plain['clinical'] and 'at_threshold' not in \
        plain['patient']['clinical']
    assert safe({k: v for k, v in plain.items() if k not in ('clinical', 'patient')}) == safe(
        {k: v for k, v in result.items() if k not in ('clinical', 'patient')})
    json.dumps(safe(result), allow_nan=False)
