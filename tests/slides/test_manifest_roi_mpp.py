"""The manifest's optional `roi` (a QuPath GeoJSON export: only patches inside it are tiled) and
`mpp` (overrides the slide's metadata) columns, their bad values, and a rerun after either
changes."""

import json

import pytest
import shapely
from shapely.geometry import Polygon, box, mapping

from pathjax import artifacts, pipeline
from pathjax.errors import StageError
from pathjax.slides import synthetic_cohort
from pathjax.slides.reader import Slide
from tests.conftest import make_config

MIN_FRACTION = make_config().tissue.min_fraction
MARGIN = 0.15  # area fraction: the ROI is rasterized on the tissue mask's overview pixels


@pytest.fixture(scope='module')
def slides(tmp_path_factory):
    """Two synthetic slides (their manifest rows) and their level-0 size."""
    manifest = synthetic_cohort.make_cohort(tmp_path_factory.mktemp('slides'), 2, width=2048,
                                            height=1536)
    rows = manifest.read_text().splitlines()
    with Slide(rows[1].split(',')[1]) as slide:
        return rows, slide.dimensions, slide.mpp


def qupath_export(path, geometry):
    """A FeatureCollection of one annotation, as QuPath's "Export objects as GeoJSON" writes."""
    path.write_text(json.dumps({'type': 'FeatureCollection', 'features': [{
        'type': 'Feature', 'id': '1b0c5d33-7f64-4e39-9a43-2f1b0d2d0b51',
        'geometry': mapping(geometry),
        'properties': {'objectType': 'annotation',
                       'classification': {'name': 'Tumor', 'color': [200, 0, 0]}}}]}))
    return path


def tile(tmp_path, rows, extra_columns, name='workdir', some_ok=True):
    """Runs the tile stage on the rows with extra manifest columns; returns (workdir, report).
    Without `some_ok`, no slide is expected to be tiled (the stage stops the run)."""
    header, *body = rows
    manifest = tmp_path / f'{name}.csv'
    names = list(extra_columns)
    manifest.write_text('\n'.join([header + ''.join(f',{n}' for n in names)] + [
        row + ''.join(f',{extra_columns[n][i]}' for n in names) for i, row in enumerate(body)])
        + '\n')
    workdir = tmp_path / name
    config = make_config(**{'data.manifest': str(manifest)})
    if some_ok:
        assert pipeline.run(config, workdir, ['tile']) == 0
    else:
        with pytest.raises(StageError, match='no slide could be processed'):
            pipeline.run(config, workdir, ['tile'])
    report = json.loads((workdir / 'reports' / 'tile.json').read_text())
    return workdir, {e['slide_id']: e for e in report['slides']}


def kept(workdir, slide_id):
    tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz')
    return {tuple(c) for c in tiles['coords'].tolist()}, float(tiles['extent'])


def test_only_patches_inside_the_roi_are_tiled(slides, tmp_path):
    rows, (width, height), _ = slides
    ids = [row.split(',')[0] for row in rows[1:]]
    holed = Polygon([(0.1 * width, 0.1 * height), (0.8 * width, 0.1 * height),
                     (0.8 * width, 0.9 * height), (0.1 * width, 0.9 * height)],
                    [[(0.3 * width, 0.3 * height), (0.6 * width, 0.3 * height),
                      (0.6 * width, 0.7 * height), (0.3 * width, 0.7 * height)]])
    parts = shapely.MultiPolygon([box(0, 0, 0.45 * width, 0.5 * height),
                                  box(0.55 * width, 0.5 * height, width, height)])
    rois = [qupath_export(tmp_path / 'holed.geojson', holed),
            qupath_export(tmp_path / 'parts.geojson', parts)]
    plain, _ = tile(tmp_path, rows, {}, 'plain')
    cut, report = tile(tmp_path, rows, {'roi': rois}, 'cut')
    for slide_id, roi in zip(ids, (holed, parts)):
        assert report[slide_id]['status'] == 'ok'
        everything, extent = kept(plain, slide_id)
        inside, _ = kept(cut, slide_id)
        assert inside <= everything and 0 < len(inside) < len(everything)
        for x, y in everything:  # against the exact area of each patch inside the ROI
            share = box(x, y, x + extent, y + extent).intersection(roi).area / extent ** 2
            if share < MIN_FRACTION - MARGIN:
                assert (x, y) not in inside, (slide_id, x, y, share)
            if share == 1.0:
                assert (x, y) in inside, (slide_id, x, y, share)
    qc = cut / 'qc' / f'{ids[0]}.png'
    assert qc.exists()


def test_bad_roi_files_are_reported_by_name(slides, tmp_path):
    rows, (width, height), _ = slides
    points = tmp_path / 'points.geojson'
    points.write_text(json.dumps({'type': 'FeatureCollection', 'features': [{
        'type': 'Feature', 'geometry': {'type': 'Point', 'coordinates': [10, 10]},
        'properties': {'objectType': 'annotation'}}]}))
    away = qupath_export(tmp_path / 'away.geojson', box(10 * width, 10 * height,
                                                         11 * width, 11 * height))
    _, report = tile(tmp_path, rows, {'roi': [points, away]}, some_ok=False)
    first, second = (report[row.split(',')[0]] for row in rows[1:])
    assert first['status'] == 'error' and 'points.geojson' in first['message'], first
    assert second['status'] == 'no_tissue' and 'away.geojson' in second['message'], second
    assert 'misses every tissue patch' in second['message']


def test_the_manifest_mpp_overrides_the_slide_and_a_change_redoes_it(slides, tmp_path):
    rows, _, slide_mpp = slides
    ids = [row.split(',')[0] for row in rows[1:]]
    workdir, report = tile(tmp_path, rows, {'mpp': [slide_mpp * 2, '']})
    overridden, extent = kept(workdir, ids[0])
    _, native_extent = kept(workdir, ids[1])
    patch_mpp = make_config().tile.mpp
    assert extent == pytest.approx(64 * patch_mpp / (slide_mpp * 2))
    assert native_extent == pytest.approx(64 * patch_mpp / slide_mpp)
    assert report[ids[0]]['mpp'] == pytest.approx(patch_mpp, rel=0.05)
    # Another mpp in the same workdir redoes that slide's tiles (the other keeps its scan; its
    # stain lookup table is refitted when the changed slide shaped the cohort's reference).
    _, again = tile(tmp_path, rows, {'mpp': [slide_mpp, '']})
    assert "the manifest's mpp changed" in again[ids[0]]['redone']
    assert 'mpp' not in again[ids[1]].get('redone', '')
    assert kept(workdir, ids[0])[1] == pytest.approx(native_extent)


def test_an_mpp_that_is_not_a_positive_number_skips_the_slide(slides, tmp_path):
    rows, _, _ = slides
    ids = [row.split(',')[0] for row in rows[1:]]
    for bad in ('abc', '-0.5', '0', 'nan'):
        _, report = tile(tmp_path, rows, {'mpp': [bad, '']}, f'bad{len(bad)}{bad[0]}')
        assert report[ids[0]]['status'] == 'error'
        assert f"mpp '{bad}'" in report[ids[0]]['message'] and 'line 2' in report[ids[0]]['message']
        assert report[ids[1]]['status'] == 'ok'
