"""The tile stage end to end on synthetic and real slides: artifacts, report, resume, bad input."""

import json
import os
import shutil
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from pathjax import artifacts, csv_cells, pipeline
from pathjax.errors import StageError
from pathjax.slides import stain, synthetic, synthetic_cohort, tile_stage
from pathjax.sampling import seeded_subset
from pathjax.slides.reader import Slide
from pathjax.slides.tiling import grid_positions
from tests.conftest import REPO, make_config as load_config


def launch(workdir, *flags, timeout=300):
    command = [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / 'configs/test.py'),
               '--workdir', str(workdir), '--stages=tile', *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def report(workdir):
    return {e['slide_id']: e for e in json.loads((workdir / 'reports/tile.json').read_text())['slides']}


@pytest.fixture(scope='module')
def cohort_manifest(tmp_path_factory):
    """The test config's synthetic cohort, generated once for this module."""
    config = load_config()
    spec = config.data.synthetic
    return synthetic_cohort.make_cohort(tmp_path_factory.mktemp('cohort'), spec.num_slides,
                                        tuple(config.data.classes), seed=spec.seed,
                                        width=spec.width, height=spec.height)


@pytest.fixture(scope='module')
def tiled(cohort_manifest, tmp_path_factory):
    workdir = tmp_path_factory.mktemp('tiled')
    config = load_config(**{'data.manifest': str(cohort_manifest)})
    assert pipeline.run(config, workdir, ['tile']) == 0
    return workdir, config


def test_every_slide_has_tiles_qc_and_a_report_entry(tiled, cohort_manifest):
    workdir, config = tiled
    slide_ids = [line.split(',')[0] for line in cohort_manifest.read_text().splitlines()[1:]]
    entries = report(workdir)
    assert list(entries) == slide_ids
    for slide_id in slide_ids:
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz')
        entry = entries[slide_id]
        assert entry['status'] == 'ok' and entry['patches'] == len(tiles['coords']) > 3
        assert tiles['coords'].dtype == np.int64 and tiles['coords'].shape[1] == 2
        assert (tiles['tissue'] >= config.tissue.min_fraction).all()
        assert tiles['stain_lut'].shape == (3, 256) and tiles['stain_lut'].dtype == np.uint8
        assert int(tiles['patch_size']) == 64 and float(tiles['mpp']) == pytest.approx(2.0)
        # Coordinates sit on the patch grid and inside the slide.
        extent = float(tiles['extent'])
        np.testing.assert_array_equal(tiles['coords'], np.rint(tiles['grid'][:, ::-1] * extent))
        assert ((tiles['coords'] + extent) <= tiles['slide_size']).all()
        assert (workdir / 'qc' / f'{slide_id}.png').stat().st_size > 1000
    assert not list((workdir / 'tiles').rglob('*.tmp'))


def test_kept_patches_are_the_tissue_of_the_rendered_slides(tiled):
    """Against the synthetic slides' true tissue masks: patches that are all tissue are kept,
    patches with almost none are not, and kept patches hold far more tissue than the rest."""
    workdir, config = tiled
    spec = config.data.synthetic
    kept_fractions, dropped_fractions = [], []
    for slide in synthetic_cohort.cohort_specs(spec.num_slides, tuple(config.data.classes),
                                               seed=spec.seed, width=spec.width,
                                               height=spec.height):
        tissue_mask = synthetic.render_slide(slide, return_masks=True)[1]['tissue']
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide.slide_id}.npz')
        extent = int(tiles['extent'])
        kept = {tuple(c) for c in tiles['coords']}
        for x, y in grid_positions(spec.width, spec.height, extent)[0]:
            fraction = tissue_mask[y:y + extent, x:x + extent].mean()
            (kept_fractions if (x, y) in kept else dropped_fractions).append(fraction)
    kept_fractions, dropped_fractions = np.array(kept_fractions), np.array(dropped_fractions)
    assert kept_fractions.min() > 0.1
    assert dropped_fractions.max() < 0.95
    assert kept_fractions.mean() > dropped_fractions.mean() + 0.4


