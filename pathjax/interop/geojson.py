"""QuPath-compatible GeoJSON: patch scores (detections) and tissue (annotations) out, a region
of interest drawn in QuPath in. Coordinates are level-0 pixels, x right, y down."""

# QuPath's layout, read in github.com/qupath/qupath at e7662d89ec70be3015885ef1fd1b2ffa77515613:
# - qupath-core/src/main/java/qupath/lib/io/QuPathTypeAdapters.java (PathObjectTypeAdapter,
#   MeasurementListTypeAdapter): an object is {"type": "Feature", "id": <UUID, since v0.4>,
#   "geometry": ..., "properties": {"objectType": "annotation" | "detection" | "tile" | "cell" |
#   "tmaCore", "name", "color": [r, g, b], "classification", "isLocked": true (only when locked),
#   "measurements": {name: number}, "metadata": {name: string}}}. Measurements are a map since
#   v0.4 (NaN / infinities as the strings "NaN", "Infinity", "-Infinity"); the reader also takes
#   the older list [{"name": ..., "value": ...}]. No objectType reads as an annotation.
# - qupath-core/src/main/java/qupath/lib/io/GsonTools.java (PathClassTypeAdapter): classification
#   is {"name": n, "color": [r, g, b]} ("names": [...] for derived classes); the reader refuses
#   one with a name but no color, so a color is always written here. A name holding ':' reads as
#   a derived class.
# - qupath-core/src/main/java/qupath/lib/io/ROITypeAdapters.java: plain GeoJSON geometries in
#   level-0 pixels, 2 decimals; a Polygon is [shell, hole, ...], a MultiPolygon a list of those.
#   Ring orientation is written as JTS holds it (not normalised) and the reader takes the first
#   ring as the shell whatever its orientation.
# - qupath-core/src/main/java/qupath/lib/io/PathIO.java (exportObjectsAsGeoJSON) with
#   qupath-gui-fx/src/main/java/qupath/lib/gui/commands/ExportObjectsCommand.java: "Export
#   objects as GeoJSON" writes a FeatureCollection when its "FeatureCollection" box is ticked (the
#   default; "pretty" only indents), otherwise one Feature, or a bare array of Features for
#   several objects. GsonTools.parseObjectsFromGeoJSON reads all of these, bare geometries (as
#   annotations) and arrays of any of them.
# Orientation written here: RFC 7946's rule applied to the numbers (exterior rings have positive
# shoelace area, holes negative), which looks clockwise on screen as y points down; QuPath ignores
# orientation either way.

import colorsys
import json
import math
import os
import pathlib
import uuid
import zlib
from typing import Any, Iterator

import numpy as np
import shapely

from pathjax.artifacts import atomic_path

MAX_MASK_SIDE = 1024
MAX_MASK_RUNS = 1 << 15
MAX_ROI_BYTES = 64 << 20
MAX_ROI_VERTICES = 1_000_000
_MAX_NESTING = 32
_BAND_PIXELS = 1 << 20
_POLYGONAL = ('Polygon', 'MultiPolygon')
_GEOMETRY_TYPES = ('Point', 'MultiPoint', 'LineString', 'MultiLineString', *_POLYGONAL,
                   'GeometryCollection')
_IDS = uuid.uuid5(uuid.NAMESPACE_URL, 'pathjax:interop/geojson')


class RoiError(ValueError):
    """A region-of-interest file cannot be used; the message names the file and the problem."""


