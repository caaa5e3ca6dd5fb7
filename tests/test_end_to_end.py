"""The whole method on a tiny synthetic cohort through launch.py; evaluation again from the
checkpoint alone; new slides through the trained workdir; the report page in a real browser."""

import csv
import json
import re
import subprocess
import shutil
import sys

import numpy as np
import pytest
import shapely
from PIL import Image
from shapely.geometry import box, shape

from pathjax import artifacts
from pathjax.evaluate import report
from pathjax.interop import h5_features
from tests.conftest import REPO

CLASSES = ('negative', 'positive')


def launch(workdir, *flags):
    command = [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / 'configs/test.py'),
               '--workdir', str(workdir), *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=REPO)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    """A workdir through every stage (features also exported in TRIDENT's layout), and
    launch.py's result."""
    workdir = tmp_path_factory.mktemp('trained')
    return workdir, launch(workdir, '--config.features.export=h5')


def test_every_stage_then_evaluation_from_the_checkpoint(trained):
    tmp_path, result = trained
    assert result.returncode == 0, result.stderr[-4000:]
    assert f'report: {tmp_path / "report.html"}' in result.stdout
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


ABSL_RECORD = re.compile(r'^[IWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\] ')
SILENCED = ('Downloading and preparing dataset', 'Unable to initialize backend',
            'OpenCV is not installed', 'dataset_info.json', 'Shuffling', 'Generating splits')


def test_the_console_shows_progress_and_a_summary_without_library_noise(trained):
    """Not a terminal (captured): one progress line per stage with its count and time, no
    absl-formatted records, no TFDS or JAX backend narration, no escape codes; the summary last."""
    workdir, result = trained
    lines = (result.stdout + result.stderr).splitlines()
    assert not [line for line in lines if ABSL_RECORD.match(line)]
    assert not [line for line in lines if any(noise in line for noise in SILENCED)]
    assert '\r' not in result.stderr and '\x1b[' not in result.stdout + result.stderr
    for stage, unit in (('tile', 'slides'), ('patches', 'slides'), ('learn_features', 'steps'),
                        ('extract', 'patches'), ('train_slide', 'steps'),
                        ('evaluate test', 'slides')):
        pattern = re.compile(rf'^{stage}: \d+/\d+ {unit} in \d+\.\d s')
        assert sum(bool(pattern.match(line)) for line in result.stderr.splitlines()) == 1, stage
    summary = result.stdout.splitlines()
    start = summary.index('Summary:')
    stages = [line.split()[0] for line in summary[start + 1:start + 7]]
    assert stages == ['tile', 'patches', 'learn_features', 'extract', 'train_slide', 'evaluate']
    assert re.match(r'^  tile +8 ok, 0 skipped, 0 failed +\d+\.\d s$', summary[start + 1])
    metrics = json.loads((workdir / 'eval' / 'test' / 'metrics.json').read_text())
    assert summary[-2].startswith(f'  test AUC {metrics["auc"]:.3f} (95% CI ')
    assert summary[-1] == f'  report: {workdir / "report.html"}'


def test_exported_features_imported_into_a_new_workdir_give_the_same_predictions(trained,
                                                                                  tmp_path):
    workdir, result = trained
    assert result.returncode == 0, result.stderr[-4000:]
    exported = workdir / 'features_h5'
    for row in csv.DictReader((workdir / 'cohort.csv').open()):
        info = h5_features.inspect(exported / f'{row["slide_id"]}.h5')
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{row["slide_id"]}.npz')
        assert info.format == 'trident' and info.encoder.startswith('vgg16')
        assert info.num_patches == len(tiles['coords']) and info.slide_size == tuple(
            tiles['slide_size'])
        assert info.patch_size_level0 == round(float(tiles['extent']))
        assert info.mpp == pytest.approx(float(tiles['mpp']) * 64 / float(tiles['extent']))
    imported = tmp_path / 'imported'
    result = launch(imported, f'--config.data.manifest={workdir / "synthetic" / "manifest.csv"}',
                    f'--config.features.import_dir={exported}')
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (imported / 'tiles').exists() and not (imported / 'features').exists()
    native = report.read_predictions(workdir / 'eval' / 'test' / 'predictions.csv', CLASSES)
    again = report.read_predictions(imported / 'eval' / 'test' / 'predictions.csv', CLASSES)
    assert again[0] == native[0] and again[1].tolist() == native[1].tolist()
    np.testing.assert_allclose(again[2], native[2], atol=1e-5)


