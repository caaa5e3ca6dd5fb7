"""Features made by another tool: a cohort of TRIDENT files through import, train_slide and
evaluate (no slide file, no tiling, no extraction); bad files are reported by name and the rest
go on; a replaced file redoes its graph."""

import csv
import dataclasses
import json

import h5py
import numpy as np
import pytest
from shapely.geometry import shape

from pathjax import artifacts, pipeline
from pathjax.data.features import graph_path
from pathjax.data.synthetic_bags import make_bags
from pathjax.errors import StageError, UsageError
from pathjax.evaluate import report
from pathjax.interop import h5_features
from tests.conftest import make_config
from tests.interop.test_h5_features import write_clam_style, write_stamp_style

CLASSES = ('negative', 'positive')

STEP = 448  # a patch's side in level-0 pixels (224 px at 20x on a 40x slide)
ORIGIN = (96, 160)  # TRIDENT's grid starts at the tissue's bounding box, not at (0, 0)
SPLITS = ['train'] * 10 + ['val'] * 4 + ['test'] * 4


def write_cohort(folder, bags, splits=SPLITS, encoder='uni_v1'):
    """One TRIDENT file per bag (grid cells to level-0 coords) and a manifest without slide
    paths; returns the manifest."""
    for bag in bags:
        coords = bag.grid[:, ::-1] * STEP + np.asarray(ORIGIN)
        width, height = (coords.max(axis=0) + 2 * STEP).tolist()
        h5_features.write_trident(folder / f'{bag.slide_id}.h5', bag.features, coords,
                                  encoder=encoder, patch_size=224, patch_size_level0=STEP,
                                  level0_magnification=40, target_magnification=20,
                                  level0_width=width, level0_height=height, mpp=0.25)
    manifest = folder.parent / f'{folder.name}.csv'
    manifest.write_text('slide_id,path,label,split\n' + ''.join(
        f'{bag.slide_id},,{("negative", "positive")[bag.label]},{split}\n'
        for bag, split in zip(bags, splits)))
    return manifest


def import_config(manifest, folder, **overrides):
    return make_config(**{'data.manifest': str(manifest), 'features.import_dir': str(folder),
                          'train.max_steps': 40, 'graph.max_patches': 0, **overrides})


def bags(seed=0):
    return make_bags(len(SPLITS), dim=16, patches=(30, 60), motif_fraction=0.3, signal=3.0,
                     seed=seed)


@pytest.fixture(scope='module')
def imported(tmp_path_factory):
    folder = tmp_path_factory.mktemp('trident') / 'features'
    folder.mkdir()
    cohort = bags()
    manifest = write_cohort(folder, cohort)
    workdir = tmp_path_factory.mktemp('workdir')
    assert pipeline.run(import_config(manifest, folder), workdir) == 0
    return workdir, folder, manifest, cohort


def test_imported_features_train_and_evaluate_without_slides(imported):
    workdir, folder, _, cohort = imported
    report = json.loads((workdir / 'reports' / 'import.json').read_text())
    assert report['counts'] == {'ok': len(cohort)}
    entry = report['slides'][0]
    assert (entry['format'], entry['encoder'], entry['feature_dim']) == ('trident', 'uni_v1', 16)
    for name in ('tiles', 'features', 'patches', 'feature_net'):
        assert not (workdir / name).exists(), name  # tile ... extract did not run
    # The graph holds the file's features and the grid its coordinates give (absolute cells).
    first = cohort[0]
    graph = artifacts.load_npz(graph_path(workdir, first.slide_id))
    np.testing.assert_array_equal(graph['features'], first.features[graph['kept']])
    origin_cells = np.rint(np.asarray(ORIGIN)[::-1] / STEP).astype(int)
    np.testing.assert_array_equal(graph['grid'], first.grid[graph['kept']] + origin_cells)
    rows = list(csv.DictReader((workdir / 'eval' / 'test' / 'predictions.csv').open()))
    assert [r['slide_id'] for r in rows] == [b.slide_id for b, s in zip(cohort, SPLITS)
                                             if s == 'test']
    for row in rows:  # heatmaps on a map of the patches; QuPath detections, no tissue region
        assert (workdir / 'eval' / 'test' / 'heatmaps' / f'{row["slide_id"]}.png').exists()
        collection = json.loads((workdir / 'eval' / 'test' / 'geojson' /
                                 f'{row["slide_id"]}.geojson').read_text())
        detections = [f for f in collection['features']
                      if f['properties']['objectType'] == 'detection']
        bag = next(b for b in cohort if b.slide_id == row['slide_id'])
        assert len(detections) == len(bag.features)
        corners = sorted(tuple(int(v) for v in np.min(f['geometry']['coordinates'][0], axis=0))
                         for f in detections)
        assert corners == sorted(map(tuple, (bag.grid[:, ::-1] * STEP + ORIGIN).tolist()))
        assert all(shape(f['geometry']).is_valid for f in detections)
    page = (workdir / 'report.html').read_text()
    assert str(folder) in page and 'uni_v1' in page


