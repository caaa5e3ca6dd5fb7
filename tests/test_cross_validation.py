"""3-fold cross-validation of configs/test.py in one run: every fold's stages in its own folder
on shared scans, nothing of a fold trained on its test slides, a summary with pooled
out-of-fold metrics, and a resume after a run killed (SIGKILL) inside a fold."""

import csv
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import sklearn.metrics

from pathjax import artifacts, cohort, cross_validation, pipeline, split_check
from pathjax.data import patches
from pathjax.errors import UsageError
from tests.conftest import REPO, make_config

FOLDS = 3
# Shorter training than configs/test.py: the protocol is under test, not the learning.
SETTINGS = {'data.folds': FOLDS, 'data.fold': -1, 'data.synthetic.num_slides': 12,
            'learn.batch_size': 16,
            'learn.epochs': 1, 'train.max_steps': 4, 'eval.heatmaps': False, 'mesh.data': 1}


def fold_cohort(workdir, fold):
    with open(cross_validation.fold_dir(workdir, fold) / 'cohort.csv', newline='') as f:
        return list(csv.DictReader(f))


def launch(workdir) -> subprocess.Popen:
    overrides = [f'--config.{key}={value}' for key, value in SETTINGS.items()]
    return subprocess.Popen([sys.executable, str(REPO / 'launch.py'), '--config',
                             str(REPO / 'configs/test.py'), '--workdir', str(workdir), *overrides],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def test_every_fold_then_the_summary_and_a_resume_after_a_kill(tmp_path):
    config = make_config(**SETTINGS)
    stop_in = cross_validation.fold_dir(tmp_path, 1)
    run = launch(tmp_path)
    started = stop_in / 'settings' / 'train_slide.json'  # recorded as fold 1's train_slide starts
    deadline = time.monotonic() + 600
    while not started.exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    run.send_signal(signal.SIGKILL)
    _, stderr = run.communicate()
    assert run.returncode == -signal.SIGKILL, stderr[-3000:]
    assert not (stop_in / 'done.json').exists()  # killed inside fold 1
    fold_0 = {p: p.stat().st_mtime_ns for p in cross_validation.fold_dir(tmp_path, 0).rglob('*')
              if p.is_file()}
    learned_1 = sorted((stop_in / 'feature_net' / 'latest').iterdir())
    rerun = launch(tmp_path)
    _, stderr = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, stderr[-3000:]

    # The resume skipped the finished fold and the finished stages of fold 1.
    assert {p: p.stat().st_mtime_ns for p in fold_0} == fold_0
    assert sorted((stop_in / 'feature_net' / 'latest').iterdir()) == learned_1

    # Splits: every case is in exactly one test fold; the validation fold is the next one.
    cohorts = [fold_cohort(tmp_path, k) for k in range(FOLDS)]
    test_ids = [{r['slide_id'] for r in c if r['split'] == 'test'} for c in cohorts]
    assert sorted(i for ids in test_ids for i in ids) == sorted(r['slide_id'] for r in cohorts[0])
    for k in range(FOLDS):
        val = {r['slide_id'] for r in cohorts[k] if r['split'] == 'val'}
        assert val == test_ids[(k + 1) % FOLDS]
        # Nothing of fold k learned from its test slides: its patch dataset holds none of them.
        sampling = patches.Sampling.from_config(config)
        builder = patches.load_builder(cross_validation.fold_dir(tmp_path, k), sampling)
        seen = set()
        for split in builder.info.splits:
            source = builder.as_data_source(split)
            seen |= {source[i]['slide_id'].decode() if isinstance(source[i]['slide_id'], bytes)
                     else source[i]['slide_id'] for i in range(len(source))}
        assert seen and not seen & test_ids[k], k

    # The root's cohort.csv names each slide's test fold.
    with open(tmp_path / 'cohort.csv', newline='') as f:
        test_fold = {r['slide_id']: int(r['test_fold']) for r in csv.DictReader(f)}
    assert test_fold == {i: k for k in range(FOLDS) for i in test_ids[k]}

    # One scan per slide, shared; each fold's stain reference comes from its own training slides.
    scans = sorted(p.stem for p in (tmp_path / 'scans').glob('*.npz'))
    assert scans == sorted(r['slide_id'] for r in cohorts[0])
    references = [artifacts.load_npz(cross_validation.fold_dir(tmp_path, k) / 'stain' /
                                     'reference.npz')['statistics_histograms'] for k in range(FOLDS)]
    assert not np.array_equal(references[0], references[1])
    for k in range(FOLDS):
        scan = artifacts.load_npz(tmp_path / 'scans' / f'{scans[0]}.npz')
        tiles = artifacts.load_npz(cross_validation.fold_dir(tmp_path, k) / 'tiles' /
                                   f'{scans[0]}.npz')
        np.testing.assert_array_equal(tiles['coords'], scan['coords'])

    # The summary: each fold's test metrics, mean and sd, pooled out-of-fold AUC with its CI.
    summary = json.loads((tmp_path / 'cv' / 'summary.json').read_text())
    assert [f['fold'] for f in summary['folds']] == list(range(FOLDS))
    for k, fold in enumerate(summary['folds']):
        metrics = json.loads((cross_validation.fold_dir(tmp_path, k) / 'eval' / 'test' /
                              'metrics.json').read_text())
        assert fold['auc'] == metrics['auc'] and fold['num_slides'] == len(test_ids[k])
    aucs = [f['auc'] for f in summary['folds'] if f['auc'] is not None]
    assert summary['mean']['auc'] == pytest.approx(np.mean(aucs))
    assert summary['sd']['auc'] == pytest.approx(np.std(aucs, ddof=1))
    with open(tmp_path / 'cv' / 'predictions.csv', newline='') as f:
        pooled = list(csv.DictReader(f))
    assert sorted(r['slide_id'] for r in pooled) == scans
    labels = [r['label'] == config.data.classes[1] for r in pooled]
    scores = [float(r[f'prob_{config.data.classes[1]}']) for r in pooled]
    assert summary['auc'] == pytest.approx(sklearn.metrics.roc_auc_score(labels, scores),
                                           abs=1e-6)
    low, high = summary['auc_ci95']
    assert low <= summary['auc'] <= high
    rows = list(csv.reader((tmp_path / 'cv' / 'summary.csv').open()))
    assert [r[0] for r in rows[1:]] == ['0', '1', '2', 'mean', 'sd', 'pooled']
    # The run's page has the CV table and links each fold's own page.
    page = (tmp_path / 'report.html').read_text()
    assert '>Cross-validation</h2>' in page and 'pooled out-of-fold' in page
    for k in range(FOLDS):
        assert f'href="folds/{k}/report.html"' in page
        assert (cross_validation.fold_dir(tmp_path, k) / 'report.html').exists()


def test_a_manifest_with_splits_cannot_cross_validate(tmp_path):
    config = make_config(**{**SETTINGS, 'data.synthetic.num_slides': 4})
    pipeline.run(make_config(**{'data.synthetic.num_slides': 4}), tmp_path / 'made', ['tile'])
    rows = (tmp_path / 'made' / 'cohort.csv').read_text().splitlines()
    manifest = tmp_path / 'with_splits.csv'
    manifest.write_text('\n'.join(','.join(r.split(',')[:5]) for r in rows) + '\n')
    config.data.manifest = str(manifest)
    with pytest.raises(UsageError, match='without a split column'):
        pipeline.run(config, tmp_path / 'cv')


def test_a_fold_that_cannot_train_stops_the_run_before_any_fold_trains(tmp_path):
    """configs/test.py in 3 folds: fold 2 has 29 training patches, fewer than one batch of 32.
    Found after the shared tile stage, before fold 0 trains, naming the fold and the fix."""
    config = make_config(**{'data.folds': 3, 'data.fold': -1})
    with pytest.raises(UsageError) as caught:
        pipeline.run(config, tmp_path)
    message = str(caught.value)
    assert 'fold 2: 29 training patches, fewer than one batch (learn.batch_size=32)' in message
    assert 'fold 0: ' not in message and 'data.folds=3' in message
    assert len(list((tmp_path / 'scans').glob('*.npz'))) == 8  # every slide was scanned
    for fold in range(3):
        folder = cross_validation.fold_dir(tmp_path, fold)
        assert not (folder / 'patches').exists() and not (folder / 'feature_net').exists()
    config.learn.batch_size = 16  # what the message suggests: every fold can now train
    records = cohort.read_manifest(tmp_path / 'synthetic' / 'manifest.csv', config.data.classes)
    counts = split_check.patch_counts({r.slide_id: tmp_path / 'scans' / f'{r.slide_id}.npz'
                                       for r in records})
    for fold in range(3):
        split = cohort.assign_splits(records, fractions=(0.6, 0.2, 0.2), folds=3, fold=fold,
                                     seed=config.data.split_seed)
        assert split_check.problems(config, split, counts) == []


def test_the_fold_check_names_a_split_without_a_class():
    config = make_config()
    splits = [('negative', 'train'), ('positive', 'train'), ('negative', 'val'),
              ('positive', 'test')]
    records = [cohort.SlideRecord(f's{i}', '', label, f's{i}', split, i + 2)
               for i, (label, split) in enumerate(splits)]
    counts = {r.slide_id: 100 for r in records}
    assert split_check.problems(config, records, counts) == [
        "val has no slide with tissue of class(es) 'positive'",
        "test has no slide with tissue of class(es) 'negative'"]
    records += [cohort.SlideRecord(f's{i}', '', label, f's{i}', split, i + 2) for i, (label, split)
                in enumerate([('positive', 'val'), ('negative', 'test')], start=len(records))]
    counts.update(s0=10, s1=10, s4=100, s5=100)  # every class everywhere; 10 + 10 to train on
    assert split_check.problems(config, records, counts) == [
        '20 training patches, fewer than one batch (learn.batch_size=32): lower '
        'learn.batch_size or raise learn.patches_per_slide (32)']
    config.feature_net.learn = False  # a frozen encoder needs no patches
    assert split_check.problems(config, records, counts) == []
