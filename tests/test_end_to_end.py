"""The whole method on a tiny synthetic cohort through launch.py, then evaluation again from the
checkpoint alone, and a rerun that finds everything done."""

import csv
import json
import subprocess
import sys

from PIL import Image

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

    # New slides through the trained workdir: the test slides again (labelled, and unlabelled
    # under other ids), a missing file and a file that is not a slide.
    slides = {row['slide_id']: row for row in cohort}
    not_a_slide = tmp_path / 'not_a_slide.svs'
    not_a_slide.write_bytes(b'not a slide' * 100)
    manifest = tmp_path / 'new_slides.csv'
    lines = ['slide_id,path,label']
    lines += [f'{i},{slides[i]["path"]},{slides[i]["label"]}' for i in test_ids]
    lines += [f'new_{i},{slides[i]["path"]},' for i in test_ids]
    lines += [f'missing,{tmp_path / "nope.svs"},', f'broken,{not_a_slide},']
    manifest.write_text('\n'.join(lines) + '\n')
    result = launch(tmp_path, '--stages=predict', f'--config.predict.manifest={manifest}')
    assert result.returncode == 0, result.stderr[-4000:]
    folder = tmp_path / 'predict'
    predicted = {row['slide_id']: row for row in csv.DictReader((folder / 'predictions.csv').open())}
    assert sorted(predicted) == sorted(test_ids + [f'new_{i}' for i in test_ids])
    evaluated = {row['slide_id']: row for row in rows}
    for slide_id in test_ids:  # the trained stain reference, network and model: same numbers
        for new_id in (slide_id, f'new_{slide_id}'):
            assert predicted[new_id]['prob_positive'] == evaluated[slide_id]['prob_positive']
            assert predicted[new_id]['pred'] == evaluated[slide_id]['pred']
        assert predicted[slide_id]['label'] == slides[slide_id]['label']
        assert predicted[f'new_{slide_id}']['label'] == ''
        assert (folder / 'heatmaps' / f'new_{slide_id}.png').stat().st_size > 5000
        patches = sorted((folder / 'top_patches' / f'new_{slide_id}').glob('*.png'))
        assert [p.name for p in patches] == ['1.png', '2.png', '3.png', '4.png']
        assert Image.open(patches[0]).size == (64, 64)
    predict_metrics = json.loads((folder / 'metrics.json').read_text())
    assert predict_metrics['num_slides'] == len(test_ids)  # the labelled rows only
    assert predict_metrics['unlabelled_slides'] == len(test_ids)
    assert predict_metrics['auc'] == metrics['auc']
    report = json.loads((folder / 'reports' / 'predict.json').read_text())
    failed = {e['slide_id']: e['message'] for e in report['slides'] if e['status'] == 'error'}
    assert sorted(failed) == ['broken', 'missing'] and 'file not found' in failed['missing']
    assert 'broken' in json.dumps(json.loads((folder / 'reports' / 'tile.json').read_text()))

    # A config other than the training one is refused, naming the field.
    result = launch(tmp_path, '--stages=predict', f'--config.predict.manifest={manifest}',
                    '--config.graph.k=3')
    assert result.returncode == 2 and 'graph.k' in result.stderr, result.stderr[-2000:]
    result = launch(tmp_path, '--stages=predict')
    assert result.returncode == 2 and 'predict.manifest' in result.stderr, result.stderr[-2000:]
