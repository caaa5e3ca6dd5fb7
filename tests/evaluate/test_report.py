"""Evaluation artifacts: predictions.csv round trip, metrics.json with nulls, ROC and
calibration PNGs; user strings are data (no spreadsheet formulas, no mathtext)."""

import csv
import json

import numpy as np
from PIL import Image
import pytest

from pathjax import csv_cells, metrics
from pathjax.evaluate import figures, heatmaps, report

BINARY = ['wild_type', 'mutant']
THREE = ['MSI', 'CIN', 'GS, other']  # a comma in a class name must survive the CSV


def random_predictions(seed: int, num_slides: int, num_classes: int):
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_slides) % num_classes)
    probabilities = rng.dirichlet(np.ones(num_classes), num_slides)
    return probabilities, labels


def assert_no_temporaries(folder):
    assert not [p.name for p in folder.iterdir() if p.name.endswith('.tmp')]


@pytest.mark.parametrize('class_names', [BINARY, THREE])
def test_predictions_round_trip(tmp_path, class_names):
    probabilities, labels = random_predictions(0, 12, len(class_names))
    slide_ids = [f'TCGA-{i:02d}' for i in range(11)] + ['slide, with "quotes"']
    path = tmp_path / 'eval' / 'test' / 'predictions.csv'
    report.write_predictions(path, slide_ids, labels, probabilities, class_names)
    assert_no_temporaries(path.parent)

    with open(path, newline='') as f:
        rows = list(csv.reader(f))
    assert rows[0] == ['slide_id', 'label', *(f'prob_{n}' for n in class_names), 'pred']
    assert [row[-1] for row in rows[1:]] == [class_names[c] for c in probabilities.argmax(1)]
    assert [row[1] for row in rows[1:]] == [class_names[c] for c in labels]
    assert all(len(p.split('.')[1]) == 6 for row in rows[1:] for p in row[2:-1])

    read_ids, read_labels, read_probabilities = report.read_predictions(path, class_names)
    assert read_ids == slide_ids
    np.testing.assert_array_equal(read_labels, labels)
    np.testing.assert_allclose(read_probabilities, probabilities, atol=5e-7)


def test_predictions_write_formulas_as_text_and_read_them_back(tmp_path):
    class_names = ['=negative', '@positive']
    slide_ids = ['=HYPERLINK("http://x.example","click")', '-2+3', "'quoted", '\t=1', 'plain']
    probabilities, labels = random_predictions(5, len(slide_ids), 2)
    path = tmp_path / 'predictions.csv'
    report.write_predictions(path, slide_ids, labels, probabilities, class_names)
    with open(path, newline='') as f:
        cells = [text for row in csv.reader(f) for text in row]
    assert not [c for c in cells if c.startswith(csv_cells.FORMULA_STARTS)]
    read_ids, read_labels, _ = report.read_predictions(path, class_names)
    assert read_ids == slide_ids
    np.testing.assert_array_equal(read_labels, labels)


def test_empty_predictions_round_trip(tmp_path):
    path = tmp_path / 'predictions.csv'
    report.write_predictions(path, [], np.zeros(0, np.int64), np.zeros((0, 2)), BINARY)
    slide_ids, labels, probabilities = report.read_predictions(path, BINARY)
    assert slide_ids == [] and labels.shape == (0,) and probabilities.shape == (0, 2)


def test_predictions_reject_mismatches(tmp_path):
    path = tmp_path / 'predictions.csv'
    probabilities, labels = random_predictions(1, 4, 2)
    with pytest.raises(ValueError, match='slide ids'):
        report.write_predictions(path, ['a', 'b'], labels, probabilities, BINARY)
    assert not path.exists()
    report.write_predictions(path, list('abcd'), labels, probabilities, BINARY)
    with pytest.raises(ValueError, match='header'):
        report.read_predictions(path, THREE)
    header, first, *rest = path.read_text().splitlines()
    path.write_text('\n'.join([header, first.replace(',wild_type,', ',WT,').replace(
        ',mutant,', ',WT,', 1), *rest]) + '\n')
    with pytest.raises(ValueError, match=r"unknown labels \['WT'\]"):
        report.read_predictions(path, BINARY)


