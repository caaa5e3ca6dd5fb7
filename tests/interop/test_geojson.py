"""QuPath GeoJSON: tissue polygons against scikit-image masks, the exported collection, reading
regions of interest shaped like QuPath's exports, and the roi mask against a brute-force loop."""

import json
import uuid

import numpy as np
import pytest
import shapely
from shapely.geometry import Point, shape
from skimage import draw

from pathjax.interop import geojson


def centres_inside(geometry, mask_shape, slide_size):
    """bool [h, w]: mask pixel centres (level-0) inside `geometry`, on the full grid at once."""
    rows, columns = mask_shape
    width, height = slide_size
    xs = (np.arange(columns) + 0.5) * width / columns
    ys = (np.arange(rows) + 0.5) * height / rows
    return shapely.contains_xy(geometry, xs[None, :], ys[:, None])


def disk(shape_, centre, radius):
    mask = np.zeros(shape_, bool)
    mask[draw.disk(centre, radius, shape=shape_)] = True
    return mask


def masks():
    """name -> (bool mask [h, w], level-0 slide size (W, H)); the last one has W/w != H/h."""
    rectangle = np.zeros((120, 160), bool)
    rectangle[draw.rectangle((10, 20), (70, 130), shape=rectangle.shape)] = True
    ring = disk((140, 140), (70, 70), 60) & ~disk((140, 140), (70, 70), 25)
    blobs = disk((120, 200), (40, 50), 30) | disk((120, 200), (80, 150), 25)
    edge = disk((100, 150), (50, 0), 45)  # cut by the slide's left edge
    ellipse = np.zeros((90, 200), bool)
    ellipse[draw.ellipse(45, 100, 35, 80, shape=ellipse.shape)] = True
    return {'disk': (disk((150, 150), (75, 75), 50), (15_000, 15_000)),
            'rectangle': (rectangle, (8_000, 6_000)), 'ring': (ring, (7_000, 7_000)),
            'blobs': (blobs, (20_000, 12_000)), 'edge': (edge, (3_000, 2_000)),
            'non-square scale': (ellipse, (30_000, 4_500))}


@pytest.mark.parametrize('name', list(masks()))
def test_tissue_polygons_match_the_mask(name):
    mask, size = masks()[name]
    pixel_w, pixel_h = size[0] / mask.shape[1], size[1] / mask.shape[0]
    tissue = geojson.tissue_polygons(mask, size, tolerance_pixels=1.0)
    assert isinstance(tissue, shapely.MultiPolygon) and tissue.is_valid
    assert all(part.is_valid for part in tissue.geoms)
    assert shapely.box(0, 0, *size).covers(tissue)
    true_area = mask.sum() * pixel_w * pixel_h
    allowed = 0.02 * true_area + tissue.length * 1.0 * max(pixel_w, pixel_h)
    assert abs(tissue.area - true_area) < allowed
    assert (centres_inside(tissue, mask.shape, size) == mask).mean() >= 0.98


@pytest.mark.parametrize('name', list(masks()))
def test_tissue_polygons_without_simplification_are_the_exact_pixels(name):
    mask, size = masks()[name]
    tissue = geojson.tissue_polygons(mask, size, tolerance_pixels=0)
    assert tissue.is_valid
    assert tissue.area == pytest.approx(mask.sum() * size[0] * size[1] / mask.size, rel=1e-9)
    np.testing.assert_array_equal(centres_inside(tissue, mask.shape, size), mask)


def test_tissue_polygons_keep_holes_and_separate_blobs():
    ring, size = masks()['ring']
    (polygon,) = geojson.tissue_polygons(ring, size).geoms
    assert len(polygon.interiors) == 1
    hole = shapely.Polygon(polygon.interiors[0])
    assert hole.contains(Point(3500, 3500))  # the centre of the 140 x 140 mask on a 7000 px slide
    blobs, size = masks()['blobs']
    assert len(geojson.tissue_polygons(blobs, size).geoms) == 2


def test_tissue_polygons_are_exact_on_random_speckle():
    """Reference: the union of one box per True pixel; speckle stresses the coverage trick
    (diagonal neighbours, runs ending under other runs)."""
    rng = np.random.default_rng(0)
    for _ in range(40):
        mask = rng.random(tuple(rng.integers(1, 16, 2))) < rng.uniform(0.2, 0.9)
        if not mask.any():
            continue
        size = (mask.shape[1] * 10, mask.shape[0] * 10)
        tissue = geojson.tissue_polygons(mask, size, tolerance_pixels=0)
        reference = shapely.union_all([shapely.box(10 * c, 10 * r, 10 * c + 10, 10 * r + 10)
                                       for r, c in zip(*np.nonzero(mask))])
        assert tissue.is_valid
        assert tissue.symmetric_difference(reference).area < 1e-6