def test_cohort_stain_reference_is_the_training_slides_mean(tiled):
    workdir, _ = tiled
    cohort_rows = [line.split(',') for line in (workdir / 'cohort.csv').read_text().splitlines()[1:]]
    train = [row[0] for row in cohort_rows if row[4] == 'train']
    histograms = [artifacts.load_npz(workdir / 'tiles' / f'{s}.npz')['statistics_histograms']
                  for s in train]
    reference = artifacts.load_npz(workdir / 'stain' / 'reference.npz')['statistics_histograms']
    np.testing.assert_allclose(reference, stain.cohort_reference(histograms))
    # Each slide's LUT moves its own histogram onto the reference: per-channel means agree to a
    # few grey levels (skimage's CDF mapping sends a whole histogram bin to the reference value at
    # the bin's upper quantile, which biases means upwards by a few levels).
    values = np.arange(256)
    reference_mean = (reference * values).sum(axis=1)
    for row in cohort_rows:
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{row[0]}.npz')
        own = stain.normalize_histograms(tiles['statistics_histograms'])
        mapped_mean = (own * tiles['stain_lut']).sum(axis=1)
        assert np.abs(mapped_mean - reference_mean).max() < 8.0
        assert (np.abs(mapped_mean - reference_mean).sum()
                <= np.abs((own * values).sum(axis=1) - reference_mean).sum() + 1.0)


def test_template_reference(cohort_manifest, tmp_path, shared_data):
    template = shared_data / 'tiles' / 'torchstain' / 'target.png'
    config = load_config(**{'data.manifest': str(cohort_manifest), 'stain.reference': str(template)})
    config.data.synthetic.num_slides = 0
    assert pipeline.run(config, tmp_path, ['tile']) == 0
    from PIL import Image
    expected = stain.normalize_histograms(stain.channel_histograms(np.asarray(Image.open(template).convert('RGB'))))
    reference = artifacts.load_npz(tmp_path / 'stain' / 'reference.npz')
    np.testing.assert_allclose(stain.normalize_histograms(reference['statistics_histograms']),
                               expected)
    assert 'template' in str(reference['source'])


def test_rerun_skips_finished_slides(tiled, cohort_manifest):
    workdir, config = tiled
    before = {p: p.stat().st_mtime_ns for p in (workdir / 'tiles').glob('*.npz')}
    assert pipeline.run(config, workdir, ['tile']) == 0
    assert {p: p.stat().st_mtime_ns for p in (workdir / 'tiles').glob('*.npz')} == before


def test_killed_run_resumes_without_redoing_finished_slides(cohort_manifest, tmp_path):
    process = subprocess.Popen(
        [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / 'configs/test.py'),
         '--workdir', str(tmp_path), f'--config.data.manifest={cohort_manifest}',
         '--config.workers=1', '--stages=tile'], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    scanned = tmp_path / 'tiles' / '.scan'
    while len(list(scanned.glob('*.npz'))) < 3 and time.time() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    # A slide is finished once its scan file exists (its pictures are written just before).
    finished = [p.stem for p in scanned.glob('*.npz')]
    done_before = {f'{s}.png': (tmp_path / 'qc' / f'{s}.png').stat().st_mtime_ns for s in finished}
    (tmp_path / 'tiles' / '.scan' / '.half-written.npz.123.tmp').write_bytes(b'killed mid-write')
    assert 3 <= len(done_before) < 8, 'the run was not killed midway'
    assert not (tmp_path / 'reports' / 'tile.json').exists()
    result = launch(tmp_path, f'--config.data.manifest={cohort_manifest}')
    assert result.returncode == 0, result.stderr
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'qc').glob('*.png')}
    assert len(after) == 8
    assert all(after[name] == mtime for name, mtime in done_before.items())
    assert all(e['status'] == 'ok' for e in report(tmp_path).values())
    assert not list(tmp_path.rglob('*.tmp'))  # what the killed run left half-written is gone