def test_metrics_json_nan_is_null(tmp_path):
    labels = np.zeros(4, np.int64)  # one class: AUC undefined
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.7, 0.3], [0.6, 0.4]])
    result = metrics.slide_metrics(probabilities, labels, BINARY)
    path = tmp_path / 'metrics.json'
    report.write_metrics(path, result)
    assert_no_temporaries(tmp_path)
    text = path.read_text()
    assert 'NaN' not in text and '"auc": null' in text
    loaded = json.loads(text)
    assert loaded['auc'] is None
    assert loaded['accuracy'] == 0.75
    assert loaded['confusion_matrix'] == [[3, 1], [0, 0]]
    assert loaded['per_class']['mutant'] == {'support': 0, 'recall': 0.0, 'precision': 0.0,
                                             'auc': None}


def assert_png(path, min_side=300):
    with Image.open(path) as image:
        assert image.format == 'PNG'
        assert min(image.size) >= min_side and max(image.size) <= 2000
        pixels = np.asarray(image.convert('L'))
    assert pixels.std() > 5  # something was drawn
    assert path.stat().st_size > 5_000


@pytest.mark.parametrize('class_names,num_slides', [(BINARY, 30), (THREE, 30), (BINARY, 0)])
def test_plot_roc(tmp_path, class_names, num_slides):
    probabilities, labels = random_predictions(2, num_slides, len(class_names))
    path = tmp_path / 'roc.png'
    report.plot_roc(path, probabilities, labels, class_names)
    assert_png(path)
    assert_no_temporaries(tmp_path)


def test_plot_roc_single_class_says_undefined(tmp_path):
    probabilities, labels = random_predictions(3, 10, 2)
    report.plot_roc(tmp_path / 'single.png', probabilities, np.ones(10, np.int64), BINARY)
    report.plot_roc(tmp_path / 'both.png', probabilities, labels, BINARY)
    assert_png(tmp_path / 'single.png')
    with Image.open(tmp_path / 'single.png') as single, Image.open(tmp_path / 'both.png') as both:
        assert single.size == both.size
        assert not np.array_equal(np.asarray(single), np.asarray(both))


def test_plot_roc_overwrites_atomically(tmp_path):
    path = tmp_path / 'roc.png'
    path.write_bytes(b'old')
    probabilities, labels = random_predictions(4, 8, 2)
    report.plot_roc(path, probabilities, labels, BINARY)
    assert_png(path)
    assert_no_temporaries(tmp_path)


@pytest.mark.parametrize('num_slides', [30, 1, 0])
def test_plot_calibration_binary(tmp_path, saved_figures, num_slides):
    probabilities, labels = random_predictions(7, num_slides, 2)
    path = tmp_path / 'calibration.png'
    assert report.plot_calibration(path, probabilities, labels, BINARY) is True
    assert_png(path)
    assert_no_temporaries(tmp_path)
    calibration = metrics.calibration_bins(probabilities[:, 1], labels == 1)
    texts = [t.get_text() for t in figures.written_texts(saved_figures[-1])]
    assert sorted(t for t in texts if t.startswith('n=')) == sorted(
        f'n={b["count"]}' for b in calibration['bins'])
    title = saved_figures[-1].axes[0].get_title()
    if num_slides:
        assert title == f'Calibration, {num_slides} slides, ECE = {calibration["ece"]:.3f}'
    else:
        assert title == 'Calibration, 0 slides' and 'no slides' in texts


def test_plot_calibration_skips_more_classes(tmp_path):
    probabilities, labels = random_predictions(8, 12, 3)
    path = tmp_path / 'calibration.png'
    assert report.plot_calibration(path, probabilities, labels, THREE) is False
    assert not path.exists()
    with pytest.raises(ValueError, match='expected probabilities'):
        report.plot_calibration(path, probabilities, labels, BINARY)


