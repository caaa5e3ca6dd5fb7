"""The tile stage's quality control on whole slides: a slide all inked or all out of focus is
reported with its reason while the others go on; drops are counted per cause and flagged."""

import csv
import json

import cv2
import numpy as np
import pytest

from pathjax import artifacts, pipeline
from pathjax.slides import slide_writer, synthetic, tissue_qc
from tests.conftest import make_config

BLUE_INK_OD = np.array([0.9, 0.45, 0.1])  # a blue marker's optical density (absorbs red)


@pytest.fixture(scope='module')
def qc_run(tmp_path_factory):
    """Three slides: clean, all tissue under blue ink, all out of focus (4 um Gaussian); tiled
    with pen and blur removal on."""
    folder = tmp_path_factory.mktemp('slides')
    spec = synthetic.SyntheticSlideSpec('clean', 'c0', 'negative', False, 0.5, 'tiff', 2048, 1536, 7)
    image = synthetic.render_slide(spec)
    inked = np.clip(np.rint(image * 10 ** -BLUE_INK_OD), 0, 255).astype(np.uint8)
    blurred = cv2.GaussianBlur(image, (0, 0), 4.0 / spec.mpp)
    rows = []
    for slide_id, pixels, label in (('clean', image, 'negative'), ('inked', inked, 'positive'),
                                    ('blurred', blurred, 'negative')):
        path = folder / f'{slide_id}.tiff'
        slide_writer.write_slide(path, pixels, spec.mpp, 'tiff')
        rows.append((slide_id, str(path), label, slide_id, 'train'))
    manifest = folder / 'manifest.csv'
    with open(manifest, 'w', newline='') as file:
        csv.writer(file).writerows([('slide_id', 'path', 'label', 'case_id', 'split'), *rows])
    workdir = tmp_path_factory.mktemp('work')
    config = make_config(**{'data.manifest': str(manifest), 'tissue.remove_pen': True,
                            'tissue.max_blur': 50.0, 'workers': 1})
    status = pipeline.run(config, workdir, ['tile'])
    entries = {e['slide_id']: e for e in
               json.loads((workdir / 'reports' / 'tile.json').read_text())['slides']}
    return status, entries, workdir


def test_the_clean_slide_keeps_its_tissue(qc_run):
    _, entries, workdir = qc_run
    clean = entries['clean']
    assert clean['status'] == 'ok' and clean['patches'] > 10
    assert clean['dropped']['pen'] == 0 and clean['qc_flags'] == []
    assert clean['dropped']['blur'] <= 0.05 * clean['patches']
    tiles = artifacts.load_npz(workdir / 'tiles' / 'clean.npz')
    assert (tiles['focus'] >= 50.0).all() and len(tiles['focus']) == clean['patches']
    assert tiles['dropped'].tolist()[tissue_qc.CAUSES.index('pen')] == 0


@pytest.mark.parametrize('slide_id, cause', [('inked', 'pen'), ('blurred', 'blur')])
def test_an_all_artifact_slide_is_reported_with_its_reason(qc_run, slide_id, cause):
    _, entries, _ = qc_run
    entry = entries[slide_id]
    assert entry['status'] == 'no_tissue' and entry['patches'] == 0
    assert entry['dropped'][cause] >= 0.9 * entries['clean']['patches']
    assert f'mostly {cause}' in entry['qc_flags']
    assert 'every tissue patch was dropped' in entry['message'] and cause in entry['message']


def test_the_report_page_lists_the_drops(qc_run, tmp_path):
    from pathjax.evaluate import report_page
    _, _, workdir = qc_run
    page = report_page.tile_section(workdir)
    assert 'Patches dropped by quality control' in page
    assert page.index('inked') < page.index('clean') or page.index('blurred') < page.index('clean')
