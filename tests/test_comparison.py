"""Slide models compared on the same features and folds in one command (imported features: no
tiling, so it is quick; this is also the cross-validation test of imported features), with
paired DeLong tests against the first model."""

import dataclasses
import json

import numpy as np
import pytest

from pathjax import comparison, csv_cells, delong, pipeline
from pathjax.errors import UsageError
from pathjax.evaluate import report
from tests.interop.test_import import CLASSES, bags, import_config, write_cohort

MODELS = ('graph_transformer', 'mean', 'graph_transformer:gcn_layers=0')


@pytest.fixture(scope='module')
def compared(tmp_path_factory):
    folder = tmp_path_factory.mktemp('bags') / 'features'
    folder.mkdir()
    manifest = write_cohort(folder, bags())
    manifest.write_text('\n'.join(','.join(line.split(',')[:3])  # no split column: folds
                                  for line in manifest.read_text().splitlines()) + '\n')
    config = import_config(manifest, folder, **{'data.folds': 3, 'data.fold': -1,
                                                'train.max_steps': 8, 'compare.models': MODELS})
    workdir = tmp_path_factory.mktemp('compare')
    assert pipeline.run(config, workdir) == 0
    return workdir, config


def pooled_scores(workdir, entry, first):
    pooled, _ = comparison.predictions_of(workdir, entry, first, 3, CLASSES)
    ids = sorted(pooled)
    return ids, np.array([pooled[i][0] for i in ids]), np.array([pooled[i][1][1] for i in ids])


def test_every_model_is_tested_out_of_fold_and_paired_with_the_first(compared):
    workdir, _ = compared
    summary = json.loads((workdir / 'compare' / 'summary.json').read_text())
    assert summary['models'] == list(MODELS) and summary['num_slides'] == 18
    # The first model's folds are an ordinary cross-validation of the method, summarized too.
    assert json.loads((workdir / 'cv' / 'summary.json').read_text())['num_slides'] == 18
    ids, labels, first = pooled_scores(workdir, MODELS[0], True)
    for entry in MODELS:
        assert len(summary['folds'][entry]) == 3
        same_ids, same_labels, scores = pooled_scores(workdir, entry, entry == MODELS[0])
        assert same_ids == ids and (same_labels == labels).all()
        row = summary['slide'][entry]
        auc, low, high = delong.auc_ci(scores, labels)
        assert row['auc'] == pytest.approx(auc) and row['auc_ci95'] == pytest.approx([low, high])
        if entry == MODELS[0]:
            assert 'vs_first' not in row
            continue
        paired = delong.paired_test(scores, first, labels)
        assert row['vs_first']['difference'] == pytest.approx(paired['difference'])
        assert row['vs_first']['p_value'] == pytest.approx(paired['p_value'])
        assert entry in summary['patient']
    # The ablation really differs from the method (its own trained model), and the models share
    # the fold's features: one graph file per slide, in the fold's folder only.
    assert not np.allclose(pooled_scores(workdir, MODELS[2], False)[2], first)
    fold = workdir / 'folds' / '0'
    assert (fold / 'compare' / 'mean' / 'graphs').is_symlink()
    assert (fold / 'compare' / 'mean' / 'slide_net').is_dir()
    assert (workdir / 'compare' / 'forest.png').stat().st_size > 5000
    assert 'Model comparison' in (workdir / 'report.html').read_text()


def test_a_rerun_resumes_without_training_again(compared):
    workdir, config = compared
    predictions = workdir / 'folds' / '1' / 'compare' / 'mean' / 'eval' / 'test' / \
        'predictions.csv'
    before = report.read_predictions(predictions, CLASSES)
    predictions.unlink()
    done = workdir / 'folds' / '1' / 'done.json'
    done.unlink()  # as if killed before the fold finished
    checkpoints = sorted((workdir / 'folds' / '1' / 'compare' / 'mean' / 'slide_net').rglob('*'))
    assert pipeline.run(config, workdir) == 0
    after = report.read_predictions(predictions, CLASSES)
    assert after[0] == before[0]
    np.testing.assert_allclose(after[2], before[2], atol=1e-6)
    assert sorted((workdir / 'folds' / '1' / 'compare' / 'mean' / 'slide_net').rglob('*')) == \
        checkpoints


def test_bad_entries_are_refused_before_any_work(tmp_path):
    folder = tmp_path / 'features'
    folder.mkdir()
    manifest = write_cohort(folder, bags()[:4], splits=['train'] * 4)
    for models, message in ((('abmil', 'resnet'), "model 'resnet'"),
                            (('abmil:depth=3',), "'depth=3' is not"),
                            (('abmil:dropout=high',), 'dropout='),
                            (('abmil', 'abmil'), 'listed twice')):
        config = import_config(manifest, folder, **{'data.folds': 3, 'data.fold': -1,
                                                    'compare.models': models})
        with pytest.raises(UsageError, match=message):
            pipeline.run(config, tmp_path / 'w')
    with pytest.raises(UsageError, match='data.fold=-1'):
        pipeline.run(import_config(manifest, folder, **{'compare.models': ('abmil',)}),
                     tmp_path / 'w')


def test_new_slides_get_the_mean_of_the_fold_models(compared, tmp_path):
    """`--stages predict` on the cross-validation root: each fold's model predicts, the mean is
    the prediction, each fold's probabilities are kept as columns."""
    workdir, config = compared
    new = tmp_path / 'new'
    new.mkdir()
    renamed = [dataclasses.replace(b, slide_id=f'new_{b.slide_id}') for b in bags()[:4]]
    manifest = write_cohort(new, renamed, splits=['test'] * 4)
    config = config.copy_and_resolve_references()
    config.predict.manifest, config.predict.import_dir = str(manifest), str(new)
    assert pipeline.run(config, workdir, ['predict']) == 0
    rows = csv_cells.read_records(workdir / 'predict' / 'predictions.csv')
    assert [r['slide_id'] for r in rows] == [b.slide_id for b in renamed]
    for k in range(3):
        fold = report.read_predictions(workdir / 'folds' / str(k) / 'predict' / 'predictions.csv',
                                       CLASSES)
        assert fold[0] == [r['slide_id'] for r in rows]
        np.testing.assert_allclose([float(r[f'fold{k}_prob_positive']) for r in rows],
                                   fold[2][:, 1], atol=1e-6)
    mean = np.mean([[float(r[f'fold{k}_prob_positive']) for k in range(3)] for r in rows], axis=1)
    np.testing.assert_allclose([float(r['prob_positive']) for r in rows], mean, atol=2e-6)
    assert json.loads((workdir / 'predict' / 'metrics.json').read_text())['num_slides'] == 4