def test_learning_curves_read_both_logs_and_note_a_missing_one(tmp_path):
    from pathjax.evaluate import learning_curves
    from pathjax.runtime import metrics_log
    feature_log = tmp_path / 'feature_net' / 'metrics.jsonl'
    for epoch in (1, 2, 3):  # step lines and an epoch summary, as feature learning writes them
        metrics_log.append(feature_log, {'epoch': epoch, 'step': 4 * epoch, 'loss': 9.0 - epoch})
        metrics_log.append(feature_log, {'epoch': epoch, 'train_loss': 9.0 - epoch,
                                         'val_accuracy': 0.5 + 0.1 * epoch})
    records = metrics_log.read(feature_log)
    assert learning_curves.epoch_series(records, 'train_loss') == ([1, 2, 3], [8.0, 7.0, 6.0])
    assert learning_curves.epoch_series(records, 'val_accuracy')[1] == pytest.approx(
        [0.6, 0.7, 0.8])
    both, one = tmp_path / 'both.png', tmp_path / 'one.png'
    learning_curves.plot_learning_curves(tmp_path, one)  # no slide_net log yet
    metrics_log.append(tmp_path / 'slide_net' / 'metrics.jsonl',
                       {'epoch': 1, 'train_loss': 0.7, 'val_loss': 0.69, 'val_auc': None})
    learning_curves.plot_learning_curves(tmp_path, both)
    pictures = [np.asarray(Image.open(p).convert('RGB')) for p in (one, both)]
    assert pictures[0].shape == pictures[1].shape
    right = pictures[0].shape[1] // 2
    # The right panel changed from a note to the slide model's curves.
    assert not np.array_equal(pictures[0][:, right:], pictures[1][:, right:])


MATH_LIKE = ['a$\\frac$b', 'price$1 and $2', 'a\\$b']  # mathtext would fail, set math, drop \


@pytest.fixture
def saved_figures(monkeypatch):
    """The figures the evaluation saves (through `figures.save`), in order."""
    saved, save = [], figures.save

    def keep(fig, path, **kwargs):
        save(fig, path, **kwargs)
        saved.append(fig)

    monkeypatch.setattr(figures, 'save', keep)
    return saved


def assert_literal(fig, strings):
    """Each string is in a text of `fig`, and every written text is drawn without mathtext/TeX."""
    texts = list(figures.written_texts(fig))
    for string in strings:
        assert any(string in t.get_text() for t in texts), (string, [t.get_text() for t in texts])
    assert all(not t.get_parse_math() and not t.get_usetex() for t in texts)


def test_user_strings_are_drawn_literally(tmp_path, saved_figures):
    from pathjax.evaluate import learning_curves
    probabilities, labels = random_predictions(6, 12, 3)
    report.plot_roc(tmp_path / 'roc.png', probabilities, labels, MATH_LIKE)
    report.plot_calibration(tmp_path / 'calibration.png', probabilities[:, :2] / probabilities[
        :, :2].sum(axis=1, keepdims=True), labels % 2, MATH_LIKE[:2])
    title = ': '.join(MATH_LIKE)
    heatmaps.draw_heatmap(tmp_path / 'heatmap.png', np.full((32, 32, 3), 200, np.uint8), (64, 64),
                          np.array([[0, 0], [16, 32]]), 16.0, np.array([1.0, -0.5]), True, title)
    learning_curves.plot_learning_curves(tmp_path, tmp_path / 'curves.png')
    roc, calibration, heatmap, curves = saved_figures
    assert_literal(roc, [f'{name} vs rest' for name in MATH_LIKE])
    assert_literal(calibration, [f'Observed fraction of {MATH_LIKE[1]}'])
    assert_literal(heatmap, [title])
    assert_literal(curves, ['feature network (AM-softmax)'])
    assert_png(tmp_path / 'roc.png')
