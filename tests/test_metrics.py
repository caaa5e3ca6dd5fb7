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