def test_a_replaced_file_redoes_its_graph(imported, tmp_path):
    workdir, folder, manifest, cohort = imported
    victim = cohort[0]
    count = len(victim.features)
    replaced = np.random.default_rng(1).normal(size=victim.features.shape).astype(np.float32)
    coords = victim.grid[:, ::-1] * STEP + np.asarray(ORIGIN)
    with h5py.File(folder / f'{victim.slide_id}.h5', 'r+') as f:  # same size, other values
        f['features'][...] = replaced
    config = import_config(manifest, folder)
    assert pipeline.run(config, workdir, ['import']) == 0
    graph = artifacts.load_npz(graph_path(workdir, victim.slide_id))
    assert len(graph['kept']) == count
    np.testing.assert_array_equal(graph['features'], replaced[graph['kept']])
    np.testing.assert_array_equal(graph['coords'], coords[graph['kept']])


def test_bad_files_are_reported_by_name_and_the_rest_go_on(tmp_path):
    folder = tmp_path / 'features'
    folder.mkdir()
    cohort = bags()
    manifest = write_cohort(folder, cohort)
    broken = {}
    (folder / f'{cohort[0].slide_id}.h5').unlink()
    broken[cohort[0].slide_id] = 'no features file'
    with h5py.File(folder / f'{cohort[1].slide_id}.h5', 'r+') as f:
        f['features'][3, 2] = np.nan
    broken[cohort[1].slide_id] = 'features'
    with h5py.File(folder / f'{cohort[2].slide_id}.h5', 'r+') as f:
        coords = f['coords'][:]
        del f['coords']
        f.create_dataset('coords', data=coords[:-1])
    broken[cohort[2].slide_id] = 'coords'
    with h5py.File(folder / f'{cohort[3].slide_id}.h5', 'r+') as f:
        f['coords'][0] = (10 ** 7, 0)
    broken[cohort[3].slide_id] = 'outside'
    workdir = tmp_path / 'workdir'
    assert pipeline.run(import_config(manifest, folder), workdir) == 0
    report = json.loads((workdir / 'reports' / 'import.json').read_text())
    failed = {e['slide_id']: e['message'] for e in report['slides'] if e['status'] == 'error'}
    assert sorted(failed) == sorted(broken)
    for slide_id, field in broken.items():
        assert f'{slide_id}.h5' in failed[slide_id] and field in failed[slide_id], failed[slide_id]
    trained = json.loads((workdir / 'reports' / 'train_slide.json').read_text())
    assert trained['training']['step'] > 0


def test_features_of_two_sizes_stop_the_run_naming_two_slides(tmp_path):
    folder = tmp_path / 'features'
    folder.mkdir()
    cohort = bags()
    manifest = write_cohort(folder, cohort)
    wide = make_bags(1, dim=24, seed=3)[0]
    coords = wide.grid[:, ::-1] * STEP
    h5_features.write_trident(folder / f'{cohort[5].slide_id}.h5', wide.features, coords,
                              encoder='uni_v1', patch_size=224, patch_size_level0=STEP,
                              level0_magnification=40, target_magnification=20,
                              level0_width=10 ** 5, level0_height=10 ** 5, mpp=0.25)
    with pytest.raises(StageError, match=rf'{cohort[0].slide_id} has 16, {cohort[5].slide_id} '
                                         r'has 24'):
        pipeline.run(import_config(manifest, folder), tmp_path / 'workdir')