def tissue_polygons(mask: np.ndarray, slide_size: tuple[int, int],
                    tolerance_pixels: float = 1.0, min_area: float = 0.0) -> shapely.MultiPolygon:
    """The tissue region of a slide as polygons in level-0 pixels.

    Bounded cost: a mask whose long side exceeds MAX_MASK_SIDE, or which holds more than
    MAX_MASK_RUNS runs of True pixels (rows of speckle), is reduced by block max (a block is
    tissue if any of its pixels is, so no tissue is lost), by the smallest integer factor for
    the side and then by further halvings for the runs. The True pixels of that mask are united
    exactly (_pixel_polygons), simplified by shapely.coverage_simplify (Visvalingam-Whyatt:
    removes bumps of area below tolerance_pixels**2, never removes a ring or makes polygons
    overlap; near-linear, where GEOS's TopologyPreservingSimplifier took seconds on speckled
    masks), repaired, scaled to level 0 and clipped to the slide box.

    Args:
      mask: bool [h, w] covering the whole slide; pixel (r, c) covers x in [c W/w, (c+1) W/w)
        and y in [r H/h, (r+1) H/h).
      slide_size: (W, H) level-0 size.
      tolerance_pixels: simplification tolerance in pixels of the (reduced) mask; 0 keeps the
        exact pixel outline.
      min_area: islands and holes of less area (level-0 pixels squared) are left out: specks
        that hold no patch are noise on a pathologist's screen.

    Returns:
      A valid MultiPolygon (holes kept), empty when the mask holds no True pixel.
    """
    mask = np.asarray(mask)
    width, height = _slide_size(slide_size)
    if mask.ndim != 2 or 0 in mask.shape:
        raise ValueError(f'the tissue mask must be a non-empty 2-d array, not shape {mask.shape}')
    if not (math.isfinite(tolerance_pixels) and tolerance_pixels >= 0):
        raise ValueError(f'tolerance_pixels must be finite and >= 0, not {tolerance_pixels}')
    rows, columns = mask.shape
    factor = -(-max(rows, columns) // MAX_MASK_SIDE)
    mask = _block_max(mask.astype(bool), factor)
    while _run_count(mask) > MAX_MASK_RUNS:
        mask = _block_max(mask, 2)
        factor *= 2
    if not mask.any():
        return shapely.MultiPolygon()
    parts = shapely.get_parts(_pixel_polygons(mask))
    if tolerance_pixels > 0:
        parts = shapely.coverage_simplify(parts, tolerance_pixels)
    region = _polygons(shapely.make_valid(shapely.MultiPolygon(list(parts))))
    scale = np.array([factor * width / columns, factor * height / rows])
    region = shapely.transform(region, lambda xy: xy * scale)
    region = _polygons(shapely.intersection(region, shapely.box(0, 0, width, height)))
    if min_area > 0:  # dropping a hole or a whole polygon keeps the rest valid
        region = shapely.MultiPolygon([
            shapely.Polygon(p.exterior, [r for r in p.interiors
                                         if shapely.Polygon(r).area >= min_area])
            for p in region.geoms if p.area >= min_area])
    return region


def slide_features(slide_id: str, coords: np.ndarray, extent: float, scores: np.ndarray,
                   score_name: str, probabilities: dict[str, float], predicted: str,
                   tissue: shapely.Geometry | None,
                   slide_size: tuple[int, int] | None) -> dict:
    """One slide's results as a GeoJSON FeatureCollection that QuPath imports, in level-0 pixels.

    Every scored patch becomes a square detection named 'patch <i>', classified as `predicted`,
    with measurements {score_name: score, 'probability <class>': p, ...}; every tissue polygon
    becomes an annotation classified 'Tissue' (holes kept). Feature ids are UUIDs derived from
    `slide_id`, so the same inputs give the same file.

    Args:
      slide_id: the slide's id (seeds the feature ids, named in the annotations' metadata).
      coords: [n, 2] level-0 top-left (x, y) of the patches.
      extent: level-0 side of a patch (> 0).
      scores: [n] one score per patch.
      score_name: the score's measurement name.
      probabilities: class name -> slide-level probability.
      predicted: the predicted class, one of `probabilities`.
      tissue: polygons in level-0 pixels (e.g. from tissue_polygons), or None.
      slide_size: (W, H); when given, patches and tissue are clipped to the slide.

    Returns:
      {'type': 'FeatureCollection', 'features': [...]} of plain JSON values (non-finite
      measurements as QuPath's strings 'NaN', 'Infinity', '-Infinity').
    """
    coords = np.asarray(coords)
    scores = np.asarray(scores)
    if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in 'iuf':
        raise ValueError(f'coords must be numbers of shape [n, 2], not {coords.dtype} '
                         f'{coords.shape}')
    if scores.shape != coords.shape[:1] or scores.dtype.kind not in 'iuf':
        raise ValueError(f'scores must be numbers of shape [{len(coords)}], not {scores.dtype} '
                         f'{scores.shape}')
    if not np.isfinite(coords).all():
        raise ValueError('coords hold a non-finite value')
    if not (math.isfinite(extent) and extent > 0):
        raise ValueError(f'extent must be finite and > 0, not {extent}')
    if predicted not in probabilities:
        raise ValueError(f'the predicted class {predicted!r} is not one of {list(probabilities)}')
    slide_measurements = {f'probability {name}': _number(p) for name, p in probabilities.items()}
    if score_name in slide_measurements:
        raise ValueError(f'the score name {score_name!r} clashes with a probability measurement')

    low = coords.astype(float)
    high = low + float(extent)
    if slide_size is not None:
        width, height = _slide_size(slide_size)
        low, high = np.maximum(low, 0.0), np.minimum(high, [width, height])
        outside = np.flatnonzero((high <= low).any(axis=1))
        if outside.size:
            raise ValueError(f'patch {outside[0]} at {coords[outside[0]].tolist()} lies outside '
                             f'the {width} x {height} slide')
    detection_class = _classification(predicted)
    features = []
    for i, ((x0, y0), (x1, y1), score) in enumerate(zip(low.tolist(), high.tolist(),
                                                         scores.tolist())):
        features.append({
            'type': 'Feature',
            'id': str(uuid.uuid5(_IDS, f'{slide_id}/detection/{i}')),
            'geometry': {'type': 'Polygon',
                         'coordinates': [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]},
            'properties': {'objectType': 'detection', 'name': f'patch {i}',
                           'classification': detection_class,
                           'measurements': {score_name: _number(score), **slide_measurements}},
        })
    if tissue is not None:
        if slide_size is not None:
            tissue = shapely.intersection(tissue, shapely.box(0, 0, *_slide_size(slide_size)))
        tissue = shapely.orient_polygons(_polygons(tissue))
        for k, polygon in enumerate(tissue.geoms):
            rings = [polygon.exterior, *polygon.interiors]
            features.append({
                'type': 'Feature',
                'id': str(uuid.uuid5(_IDS, f'{slide_id}/tissue/{k}')),
                'geometry': {'type': 'Polygon',
                             'coordinates': [shapely.get_coordinates(r).tolist() for r in rings]},
                'properties': {'objectType': 'annotation', 'name': f'tissue {k}',
                               'classification': _classification('Tissue'),
                               'metadata': {'slide_id': slide_id}},
            })
    return {'type': 'FeatureCollection', 'features': features}


def write(path: str | os.PathLike, collection: dict) -> None:
    """Writes `collection` as compact strict JSON (no NaN tokens), atomically."""
    text = json.dumps(collection, separators=(',', ':'), allow_nan=False)
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding='utf-8')


