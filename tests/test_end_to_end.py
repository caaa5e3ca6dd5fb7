"""The whole method on a tiny synthetic cohort through launch.py, then evaluation again from the
checkpoint alone, and a rerun that finds everything done."""

import csv
import json
import subprocess
import sys

from tests.conftest import REPO


def launch(workdir, *flags):
    command = [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / 'configs/test.py'),
               '--workdir', str(workdir), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


def test_every_stage_then_evaluation_from_the_checkpoint(tmp_path):
    result = launch(tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    for stage in ('tile', 'patches', 'extract', 'evaluate'):
        counts = json.loads((tmp_path / 'reports' / f'{stage}.json').read_text())['counts']
        assert counts.get('error', 0) == 0, (stage, counts)
    assert json.loads((tmp_path / 'reports' / 'learn_features.json').read_text())['epoch'] == 3
    cohort = list(csv.DictReader((tmp_path / 'cohort.csv').open()))
    test_ids = [row['slide_id'] for row in cohort if row['split'] == 'test']
    rows = list(csv.DictReader((tmp_path / 'eval' / 'test' / 'predictions.csv').open()))
    assert [row['slide_id'] for row in rows] == test_ids
    assert all(abs(float(r['prob_negative']) + float(r['prob_positive']) - 1) < 1e-5 for r in rows)
    metrics = json.loads((tmp_path / 'eval' / 'test' / 'metrics.json').read_text())
    in_training = json.loads((tmp_path / 'reports' / 'train_slide.json').read_text())['metrics']
    assert 'test' not in in_training  # test results come from the evaluate stage alone
    assert metrics['num_slides'] == len(test_ids)
    for slide_id in test_ids:
        assert (tmp_path / 'eval' / 'test' / 'heatmaps' / f'{slide_id}.png').stat().st_size > 5000
    assert (tmp_path / 'eval' / 'test' / 'roc.png').exists()
    # Evaluation alone, in a new process, from the checkpoint, gives the same predictions.
    predictions = (tmp_path / 'eval' / 'test' / 'predictions.csv').read_text()
    (tmp_path / 'eval' / 'test' / 'predictions.csv').unlink()
    result = launch(tmp_path, '--stages=evaluate')
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / 'eval' / 'test' / 'predictions.csv').read_text() == predictions