def test_tissue_polygons_empty_mask():
    tissue = geojson.tissue_polygons(np.zeros((30, 40), bool), (4000, 3000))
    assert isinstance(tissue, shapely.MultiPolygon) and tissue.is_empty


def test_large_or_speckled_masks_are_reduced_by_block_max(monkeypatch):
    """Above MAX_MASK_SIDE or MAX_MASK_RUNS the mask is coarsened, never losing tissue."""
    rng = np.random.default_rng(1)
    mask = disk((130, 97), (60, 50), 40) | (rng.random((130, 97)) < 0.005)
    size = (9_700, 13_000)
    exact_area = mask.sum() * 100 * 100
    for side, runs in ((32, 1 << 15), (1024, 50)):
        monkeypatch.setattr(geojson, 'MAX_MASK_SIDE', side)
        monkeypatch.setattr(geojson, 'MAX_MASK_RUNS', runs)
        tissue = geojson.tissue_polygons(mask, size, tolerance_pixels=0)
        assert tissue.is_valid and shapely.box(0, 0, *size).covers(tissue)
        assert centres_inside(tissue, mask.shape, size)[mask].all()
        assert exact_area < tissue.area < 0.8 * size[0] * size[1]  # coarser, not everything


def collection(tissue=None):
    coords = np.array([[0, 0], [512, 0], [512, 512], [1800, 900]])  # the last crosses the corner
    scores = np.array([0.1, 0.5, np.nan, 2.0], np.float32)
    return geojson.slide_features('slide-7', coords, 512.0, scores, 'attention',
                                  {'tumour': 0.75, 'normal': 0.25}, 'tumour', tissue,
                                  (2000, 1200))


def test_slide_features_are_qupath_detections_and_annotations():
    ring, size = masks()['ring']
    tissue = geojson.tissue_polygons(ring, (2000, 1200))
    features = collection(tissue)
    assert json.loads(json.dumps(features, allow_nan=False)) == features
    assert features['type'] == 'FeatureCollection'
    detections = [f for f in features['features'] if f['properties']['objectType'] == 'detection']
    annotations = [f for f in features['features']
                   if f['properties']['objectType'] == 'annotation']
    assert len(detections) == 4 and len(annotations) == len(tissue.geoms) == 1
    slide = shapely.box(0, 0, 2000, 1200)
    for feature in features['features']:
        assert feature['type'] == 'Feature' and uuid.UUID(feature['id'])
        geometry = shape(feature['geometry'])
        assert geometry.is_valid and slide.covers(geometry)
        assert shapely.is_ccw(geometry.exterior)  # positive shoelace area: the written convention
        assert not any(shapely.is_ccw(hole) for hole in geometry.interiors)
        color = feature['properties']['classification']['color']
        assert len(color) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in color)
    assert len({f['id'] for f in features['features']}) == 5
    measurements = [d['properties']['measurements'] for d in detections]
    assert [m['attention'] for m in measurements] == [pytest.approx(0.1), 0.5, 'NaN', 2.0]
    assert all(m['probability tumour'] == 0.75 and m['probability normal'] == 0.25
               for m in measurements)
    assert {d['properties']['classification']['name'] for d in detections} == {'tumour'}
    assert shape(detections[0]['geometry']).bounds == (0, 0, 512, 512)
    assert shape(detections[3]['geometry']).bounds == (1800, 900, 2000, 1200)  # clipped
    (annotation,) = annotations
    assert annotation['properties']['classification']['name'] == 'Tissue'
    assert len(annotation['geometry']['coordinates']) == 2  # shell and hole
    assert shape(annotation['geometry']).symmetric_difference(tissue).area < 1e-6
    assert collection(tissue) == features  # the ids are derived, not random


def test_slide_features_refuses_a_patch_off_the_slide():
    with pytest.raises(ValueError, match='patch 0'):
        geojson.slide_features('s', np.array([[3000, 0]]), 512.0, np.zeros(1), 'score',
                               {'a': 1.0}, 'a', None, (2000, 1200))


def test_write_is_compact_strict_json_that_read_roi_reads_back(tmp_path):
    ring, _ = masks()['ring']
    tissue = geojson.tissue_polygons(ring, (2000, 1200))
    features = collection(tissue)
    path = tmp_path / 'out' / 'slide.geojson'
    geojson.write(path, features)
    text = path.read_text()
    assert text == json.dumps(features, separators=(',', ':'))
    assert json.loads(text, parse_constant=pytest.fail) == features
    geojson.write(path, geojson.slide_features('s', np.zeros((0, 2), int), 512.0, np.zeros(0),
                                               'score', {'a': 1.0}, 'a', tissue, (2000, 1200)))
    assert geojson.read_roi(path).symmetric_difference(tissue).area < 1e-6