def test_geojson_holds_the_scored_patches_and_the_tissue(trained):
    workdir, result = trained
    assert result.returncode == 0, result.stderr[-4000:]
    for path in sorted((workdir / 'eval' / 'test' / 'geojson').glob('*.geojson')):
        tiles = artifacts.load_npz(workdir / 'tiles' / path.name.replace('.geojson', '.npz'))
        slide = box(0, 0, *tiles['slide_size'])
        collection = json.loads(path.read_text())
        assert collection['type'] == 'FeatureCollection'
        kinds = [f['properties']['objectType'] for f in collection['features']]
        graph = artifacts.load_npz(workdir / 'graphs' / path.name.replace('.geojson', '.npz'))
        assert kinds.count('detection') == len(graph['kept']) and 'annotation' in kinds
        for feature in collection['features']:
            geometry = shape(feature['geometry'])
            assert geometry.is_valid and slide.buffer(1e-6).contains(geometry)
            if feature['properties']['objectType'] == 'detection':
                measurements = feature['properties']['measurements']
                assert {'contribution', 'probability positive'} <= set(measurements)
        tissue = shapely.union_all([shape(f['geometry']) for f in collection['features']
                                    if f['properties']['objectType'] == 'annotation'])
        patches = [shape(f['geometry']) for f in collection['features']
                   if f['properties']['objectType'] == 'detection']
        # The region is the tile stage's mask (less specks), so kept patches hold on average at
        # least tissue.min_fraction (0.25) of it, and its area is the mask's.
        shares = [tissue.intersection(patch).area / patch.area for patch in patches]
        assert np.mean(shares) >= 0.25, shares
        assert tissue.area == pytest.approx(tiles['tissue_mask'].mean() * slide.area, rel=0.2)
    assert len(list((workdir / 'eval' / 'test' / 'geojson').glob('*.geojson'))) >= 2


def test_new_slides_get_predictions_heatmaps_and_metrics_of_labelled_rows(trained):
    tmp_path, result = trained
    assert result.returncode == 0, result.stderr[-4000:]
    cohort = list(csv.DictReader((tmp_path / 'cohort.csv').open()))
    test_ids = [row['slide_id'] for row in cohort if row['split'] == 'test']
    rows = list(csv.DictReader((tmp_path / 'eval' / 'test' / 'predictions.csv').open()))
    metrics = json.loads((tmp_path / 'eval' / 'test' / 'metrics.json').read_text())
    # The test slides again (labelled, and unlabelled under other ids), a missing file and a
    # file that is not a slide.
    slides = {row['slide_id']: row for row in cohort}
    not_a_slide = tmp_path / 'not_a_slide.svs'
    not_a_slide.write_bytes(b'not a slide' * 100)
    manifest = tmp_path / 'new_slides.csv'
    lines = ['slide_id,path,label']
    lines += [f'{i},{slides[i]["path"]},{slides[i]["label"]}' for i in test_ids]
    lines += [f'new_{i},{slides[i]["path"]},' for i in test_ids]
    lines += [f'missing,{tmp_path / "nope.svs"},', f'broken,{not_a_slide},']
    manifest.write_text('\n'.join(lines) + '\n')
    result = launch(tmp_path, '--stages=predict', f'--config.predict.manifest={manifest}',
                    '--config.features.export=h5')
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
        assert (folder / 'geojson' / f'new_{slide_id}.geojson').exists()
        assert (folder / 'features_h5' / f'new_{slide_id}.h5').exists()
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

    # A rerun with two ids now naming each other's files redoes them, not reuses them.
    first, second = test_ids[:2]
    manifest.write_text(f'slide_id,path,label\nnew_{first},{slides[second]["path"]},\n'
                        f'new_{second},{slides[first]["path"]},\n')
    result = launch(tmp_path, '--stages=predict', f'--config.predict.manifest={manifest}')
    assert result.returncode == 0, result.stderr[-4000:]
    swapped = {r['slide_id']: r for r in csv.DictReader((folder / 'predictions.csv').open())}
    assert swapped[f'new_{first}']['prob_positive'] == evaluated[second]['prob_positive']
    assert swapped[f'new_{second}']['prob_positive'] == evaluated[first]['prob_positive']

    # A config other than the training one is refused, naming the field.
    result = launch(tmp_path, '--stages=predict', f'--config.predict.manifest={manifest}',
                    '--config.graph.k=3')
    assert result.returncode == 2 and 'graph.k' in result.stderr, result.stderr[-2000:]
    result = launch(tmp_path, '--stages=predict')
    assert result.returncode == 2 and 'predict.manifest' in result.stderr, result.stderr[-2000:]


