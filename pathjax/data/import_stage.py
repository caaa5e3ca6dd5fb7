"""The `import` stage: patch features made by another tool (TRIDENT, CLAM, STAMP) instead of the
tile, patches, learn_features and extract stages.

Per slide of the cohort, one at a time (process 0): its `<import_dir>/<slide_id>.h5` is checked
(`interop.h5_features`: layout, sizes, NaN rows, coordinates inside the slide) and its graph
file built (`features.slide_graph`, keyed by the file's identity: a replaced file redoes its
graph); then what evaluation draws on is written: `thumbnails/<slide_id>.png` (the slide's own
thumbnail when the manifest gives its file, else a map of its patches) and
`imported/<slide_id>.npz` (the slide's level-0 size and patch side, the fields of a tiles file
that heatmaps and top patches read), which also marks the slide as usable. A slide without a
file, or whose file is unusable, is reported and left out; the rest go on. Features of two sizes
or from two encoders stop the run with a message naming two slides.
"""

import numpy as np
from absl import logging
from PIL import Image, ImageDraw

from pathjax import artifacts
from pathjax.cohort import Cohort, SlideRecord
from pathjax.data.feature_sources import ImportedFeatures, Sources
from pathjax.data.features import GraphSettings, slide_graph
from pathjax.errors import StageError
from pathjax.progress import Progress
from pathjax.interop.h5_features import FeatureFileError
from pathjax.slides import qc
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.reader import Slide, SlideError
from pathjax.slides.tile_stage import thumbnail_path
from pathjax.stage_report import ERROR, OK, SlideEntry

STAGE = 'import'
MAP_SIDE = 1024  # long side of the map of patches drawn for a slide without its file
MAP_BACKGROUND, MAP_PATCH = 250, 205


def patch_map(coords: np.ndarray, extent: float, slide_size: tuple[int, int]) -> np.ndarray:
    """uint8 [h, w, 3], long side MAP_SIDE: the patches (coords [n, 2] level-0 (x, y), side
    `extent`) in grey on white, to draw heatmaps on when the slide file is not given."""
    scale = MAP_SIDE / max(slide_size)
    size = (max(1, round(slide_size[0] * scale)), max(1, round(slide_size[1] * scale)))
    image = Image.new('RGB', size, (MAP_BACKGROUND,) * 3)
    draw = ImageDraw.Draw(image)
    for x, y in coords:
        draw.rectangle((x * scale, y * scale, (x + extent) * scale - 1, (y + extent) * scale - 1),
                       fill=(MAP_PATCH,) * 3)
    return np.asarray(image)


def slide_picture(slide_path: str, coords: np.ndarray, extent: float,
                  recorded_size: tuple[int, int] | None) -> tuple[np.ndarray, tuple[int, int], str]:
    """(thumbnail, level-0 (width, height), a note) of an imported slide: the thumbnail of its
    file when one is given and opens (else the note says why not), or a map of its patches
    (coords [n, 2] level-0 (x, y), side `extent`) on the size the features file records, or
    that its patches span."""
    note = ''
    if slide_path:
        try:
            with Slide(slide_path) as slide:
                overview, _ = slide.read_overview(max(1.0, max(slide.dimensions) / qc.MAX_SIDE))
                return qc.thumbnail(overview), slide.dimensions, ''
        except SlideError as error:
            note = f'heatmaps on a map of the patches: {error}'
    span = tuple(int(np.ceil(coords[:, i].max() + extent)) if len(coords) else 1 for i in (0, 1))
    size = recorded_size or span
    return patch_map(coords, extent, size), size, note


def import_slide(workdir, record: SlideRecord, source: ImportedFeatures,
                 settings: GraphSettings) -> SlideEntry:
    """Checks one slide's file, builds its graph and writes its pictures' layout; never raises
    for a bad file."""
    source.layout.unlink(missing_ok=True)
    if not source.path.exists():
        return SlideEntry(record.slide_id, ERROR, message=f'no features file {source.path}')
    try:
        info = source.inspect()
        graph = slide_graph(workdir, source, settings)
    except FeatureFileError as error:
        return SlideEntry(record.slide_id, ERROR, message=str(error))
    mpp = source.mpp or info.mpp
    in_pixels = info.coords_unit == 'px' or mpp > 0
    extent = info.patch_size_level0 if info.coords_unit == 'px' else info.tile_size_um / (mpp or 1)
    picture, size, note = slide_picture(record.path if in_pixels else '', graph.coords, extent,
                                        info.slide_size)
    if not in_pixels:
        note = ('coords in micrometres and no mpp (the manifest\'s mpp column): heatmaps and '
                'GeoJSON are in micrometres, on a map of the patches')
    outside = ((graph.coords < 0) | (graph.coords + extent > np.asarray(size) + 1)).any(axis=1)
    if outside.any():
        return SlideEntry(record.slide_id, ERROR, message=(
            f'{source.path}: coords: {int(outside.sum())} patch(es) lie outside the slide '
            f'({size[0]} x {size[1]} level-0 px), e.g. at {tuple(graph.coords[outside][0])}'))
    artifacts.save_png(thumbnail_path(workdir, record.slide_id), picture)
    read_size = max(1, int(round(extent)))
    artifacts.save_npz(source.layout,
                       slide_size=np.asarray(size, np.int64), extent=np.float64(extent),
                       level=np.int64(0), read_size=np.int64(read_size),
                       patch_size=np.int64(read_size), **SlideStain.identity().to_tiles(),
                       source=np.asarray(str(source.path)))
    return SlideEntry(record.slide_id, OK, patches=info.num_patches, message=note, details={
        'format': info.format, 'encoder': info.encoder, 'feature_dim': info.feature_dim,
        'file': str(source.path)})


def check_consistent(entries: list[SlideEntry]) -> None:
    """Raises StageError, naming two slides, when the imported features differ in size or
    encoder between slides."""
    for field in ('feature_dim', 'encoder'):
        first_of = {}
        for entry in entries:
            if entry.status == OK:
                first_of.setdefault(entry.details[field], entry.slide_id)
        if len(first_of) > 1:
            (a, slide_a), (b, slide_b) = list(first_of.items())[:2]
            what = 'sizes' if field == 'feature_dim' else 'encoders'
            raise StageError(f'{STAGE}: the imported features are of {len(first_of)} {what}: '
                             f'{slide_a} has {a!r}, {slide_b} has {b!r}; a slide model needs '
                             'one encoder for every slide (features.import_dir)')


def run(config, workdir, cohort: Cohort, predicting: bool = False) -> list[SlideEntry]:
    """The `import` stage over the cohort (`predicting`: new slides, from predict.import_dir
    when it is set); one report entry per manifest row."""
    sources = Sources.from_config(config, workdir, predicting)
    settings = GraphSettings.from_config(config)
    logging.info('%s: features from %s', STAGE, sources.describe())
    entries = []
    with Progress(STAGE, len(cohort.slides), 'slides') as progress:
        for record in cohort.slides:
            entries.append(import_slide(workdir, record, sources.of(record), settings))
            progress.update()
    check_consistent(entries)
    return entries + [SlideEntry(r.slide_id, ERROR, message=why) for r, why in cohort.skipped]