SQUARE_WITH_HOLE = [[[1000, 1000], [5000, 1000], [5000, 4000], [1000, 4000], [1000, 1000]],
                    [[2000, 2000], [2000, 3000], [3000, 3000], [3000, 2000], [2000, 2000]]]
TWO_TRIANGLES = [[[[6000, 0], [8000, 0], [7000, 1500], [6000, 0]]],
                 [[[6000.5, 5000.25], [7000, 6000], [6000.5, 6000], [6000.5, 5000.25]]]]


def qupath_feature(geometry, classification, color, **properties):
    """A Feature the way QuPath (>= 0.4) exports an annotation."""
    return {'type': 'Feature', 'id': str(uuid.uuid4()), 'geometry': geometry,
            'properties': {'objectType': 'annotation',
                           'classification': {'name': classification, 'color': color},
                           **properties}}


def expected_roi():
    return shapely.union_all([shapely.Polygon(SQUARE_WITH_HOLE[0], SQUARE_WITH_HOLE[1:]),
                              *(shapely.Polygon(p[0]) for p in TWO_TRIANGLES)])


def qupath_features():
    return [qupath_feature({'type': 'Polygon', 'coordinates': SQUARE_WITH_HOLE}, 'Tumor',
                           [200, 0, 0], isLocked=True),
            qupath_feature({'type': 'MultiPolygon', 'coordinates': TWO_TRIANGLES}, 'Stroma',
                           [150, 200, 150], name='stroma 1', measurements={'Area': 1.5}),
            qupath_feature({'type': 'Point', 'coordinates': [100.0, 200.0]}, 'Other',
                           [0, 0, 255])]


@pytest.mark.parametrize('form', ['FeatureCollection', 'pretty', 'bare list', 'one Feature',
                                  'bare geometry', 'GeometryCollection'])
def test_read_roi_reads_qupath_exports(tmp_path, form):
    features = qupath_features()
    document = {
        'FeatureCollection': {'type': 'FeatureCollection', 'features': features},
        'pretty': {'type': 'FeatureCollection', 'features': features},
        'bare list': features,  # QuPath's export with the FeatureCollection box unticked
        'one Feature': qupath_feature({'type': 'MultiPolygon', 'coordinates':
                                       [SQUARE_WITH_HOLE, *TWO_TRIANGLES]}, 'Tumor', [200, 0, 0]),
        'bare geometry': {'type': 'MultiPolygon', 'coordinates': [SQUARE_WITH_HOLE,
                                                                  *TWO_TRIANGLES]},
        'GeometryCollection': {'type': 'GeometryCollection', 'geometries': [
            {'type': 'Polygon', 'coordinates': SQUARE_WITH_HOLE},
            {'type': 'LineString', 'coordinates': [[0, 0], [5, 5]]},
            {'type': 'MultiPolygon', 'coordinates': TWO_TRIANGLES}]},
    }[form]
    path = tmp_path / 'roi.geojson'
    path.write_text(json.dumps(document, indent=2 if form == 'pretty' else None))
    roi = geojson.read_roi(path)
    assert isinstance(roi, (shapely.Polygon, shapely.MultiPolygon)) and roi.is_valid
    assert roi.symmetric_difference(expected_roi()).area < 1e-9
    assert not roi.contains(Point(2500, 2500))  # the hole is kept


def test_read_roi_repairs_a_bow_tie(tmp_path):
    path = tmp_path / 'bow.geojson'
    path.write_text(json.dumps({'type': 'Polygon', 'coordinates': [
        [[0, 0], [10, 10], [10, 0], [0, 10], [0, 0]]]}))
    roi = geojson.read_roi(path)
    assert roi.is_valid and not roi.is_empty and roi.area == pytest.approx(50)


def _write(path, text):
    path.write_text(text)
    return path