def read_roi(path: str | os.PathLike) -> shapely.Polygon | shapely.MultiPolygon:
    """The region of interest in a GeoJSON file, e.g. annotations exported from QuPath.

    Takes a FeatureCollection, a single Feature, a bare array of those, or bare geometries (a
    GeometryCollection included). All Polygon and MultiPolygon geometries are united; other
    geometries, and QuPath objects other than annotations (detections, cells, tiles), are
    ignored. Invalid (e.g. self-intersecting) polygons are repaired with
    shapely.make_valid, keeping the polygonal part.

    Args:
      path: the GeoJSON file, coordinates in level-0 pixels.

    Returns:
      A valid, non-empty Polygon or MultiPolygon in level-0 pixels.

    Raises:
      RoiError: the file is too large, not JSON, not GeoJSON, holds bad coordinates or too many
        vertices, or no polygon with an area; the message names the file and the feature.
      OSError: the file cannot be read.
    """
    size = os.stat(path).st_size
    if size > MAX_ROI_BYTES:
        raise RoiError(f'{path}: {size} bytes is over the {MAX_ROI_BYTES}-byte limit for a roi '
                       'file')
    try:
        document = json.loads(pathlib.Path(path).read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError
        raise RoiError(f'{path}: not valid JSON ({error})') from None
    found: list[str] = []
    polygons: list[shapely.Geometry] = []
    vertices = 0
    for where, geometry in _geometries(document, path):
        kind = geometry['type']
        if kind not in found:
            found.append(kind)
        if kind not in _POLYGONAL:
            continue
        for polygon in (_polygon_rings(geometry['coordinates'], path, where) if kind == 'Polygon'
                        else _multipolygon_rings(geometry['coordinates'], path, where)):
            vertices += sum(len(ring) for ring in polygon)
            if vertices > MAX_ROI_VERTICES:
                raise RoiError(f'{_place(path, where)}: more than {MAX_ROI_VERTICES} vertices '
                               'in all')
            if polygon:
                polygons.append(shapely.make_valid(shapely.Polygon(polygon[0], polygon[1:])))
    if not any(kind in _POLYGONAL for kind in found):
        raise RoiError(f'{path}: holds no polygons (found: {", ".join(found) or "nothing"})')
    roi = _polygons(shapely.union_all(polygons))
    if roi.is_empty:
        raise RoiError(f'{path}: its polygons enclose no area')
    return roi.geoms[0] if len(roi.geoms) == 1 else roi


def roi_mask(roi: shapely.Geometry, mask_shape: tuple[int, int],
             slide_size: tuple[int, int]) -> np.ndarray:
    """Which pixels of a slide-covering mask have their centre inside `roi`.

    Args:
      roi: polygons in level-0 pixels (e.g. from read_roi).
      mask_shape: (h, w) of the mask; pixel (r, c) has its centre at level-0
        ((c + 0.5) W/w, (r + 0.5) H/h).
      slide_size: (W, H) level-0 size.

    Returns:
      bool [h, w]; computed in bands of rows, within the roi's bounding box only.
    """
    rows, columns = (int(n) for n in mask_shape)
    width, height = _slide_size(slide_size)
    if rows <= 0 or columns <= 0:
        raise ValueError(f'mask_shape must be positive, not {mask_shape}')
    inside = np.zeros((rows, columns), bool)
    if roi.is_empty:
        return inside
    shapely.prepare(roi)
    xs = (np.arange(columns) + 0.5) * (width / columns)
    ys = (np.arange(rows) + 0.5) * (height / rows)
    x_min, y_min, x_max, y_max = roi.bounds
    c0, c1 = int(np.searchsorted(xs, x_min, 'left')), int(np.searchsorted(xs, x_max, 'right'))
    r0, r1 = int(np.searchsorted(ys, y_min, 'left')), int(np.searchsorted(ys, y_max, 'right'))
    band = max(1, _BAND_PIXELS // max(1, c1 - c0))
    for top in range(r0, r1, band):
        bottom = min(top + band, r1)
        inside[top:bottom, c0:c1] = shapely.contains_xy(
            roi, xs[None, c0:c1], ys[top:bottom, None])
    return inside


def _slide_size(slide_size: tuple[int, int]) -> tuple[float, float]:
    width, height = (float(n) for n in slide_size)
    if not (width > 0 and height > 0 and math.isfinite(width) and math.isfinite(height)):
        raise ValueError(f'slide_size must be a positive (W, H), not {slide_size}')
    return width, height


def _pixel_polygons(mask: np.ndarray) -> shapely.Geometry:
    """The exact union of the True pixels of bool [h, w] `mask`, in mask pixel units.

    Runs of True pixels per row become boxes (identical runs in consecutive rows merged). Boxes
    only touch along their top and bottom edges, so giving each top (bottom) edge a vertex at
    every run end of the row above (below) makes them a valid polygonal coverage, which
    shapely.coverage_union_all dissolves far faster than shapely.union_all overlays boxes
    (minutes for a 1024 x 1024 speckle mask).
    """
    stride = mask.shape[1] + 1
    steps = np.diff(np.pad(mask, ((0, 0), (1, 1))).astype(np.int8), axis=1)
    rows, starts = np.nonzero(steps == 1)
    ends = np.nonzero(steps == -1)[1]  # row-major order pairs each start with its end
    run_ends = np.sort(np.concatenate([rows * stride + starts, rows * stride + ends]))
    order = np.lexsort((rows, ends, starts))
    rows, starts, ends = rows[order], starts[order], ends[order]
    new = np.ones(len(rows), bool)
    new[1:] = (starts[1:] != starts[:-1]) | (ends[1:] != ends[:-1]) | (rows[1:] != rows[:-1] + 1)
    first = np.flatnonzero(new)
    last = np.append(first[1:], len(rows)) - 1
    s, e, top, bottom = starts[first], ends[first], rows[first], rows[last] + 1

    above = (top - 1) * stride  # row -1 and row h hold no run ends, so the edges find none
    top_lo = np.searchsorted(run_ends, above + s, 'right')
    n_top = np.searchsorted(run_ends, above + e, 'left') - top_lo
    below = bottom * stride
    bottom_hi = np.searchsorted(run_ends, below + e, 'left')
    n_bottom = bottom_hi - np.searchsorted(run_ends, below + s, 'right')
    lengths = 5 + n_top + n_bottom  # closed ring: 4 corners, the extra vertices, the first again
    base = np.cumsum(lengths) - lengths
    xy = np.empty((int(lengths.sum()), 2), np.int64)
    for offset, x, y in ((0, s, top), (1 + n_top, e, top), (2 + n_top, e, bottom),
                         (3 + n_top + n_bottom, s, bottom), (4 + n_top + n_bottom, s, top)):
        xy[base + offset] = np.stack([x, y], axis=1)
    box, k = _ragged_ranks(n_top)  # left to right along the top edge
    xy[base[box] + 1 + k] = np.stack([run_ends[top_lo[box] + k] - above[box], top[box]], axis=1)
    box, k = _ragged_ranks(n_bottom)  # right to left along the bottom edge
    xy[base[box] + 3 + n_top[box] + k] = np.stack(
        [run_ends[bottom_hi[box] - 1 - k] - below[box], bottom[box]], axis=1)
    rings = shapely.linearrings(xy.astype(float), indices=np.repeat(np.arange(len(s)), lengths))
    return shapely.coverage_union_all(shapely.polygons(rings))


def _run_count(mask: np.ndarray) -> int:
    """How many runs of True pixels the rows of bool [h, w] `mask` hold."""
    return int(np.count_nonzero(mask[:, 1:] & ~mask[:, :-1]) + np.count_nonzero(mask[:, 0]))


def _block_max(mask: np.ndarray, factor: int) -> np.ndarray:
    """bool [ceil(h / factor), ceil(w / factor)]: whether each factor x factor block of bool
    [h, w] `mask` holds a True pixel (blocks past the edge padded with False)."""
    if factor == 1:
        return mask
    rows, columns = (-(-n // factor) * factor for n in mask.shape)
    padded = np.zeros((rows, columns), bool)
    padded[:mask.shape[0], :mask.shape[1]] = mask
    return padded.reshape(rows // factor, factor, columns // factor, factor).any(axis=(1, 3))


def _ragged_ranks(counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(owner, rank) of the items of int [n] `counts`: owner i repeated counts[i] times, rank 0..
    counts[i]-1."""
    owner = np.repeat(np.arange(len(counts)), counts)
    return owner, np.arange(len(owner)) - (np.cumsum(counts) - counts)[owner]


def _polygons(geometry: shapely.Geometry) -> shapely.MultiPolygon:
    """The non-empty polygons in `geometry` (at any depth of collections) as one MultiPolygon."""
    def parts(g: shapely.Geometry) -> Iterator[shapely.Polygon]:
        if isinstance(g, shapely.Polygon):
            if not g.is_empty:
                yield g
        elif isinstance(g, (shapely.MultiPolygon, shapely.GeometryCollection)):
            for part in g.geoms:
                yield from parts(part)
    return shapely.MultiPolygon(list(parts(geometry)))


def _classification(name: str) -> dict:
    """QuPath's classification object; a stable color from the name (QuPath needs one)."""
    hue = (zlib.crc32(name.encode()) % 360) / 360
    return {'name': name, 'color': [round(255 * v) for v in colorsys.hsv_to_rgb(hue, 0.7, 0.9)]}


def _number(value: float) -> float | str:
    value = float(value)
    if math.isnan(value):
        return 'NaN'
    if math.isinf(value):
        return 'Infinity' if value > 0 else '-Infinity'
    return value


def _geometries(document: Any, path: str | os.PathLike) -> Iterator[tuple[str, dict]]:
    """(where, geometry object) for every geometry in a GeoJSON document; checks structure."""
    def walk(node: Any, where: str, depth: int) -> Iterator[tuple[str, dict]]:
        at = _place(path, where)
        if depth > _MAX_NESTING:
            raise RoiError(f'{at}: nested more than {_MAX_NESTING} levels deep')
        if isinstance(node, list):
            for i, item in enumerate(node):
                yield from walk(item, _join(where, f'feature {i}'), depth + 1)
            return
        kind = node.get('type') if isinstance(node, dict) else None
        if kind == 'FeatureCollection':
            features = node.get('features')
            if not isinstance(features, list):
                raise RoiError(f'{at}: a FeatureCollection needs a "features" array')
            for i, feature in enumerate(features):
                if not (isinstance(feature, dict) and feature.get('type') == 'Feature'):
                    raise RoiError(f'{_place(path, _join(where, f"feature {i}"))}: not a '
                                   'GeoJSON Feature')
                yield from walk(feature, _join(where, f'feature {i}'), depth + 1)
        elif kind == 'Feature':
            geometry = node.get('geometry')
            properties = node.get('properties')
            if isinstance(properties, dict) and properties.get('objectType', 'annotation') not in (
                    'annotation', 'tmaCore'):
                return  # QuPath's detections, cells and tiles are no region of interest
            if geometry is not None:
                if not (isinstance(geometry, dict) and geometry.get('type') in _GEOMETRY_TYPES):
                    raise RoiError(f'{at}: its geometry is not a GeoJSON geometry')
                yield from walk(geometry, where, depth + 1)
        elif kind == 'GeometryCollection':
            geometries = node.get('geometries')
            if not isinstance(geometries, list):
                raise RoiError(f'{at}: a GeometryCollection needs a "geometries" array')
            for i, geometry in enumerate(geometries):
                yield from walk(geometry, _join(where, f'geometry {i}'), depth + 1)
        elif kind in _GEOMETRY_TYPES:
            if not isinstance(node.get('coordinates'), list):
                raise RoiError(f'{at}: a {kind} needs a "coordinates" array')
            yield where, node
        else:
            what = f'type {kind!r}' if isinstance(node, dict) else type(node).__name__
            raise RoiError(f'{at}: expected a GeoJSON Feature, FeatureCollection or geometry, '
                           f'found {what}')
    yield from walk(document, '', 0)


def _join(where: str, step: str) -> str:
    return f'{where} > {step}' if where else step


def _place(path, where: str) -> str:
    """'<file>: <where in it>', or the file alone for the document's top level."""
    return f'{path}: {where}' if where else str(path)


def _multipolygon_rings(coordinates: list, path, where: str) -> list[list[np.ndarray]]:
    if not all(isinstance(polygon, list) for polygon in coordinates):
        raise RoiError(f'{_place(path, where)}: MultiPolygon coordinates must be arrays of '
                       'polygons')
    return [rings for i, polygon in enumerate(coordinates)
            for rings in _polygon_rings(polygon, path, _join(where, f'polygon {i}'))]


def _polygon_rings(coordinates: list, path, where: str) -> list[list[np.ndarray]]:
    """[[shell, hole, ...]] as float [k, 2] arrays ([[]] for an empty polygon), checked."""
    rings = []
    for j, ring in enumerate(coordinates):
        at = _place(path, _join(where, f'ring {j}'))
        try:
            points = np.asarray(ring)
        except ValueError:  # ragged
            raise RoiError(f'{at}: positions must be arrays of 2 or 3 numbers') from None
        if points.ndim != 2 or points.shape[1] not in (2, 3) or points.dtype.kind not in 'iuf':
            raise RoiError(f'{at}: positions must be arrays of 2 or 3 numbers')
        points = points[:, :2].astype(float)
        if not np.isfinite(points).all():
            raise RoiError(f'{at}: a coordinate is NaN or infinite')
        if len(points) < 4:
            raise RoiError(f'{at}: a ring needs at least 4 positions, found {len(points)}')
        if (points[0] != points[-1]).any():
            raise RoiError(f'{at}: the ring is not closed (its first and last positions differ)')
        rings.append(points)
    return [rings]