def test_import_settings_are_checked_before_any_work(tmp_path):
    folder = tmp_path / 'features'
    folder.mkdir()
    manifest = write_cohort(folder, bags())
    for overrides, field in (({'features.format': 'tridnet'}, 'features.format'),
                             ({'features.format': 'clam'}, 'features.patch_size_level0'),
                             ({'features.import_dir': str(tmp_path / 'nope')},
                              'features.import_dir'),
                             ({'features.export': 'h5'}, 'features.export')):
        with pytest.raises(UsageError, match=field.replace('.', r'\.')):
            pipeline.run(import_config(manifest, folder, **overrides), tmp_path / 'w')
    with pytest.raises(UsageError, match='extract'):
        pipeline.run(import_config(manifest, folder), tmp_path / 'w', ['extract'])
    assert not (tmp_path / 'w').exists()



@pytest.mark.parametrize('tool', ['clam', 'stamp'])
def test_clam_and_stamp_files_import_with_their_patch_size_and_mpp(tmp_path, tool):
    """CLAM files (no attrs: the patch size from features.patch_size_level0) and STAMP files
    (micrometres: pixels through the manifest's mpp), written as those tools write them."""
    folder = tmp_path / 'features'
    folder.mkdir()
    cohort = bags()[:4]
    for bag in cohort:
        coords = bag.grid[:, ::-1] * STEP + np.asarray(ORIGIN)
        if tool == 'clam':
            write_clam_style(folder / f'{bag.slide_id}.h5', bag.features, coords)
        else:
            write_stamp_style(folder / f'{bag.slide_id}.h5', bag.features, coords * 0.25,
                              tile_size_um=STEP * 0.25)
    manifest = tmp_path / 'cohort.csv'
    manifest.write_text('slide_id,path,label,split,mpp\n' + ''.join(
        f'{b.slide_id},,{("negative", "positive")[b.label]},train,0.25\n' for b in cohort))
    config = import_config(manifest, folder, **{'features.format': tool,
                                                'features.patch_size_level0': STEP})
    assert pipeline.run(config, tmp_path / 'workdir', ['import']) == 0
    for bag in cohort:
        graph = artifacts.load_npz(graph_path(tmp_path / 'workdir', bag.slide_id))
        coords = bag.grid[:, ::-1] * STEP + np.asarray(ORIGIN)
        np.testing.assert_array_equal(graph['coords'], coords[graph['kept']])
        np.testing.assert_array_equal(graph['grid'], np.rint(coords[graph['kept']][:, ::-1]
                                                             / STEP))
        features = bag.features if tool == 'clam' else bag.features.astype(np.float16)
        np.testing.assert_array_equal(graph['features'], features[graph['kept']])


def test_new_slides_predict_from_their_own_import_folder(imported, tmp_path):
    workdir, folder, manifest, cohort = imported
    new = tmp_path / 'new'
    new.mkdir()
    tests = [b for b, s in zip(cohort, SPLITS) if s == 'test']
    renamed = [dataclasses.replace(b, slide_id=f'new_{b.slide_id}') for b in tests]
    predict_manifest = write_cohort(new, renamed, splits=['test'] * len(renamed))
    config = import_config(manifest, folder, **{'predict.manifest': str(predict_manifest),
                                                'predict.import_dir': str(new)})
    assert pipeline.run(config, workdir, ['predict']) == 0
    predicted = report.read_predictions(workdir / 'predict' / 'predictions.csv', CLASSES)
    evaluated = report.read_predictions(workdir / 'eval' / 'test' / 'predictions.csv', CLASSES)
    assert predicted[0] == [b.slide_id for b in renamed]
    np.testing.assert_allclose(predicted[2], evaluated[2], atol=1e-6)
    assert all((workdir / 'predict' / 'geojson' / f'{b.slide_id}.geojson').exists()
               for b in renamed)