@pytest.mark.parametrize('text, message', [
    ('{"type": "FeatureCollection", "features": [', 'not valid JSON'),
    ('[1, 2, 3]', 'feature 0: expected a GeoJSON Feature'),
    (json.dumps({'type': 'FeatureCollection', 'features': [
        {'type': 'Feature', 'geometry': {'type': 'Point', 'coordinates': [1, 2]}},
        {'type': 'Feature', 'geometry': {'type': 'LineString', 'coordinates': [[1, 2], [3, 4]]}}]}),
     r'holds no polygons \(found: Point, LineString\)'),
    ('{"type": "FeatureCollection", "features": []}', 'holds no polygons'),
    (json.dumps({'type': 'FeatureCollection', 'features': [
        {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': SQUARE_WITH_HOLE}},
        {'type': 'Feature', 'geometry': {'type': 'Polygon', 'coordinates': [
            [[0, 0], [1, float('nan')], [1, 1], [0, 0]]]}}]}),
     'feature 1 > ring 0: a coordinate is NaN'),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}', 'at least 4 positions, found 2'),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [1, 0], [1, 1], [0, 1]]]}', 'not closed'),
    ('{"type": "Polygon", "coordinates": [[[0, 0], ["1", 0], [1, 1], [0, 0]]]}',
     'arrays of 2 or 3 numbers'),
    ('{"type": "Feature", "geometry": {"type": "Circle"}}', 'not a GeoJSON geometry'),
    ('{"type": "Polygon", "coordinates": [[[0, 0], [0, 0], [0, 0], [0, 0]]]}', 'no area'),
])
def test_read_roi_refuses_bad_files(tmp_path, text, message):
    path = _write(tmp_path / 'bad.geojson', text)
    with pytest.raises(geojson.RoiError, match=message) as caught:
        geojson.read_roi(path)
    assert str(path) in str(caught.value)


def test_read_roi_caps_bytes_and_vertices(tmp_path, monkeypatch):
    path = _write(tmp_path / 'roi.geojson', json.dumps({'type': 'FeatureCollection', 'features':
                                                         qupath_features()}))
    monkeypatch.setattr(geojson, 'MAX_ROI_BYTES', 100)
    with pytest.raises(geojson.RoiError, match='over the 100-byte limit') as caught:
        geojson.read_roi(path)
    assert str(path) in str(caught.value)
    monkeypatch.setattr(geojson, 'MAX_ROI_BYTES', 1 << 20)
    monkeypatch.setattr(geojson, 'MAX_ROI_VERTICES', 12)
    with pytest.raises(geojson.RoiError, match='feature 1: more than 12 vertices in all'):
        geojson.read_roi(path)


def brute_force_mask(roi, mask_shape, slide_size):
    rows, columns = mask_shape
    width, height = slide_size
    return np.array([[roi.contains(Point((c + 0.5) * width / columns, (r + 0.5) * height / rows))
                      for c in range(columns)] for r in range(rows)])


@pytest.mark.parametrize('roi', [
    shapely.Polygon([(300, 100), (2900, 200), (2500, 1100), (200, 900)],
                    [[(1000, 400), (1800, 400), (1400, 800)]]),
    shapely.MultiPolygon([shapely.Polygon([(-500, -500), (900, -100), (400, 600)]),
                          shapely.Polygon(SQUARE_WITH_HOLE[0], SQUARE_WITH_HOLE[1:])]),
    shapely.Polygon([(9000, 9000), (9500, 9000), (9500, 9500)]),  # off the slide
])
def test_roi_mask_matches_a_per_pixel_loop(roi, monkeypatch):
    monkeypatch.setattr(geojson, '_BAND_PIXELS', 50)  # several bands
    mask_shape, slide_size = (23, 31), (3100, 1150)
    expected = brute_force_mask(roi, mask_shape, slide_size)
    got = geojson.roi_mask(roi, mask_shape, slide_size)
    assert got.dtype == bool and got.shape == mask_shape
    np.testing.assert_array_equal(got, expected)


def test_read_roi_ignores_qupath_detections(tmp_path):
    """An export of all objects: the annotation is the region, its cell detections are not."""
    region = shapely.box(0, 0, 100, 100)
    cell = shapely.box(500, 500, 510, 510)
    path = tmp_path / 'all_objects.geojson'
    path.write_text(json.dumps({'type': 'FeatureCollection', 'features': [
        {'type': 'Feature', 'geometry': shapely.geometry.mapping(region),
         'properties': {'objectType': 'annotation'}},
        {'type': 'Feature', 'geometry': shapely.geometry.mapping(cell),
         'properties': {'objectType': 'cell'}}]}))
    assert geojson.read_roi(path).equals(region)


def test_tissue_polygons_leave_out_islands_and_holes_below_min_area():
    mask = np.zeros((100, 100), bool)
    mask[10:60, 10:60] = True
    mask[30:32, 30:32] = False  # a 4-pixel hole
    mask[20:40, 20:22] = False  # a 40-pixel hole
    mask[80, 80] = True  # a speck
    region = geojson.tissue_polygons(mask, (100, 100), tolerance_pixels=0, min_area=10)
    assert len(region.geoms) == 1 and region.is_valid
    holes = sorted(shapely.Polygon(r).area for r in region.geoms[0].interiors)
    assert holes == [40.0]
    assert region.area == 2500 - 40