def test_bad_slides_are_reported_and_the_rest_goes_on(cohort_manifest, tmp_path, shared_data):
    folder = tmp_path / 'slides'
    folder.mkdir()
    (folder / 'text.svs').write_text('plain text renamed to .svs\n')
    good = pathlib.Path(cohort_manifest.read_text().splitlines()[1].split(',')[1])
    data = good.read_bytes()
    (folder / 'truncated.svs').write_bytes(data[:len(data) // 3])
    header, *good = cohort_manifest.read_text().splitlines()[:3]
    rows = [header + ',split'] + [f'{row},train' for row in good]  # the stain reference's slides
    rows += [f'text,{folder / "text.svs"},positive,x1,val',
             f'truncated,{folder / "truncated.svs"},negative,x2,test',
             f'gone,{folder / "gone.svs"},positive,x3,test',
             f'empty,{shared_data / "slides" / "small.svs"},negative,x4,val']
    manifest = tmp_path / 'manifest.csv'
    manifest.write_text('\n'.join(rows) + '\n')
    result = launch(tmp_path / 'work', f'--config.data.manifest={manifest}')
    assert result.returncode == 0, result.stderr
    assert 'Traceback' not in result.stderr
    entries = report(tmp_path / 'work')
    assert [entries[s]['status'] for s in entries] == ['ok', 'ok', 'error', 'error', 'error', 'no_tissue']
    assert 'text.svs' in entries['text']['message']
    assert 'truncated.svs' in entries['truncated']['message']
    assert 'line 6' in entries['gone']['message'] and 'not found' in entries['gone']['message']
    for name in ('text', 'truncated', 'gone'):
        assert name in result.stderr  # every failure is named in the log too


def test_real_slides_tile_through_launch(shared_data, tmp_path):
    slides = shared_data / 'slides'
    manifest = tmp_path / 'manifest.csv'
    manifest.write_text('slide_id,path,label\n'
                        f'tcga,{slides / "tcga-cr-7395-01a-01-ts1.svs"},positive\n'
                        f'small,{slides / "small.svs"},negative\n'
                        f'tiff,{slides / "boxes.tiff"},negative\n'
                        f'dicom,{slides / "boxes_0.dcm"},positive\n')
    result = launch(tmp_path / 'default', f'--config.data.manifest={manifest}',
                    '--config.tile.mpp=0.5', '--config.tile.patch_size=512')
    assert result.returncode == 0, result.stderr
    entries = report(tmp_path / 'default')
    assert entries['tcga']['status'] == 'ok' and entries['tcga']['patches'] >= 20
    assert 'no mpp metadata' in entries['tcga']['message']  # fell back to tile.level
    assert entries['small']['status'] == 'no_tissue'
    # The fixtures are tiny drawings: with a small patch and every pixel counted as tissue,
    # each format is read end to end.
    result = launch(tmp_path / 'formats', f'--config.data.manifest={manifest}',
                    '--config.tile.patch_size=8', '--config.tile.mpp=0.5',
                    '--config.tissue.threshold=255')
    assert result.returncode == 0, result.stderr
    entries = report(tmp_path / 'formats')
    assert all(e['status'] == 'ok' and e['patches'] > 0 for e in entries.values()), entries


def test_stain_histograms_count_tissue_pixels_only(tiled):
    """Each slide's stain histogram is that of the tissue pixels (no channel above
    tissue.threshold) of its sampled patches, read again here: the white around the tissue of a
    kept patch (up to 1 - tissue.min_fraction of it) does not shape its lookup table."""
    workdir, config = tiled
    for line in (workdir / 'cohort.csv').read_text().splitlines()[1:]:
        slide_id, path = line.split(',')[:2]
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz')
        expected, white = np.zeros((3, 256), np.int64), 0
        with Slide(path) as slide:
            plan = slide.plan(config.tile.mpp, config.tile.patch_size, config.tile.level)
            sample = seeded_subset(slide_id, len(tiles['coords']), config.stain.fit_patches,
                                   config.seed)
            for x, y in tiles['coords'][sample]:
                pixels = slide.read_patch(int(x), int(y), plan).reshape(-1, 3)
                tissue = pixels.max(axis=1) <= config.tissue.threshold
                white += int((~tissue).sum())
                for channel in range(3):
                    expected[channel] += np.bincount(pixels[tissue, channel], minlength=256)
        assert white > 0  # the check means something: the sampled patches hold background
        np.testing.assert_array_equal(tiles['statistics_histograms'], expected)


def test_no_training_slide_with_tissue_is_an_error_naming_it(cohort_manifest, tmp_path):
    """The cohort reference is formed from training slides only: when none has tissue the
    stage stops with a message, instead of using validation and test slides."""
    config = load_config(**{'data.manifest': str(cohort_manifest)})
    cohort, _ = pipeline.prepare_cohort(config, tmp_path)
    scans = {r.slide_id: {} if r.split == 'train'  # no tissue pixel, so no statistics
             else {'statistics_histograms': np.ones((3, 256), np.int64)} for r in cohort.slides}
    assert {r.split for r in cohort.slides} >= {'train', 'test'}
    with pytest.raises(StageError, match='no training slide has tissue'):
        tile_stage.stain_reference(config, scans, cohort)


def test_a_changed_slide_file_redoes_its_tiles_and_what_was_made_from_them(tmp_path):
    """A rerun where a slide id's file was replaced (another scan under the same path): its scan
    and tiles are made again from the new file and its features and graph are deleted; a
    training slide refits the cohort stain reference (every slide's LUT) and redoes the patch
    dataset; the tile report says which slides were redone and why. A touched file is not a
    change."""
    config = load_config(**{'data.synthetic.num_slides': 6, 'data.synthetic.width': 1024,
                            'data.synthetic.height': 1024, 'learn.batch_size': 8})
    assert pipeline.run(config, tmp_path, ['tile', 'patches']) == 0
    cohort = {r['slide_id']: r for r in csv_cells.read_records(tmp_path / 'cohort.csv')}
    train = [s for s, r in cohort.items() if r['split'] == 'train']
    test = [s for s, r in cohort.items() if r['split'] == 'test']
    for slide_id in cohort:  # what later stages made of each slide
        for folder in ('features', 'graphs'):
            artifacts.save_npz(tmp_path / folder / f'{slide_id}.npz', x=np.zeros(1))
    tiles_before = {s: artifacts.load_npz(tile_stage.tiles_path(tmp_path, s)) for s in cohort}
    dataset_before = sorted(p.name for p in (tmp_path / 'patches').rglob('*.array_record*'))
    os.utime(cohort[train[1]]['path'])  # touched only

    # A test slide replaced by another slide's scan: only it is redone.
    shutil.copy(cohort[train[0]]['path'], cohort[test[0]]['path'])
    assert pipeline.run(config, tmp_path, ['tile', 'patches']) == 0
    entries = report(tmp_path)
    assert [s for s, e in entries.items() if 'redone' in e] == [test[0]], entries
    assert 'the slide file changed' in entries[test[0]]['redone']
    np.testing.assert_array_equal(artifacts.load_npz(tile_stage.tiles_path(tmp_path, test[0]))
                                  ['coords'], tiles_before[train[0]]['coords'])  # the new file's
    assert not (tmp_path / 'features' / f'{test[0]}.npz').exists()
    assert not (tmp_path / 'graphs' / f'{test[0]}.npz').exists()
    assert (tmp_path / 'features' / f'{train[0]}.npz').exists()
    assert sorted(p.name for p in (tmp_path / 'patches').rglob('*.array_record*')) == \
        dataset_before
    dataset_mtime = max(p.stat().st_mtime_ns for p in (tmp_path / 'patches').rglob('*'))

    # A training slide replaced: the cohort stain reference is refitted, so every slide's tiles
    # are made again (the changed one rescanned) and the patch dataset is rebuilt.
    shutil.copy(cohort[test[1]]['path'], cohort[train[0]]['path'])
    assert pipeline.run(config, tmp_path, ['tile', 'patches']) == 0
    entries = report(tmp_path)
    assert 'the slide file changed' in entries[train[0]]['redone']
    others = [s for s in cohort if s != train[0]]
    assert all(entries[s]['redone'] == 'the cohort stain reference changed' for s in others)
    assert not any((tmp_path / 'features' / f'{s}.npz').exists() for s in cohort)
    assert min(p.stat().st_mtime_ns for p in (tmp_path / 'patches').rglob('*')
               if p.is_file()) > dataset_mtime
    reference = artifacts.load_npz(tmp_path / 'stain' / 'reference.npz')
    assert train[0] in str(reference['sources'])
