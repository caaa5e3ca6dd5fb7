"""CSV cells no spreadsheet runs as formulas, read back as written; every CSV pathjax writes."""

import csv

import numpy as np
import pytest

from pathjax import artifacts
from pathjax import cohort as cohort_lib
from pathjax import cross_validation, csv_cells
from pathjax.evaluate import report
from pathjax.metrics import split_metrics

FORMULAS = ['=1+1', '=HYPERLINK("http://x.example","click")', '+1+2', '-2+3+cmd|calc!A0',
            '@SUM(A1:A2)', '\t=1+1', '\r=1+1']
QUOTED = ["'", "'=1+1", "''x", "'abc"]  # an apostrophe first must survive the round trip
PLAIN = ['', 'TCGA-AA-3516', 'a=b', 'slide, with "quotes"', 'line\nbreak', 'a$\\frac$b', '-',
         '-inf', '+', 'naïve 切片']
NUMBERS = ['0', '-0.25', '+3', '1e-05', '-1.5E+3', '.5', '-7.']


def is_formula(text: str) -> bool:
    """What a spreadsheet would run: text starting with a formula character, not a number."""
    return text.startswith(csv_cells.FORMULA_STARTS) and not csv_cells.NUMBER.fullmatch(text)


def raw_cells(path) -> list[str]:
    with open(path, newline='') as f:
        return [text for row in csv.reader(f) for text in row]


@pytest.mark.parametrize('text', FORMULAS)
def test_a_formula_is_written_as_text(text):
    assert csv_cells.cell(text) == "'" + text
    assert csv_cells.original(csv_cells.cell(text)) == text


@pytest.mark.parametrize('value', [*NUMBERS, 0, -3, -0.25, np.float64(-1e-7), 7])
def test_numbers_stay_numbers(value):
    assert csv_cells.cell(value) == str(value)


def test_none_is_empty_and_plain_text_is_unchanged():
    assert csv_cells.cell(None) == ''
    for text in PLAIN:
        assert csv_cells.cell(text) == (text if not is_formula(text) else "'" + text)


def test_every_string_round_trips_through_a_file(tmp_path):
    values = FORMULAS + QUOTED + PLAIN + NUMBERS
    path = tmp_path / 'cells.csv'
    artifacts.save_text(path, csv_cells.to_text([['name', 'value'], *([v, v] for v in values)]))
    assert not any(is_formula(text) for text in raw_cells(path))
    assert csv_cells.read(path) == [['name', 'value'], *([v, v] for v in values)]
    assert csv_cells.read_records(path) == [{'name': v, 'value': v} for v in values]


def test_an_empty_file_has_no_rows(tmp_path):
    path = tmp_path / 'empty.csv'
    path.write_text('')
    assert csv_cells.read(path) == [] and csv_cells.read_records(path) == []


def record(i: int, slide_id: str, label: str, case_id: str, split: str = 'test'):
    return cohort_lib.SlideRecord(slide_id=slide_id, path=f'/data/=cmd|calc/{i}.svs', label=label,
                                  case_id=case_id, split=split, line=i + 2)


CLASSES = ('-negative', '=positive')  # class names are free text
COHORT = cohort_lib.Cohort(slides=tuple(
    record(i, f'slide-{i}', CLASSES[i % 2], f'+case{i // 2}' if i % 3 else f'@case{i}')
    for i in range(8)), skipped=())


def test_cohort_csv_neutralises_text_and_reads_back(tmp_path):
    path = tmp_path / 'cohort.csv'
    artifacts.save_text(path, cohort_lib.cohort_csv(COHORT))
    assert not any(is_formula(text) for text in raw_cells(path))
    assert [(r['slide_id'], r['path'], r['label'], r['case_id'], r['split'], r['manifest_line'])
            for r in csv_cells.read_records(path)] == [
        (s.slide_id, s.path, s.label, s.case_id, s.split, str(s.line)) for s in COHORT.slides]


def test_cross_validation_csvs_neutralise_text_and_read_back(tmp_path):
    """folds_csv (the root's cohort.csv), and summarize's summary.csv and pooled predictions."""
    path = tmp_path / 'cohort.csv'
    artifacts.save_text(path, cross_validation.folds_csv(COHORT, folds=2, seed=0))
    assert not any(is_formula(text) for text in raw_cells(path))
    assert [r['case_id'] for r in csv_cells.read_records(path)] == [
        s.case_id for s in COHORT.slides]

    rng = np.random.default_rng(0)
    slides = {0: COHORT.slides[:4], 1: COHORT.slides[4:]}
    for fold, records in slides.items():
        folder = cross_validation.fold_dir(tmp_path, fold) / 'eval' / 'test'
        labels = np.array([CLASSES.index(r.label) for r in records])
        probabilities = rng.dirichlet(np.ones(2), len(records))
        report.write_predictions(folder / 'predictions.csv', [r.slide_id for r in records],
                                 labels, probabilities, CLASSES)
        report.write_metrics(folder / 'metrics.json', split_metrics(
            probabilities, labels, [r.case_id for r in records], CLASSES))
    cross_validation.summarize(tmp_path, COHORT, CLASSES, folds=2)
    for name in ('summary.csv', 'predictions.csv'):
        assert not any(is_formula(text) for text in raw_cells(tmp_path / 'cv' / name)), name
    pooled = csv_cells.read_records(tmp_path / 'cv' / 'predictions.csv')
    assert [r['slide_id'] for r in pooled] == [s.slide_id for s in COHORT.slides]
    assert [r['label'] for r in pooled] == [s.label for s in COHORT.slides]
    assert {r['pred'] for r in pooled} <= set(CLASSES)
    assert [r['fold'] for r in csv_cells.read_records(tmp_path / 'cv' / 'summary.csv')] == [
        '0', '1', 'mean', 'sd', 'pooled']