# Run in the page after it loads: every image decoded, and any error or console.error, written
# into the DOM that `chromium --dump-dom` prints.
PAGE_CHECK = """<script>
window.pageErrors = [];
window.addEventListener('error', e => window.pageErrors.push(String(e.message || e.type)), true);
const consoleError = console.error;
console.error = (...args) => { window.pageErrors.push(args.join(' ')); consoleError(...args); };
window.addEventListener('load', () => {
  const images = [...document.images];
  const result = {images: images.length, errors: window.pageErrors,
                  broken: images.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.alt)};
  const out = document.createElement('pre');
  out.id = 'page-check';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
});
</script>"""


def chromium(*args):
    command = [shutil.which('chromium') or shutil.which('chromium-browser'), '--headless',
               '--no-sandbox', '--disable-gpu', '--hide-scrollbars', *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120)


def test_report_page_renders_in_chromium(trained):
    """The page that the run wrote loads in headless Chromium with every image decoded and no
    error; a screenshot of its top is written beside it (report.png) for a person to look at."""
    if not (shutil.which('chromium') or shutil.which('chromium-browser')):
        pytest.skip('headless Chromium not found: install it (apt-get install chromium) to '
                    'check the report page in a browser')
    tmp_path, result = trained
    assert result.returncode == 0, result.stderr[-4000:]
    page = tmp_path / 'report.html'
    text = page.read_text()
    assert 'src="http' not in text and 'src="file' not in text  # self-contained
    for section in ('Results', 'Learning curves', 'Heatmaps', 'Cohort', 'Tile report',
                    'QC pictures', 'Config'):
        assert f'>{section}</h' in text, section
    checked = tmp_path / 'report_checked.html'
    checked.write_text(text.replace('<head>', '<head>' + PAGE_CHECK, 1))
    dom = chromium('--virtual-time-budget=20000', '--dump-dom', checked.as_uri()).stdout
    found = json.loads(dom.split('<pre id="page-check">', 1)[1].split('</pre>', 1)[0]
                       .replace('&quot;', '"').replace('&amp;', '&'))
    test_ids = [r['slide_id'] for r in csv.DictReader((tmp_path / 'cohort.csv').open())
                if r['split'] == 'test']
    # ROC, learning curves, per test slide a heatmap and its 4 top patches, QC pictures.
    assert found['images'] >= 2 + 5 * len(test_ids), found
    assert found['broken'] == [] and found['errors'] == [], found
    screenshot = tmp_path / 'report.png'
    chromium('--window-size=1280,2400', f'--screenshot={screenshot}', page.as_uri())
    image = Image.open(screenshot)
    assert image.size == (1280, 2400)
    assert len(np.unique(np.asarray(image.convert('L').resize((64, 120))))) > 20  # not blank
    print(f'report screenshot: {screenshot}')


def test_a_vit_encoder_from_a_weights_file_runs_the_whole_pipeline(tmp_path):
    """A ViT preset with a timm state_dict file as the frozen patch encoder: its patch size is
    the tile stage's (224 px), the patch dataset and feature learning are skipped, the features
    are the preset's width and name the encoder."""
    timm = pytest.importorskip('timm', reason='writing a timm weights file needs the test extra')
    from safetensors.torch import save_file
    model = timm.create_model('vit_small_patch16_224', pretrained=False, num_classes=0)
    weights = tmp_path / 'vit_small.safetensors'
    save_file(model.state_dict(), weights)
    workdir = tmp_path / 'run'
    result = launch(workdir, '--config.feature_net.backbone=vit_small_patch16_224',
                    f'--config.feature_net.weights={weights}', '--config.feature_net.learn=False',
                    '--config.tile.patch_size=0', '--config.tile.mpp=1.0')
    assert result.returncode == 0, result.stderr[-4000:]
    assert not (workdir / 'patches').exists() and not (workdir / 'feature_net').exists()
    tiles = next((workdir / 'tiles').glob('*.npz'))
    assert int(np.load(tiles)['patch_size']) == 224
    features = np.load(next((workdir / 'features').glob('*.npz')))
    assert features['features'].shape[1] == 384
    identity = json.loads(str(features['network']))
    assert identity['encoder'] == 'vit_small_patch16_224, weights vit_small.safetensors'
    assert json.loads((workdir / 'eval' / 'test' / 'metrics.json').read_text())['num_slides'] >= 1
    result = launch(workdir, '--config.feature_net.backbone=vit_small_patch16_224',
                    '--config.feature_net.learn=False', '--config.tile.patch_size=64')
    assert result.returncode == 2 and 'takes 224 px patches' in result.stderr
