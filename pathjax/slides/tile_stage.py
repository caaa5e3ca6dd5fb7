"""The tile stage: every slide of the cohort -> tissue patch coordinates, stain LUT, QC picture.

Per slide (in parallel worker processes): open it, plan reads at `tile.mpp`, compute the
background mask on a low-resolution overview, keep the grid patches with enough tissue, take the
stain histogram of a sample of kept patches, and write `tiles/.scan/<slide_id>.npz` and
`qc/<slide_id>.png`. On several hosts each process scans its share of the slides (slide i on
process i % process_count, as extract). Then, once every slide is scanned, process 0 fixes the
stain reference (a template image, or the mean histogram of the training slides; saved to
`stain/reference.npz`) and fits each slide's lookup table and writes it with its tiles to
`tiles/<slide_id>.npz`, the same files as on one host. Every write is atomic and finished slides
are skipped, so a killed run resumes where it stopped. A scan does not depend on the split (its
stain sample has a fixed seed), so it is kept: cross-validation's folds share one set of scans
and differ only in their stain reference and lookup tables.
"""

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import pathlib
import time

import numpy as np
from absl import logging

from pathjax import artifacts
from pathjax.cohort import Cohort, SlideRecord
from pathjax.errors import StageError
from pathjax.interop import geojson
from pathjax.progress import Progress
from pathjax.sampling import seeded_subset
from pathjax.slide_paths import slide_file
from pathjax.slides import qc, source_file, stain, stain_transform, tissue_qc
from pathjax.slides.artifact_masks import pen_mask
from pathjax.slides.focus import laplacian_variance
from pathjax.slides.reader import Slide, SlideError
from pathjax.slides.tissue import TissueRule, pixel_background
from pathjax.stage_report import ERROR, NO_TISSUE, OK, SlideEntry

STAGE = 'tile'
# The overview (mask and QC picture) is read at neighbourhood / MASK_WINDOW_PIXELS x level 0 (so
# the neighbourhood window spans this many overview pixels), finer if a patch would span fewer
# pixels or if the QC picture's long side would be shorter than QC_SIDE; coarser (with a warning)
# where the reader's bounds require it (reader.OVERVIEW_PIXELS, reader.OVERVIEW_SOURCE_PIXELS).
MASK_WINDOW_PIXELS = 8
QC_SIDE = 1024
LITTLE_TISSUE = 0.02  # a slide with less tissue than this share of its area is flagged
STATISTICS = 'statistics_'  # prefix of the stain statistics in a scan file
STAIN_FIT_PIXELS = 1 << 20  # macenko and reinhard fit at most this many tissue pixels, evenly
# spaced (their float64 temporaries stay near 100 MB per tile worker; 32 patches of 512 px hold
# up to 8.4 M); histogram counts them all (a bincount)
STAIN_SAMPLE_SEED = 0  # the kept patches a slide's stain histogram is taken from: the same in
# every run and fold, whatever the split and training seeds


@dataclasses.dataclass(frozen=True)
class TileSettings:
    """What a worker needs to tile one slide (picklable, no config objects)."""

    mpp: float
    patch_size: int
    fallback_level: int
    rule: TissueRule
    stain_method: str
    stain_fit_patches: int

    @classmethod
    def from_config(cls, config) -> 'TileSettings':
        return cls(mpp=config.tile.mpp, patch_size=config.tile.patch_size,
                   fallback_level=config.tile.level, rule=TissueRule(**config.tissue),
                   stain_method=config.stain.method, stain_fit_patches=config.stain.fit_patches)


def tiles_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'tiles', slide_id, '.npz')


def scan_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'tiles/.scan', slide_id, '.npz')


def qc_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'qc', slide_id, '.png')


def thumbnail_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'thumbnails', slide_id, '.png')


def entries_path(workdir, process: int) -> pathlib.Path:
    """The report entries of the slides one process scanned in this run, for process 0."""
    return pathlib.Path(workdir) / 'tiles' / '.scan' / f'process-{process}.json'


def scan_slide(record: SlideRecord, settings: TileSettings, workdir: str) -> SlideEntry:
    """Tiles one slide and writes its scan file and QC picture. Never raises for a bad slide."""
    start = time.perf_counter()
    try:
        # Before reading: a file replaced meanwhile is found on the next run.
        source = source_file.scan_source(record.path, record.level0_mpp, record.roi)
        roi = geojson.read_roi(record.roi) if record.roi else None
        with Slide(record.path, mpp=record.level0_mpp) as slide:
            scan, picture, thumbnail = _scan(slide, record.slide_id, settings, roi, record.roi)
    except (SlideError, OSError, geojson.RoiError) as error:
        return SlideEntry(record.slide_id, ERROR, message=str(error))
    except Exception as error:  # a reader library failing on a corrupt file must not stop the run
        logging.exception('tile: unexpected failure on slide %s', record.slide_id)
        return SlideEntry(record.slide_id, ERROR,
                          message=f'{record.path}: {type(error).__name__}: {error}')
    artifacts.save_png(qc_path(workdir, record.slide_id), picture)
    artifacts.save_png(thumbnail_path(workdir, record.slide_id), thumbnail)
    artifacts.save_npz(scan_path(workdir, record.slide_id), **scan, source=np.asarray(source))
    entry = entry_from_tiles(record.slide_id, scan)
    entry.details['seconds'] = round(time.perf_counter() - start, 2)
    return entry


def _scan(slide: Slide, slide_id: str, settings: TileSettings, roi=None, roi_file: str = ''
          ) -> tuple[dict, np.ndarray, np.ndarray]:
    """(the scan arrays, the QC picture, a plain thumbnail) of one open slide; outside the `roi`
    (level-0 polygons read from `roi_file`, `geojson.read_roi`) is background."""
    plan = slide.plan(settings.mpp, settings.patch_size, settings.fallback_level)
    mask_downsample = min(settings.rule.neighbourhood, plan.extent) / MASK_WINDOW_PIXELS
    overview_downsample = slide.overview_downsample(  # coarser on very large slides
        max(1.0, min(mask_downsample, max(slide.dimensions) / QC_SIDE)))
    overview, downsample = slide.read_overview(overview_downsample)
    rule = settings.rule
    inside = None if roi is None else geojson.roi_mask(roi, overview.shape[:2], slide.dimensions)
    masks = tissue_qc.overview_masks(overview, downsample, rule, inside)
    tiles, dropped = tissue_qc.select_patches(masks, slide.dimensions, plan.extent, rule)
    focus = np.full(len(tiles), np.nan, np.float32)
    if rule.max_blur > 0:  # every kept patch read once at its level
        focus = np.array([laplacian_variance(slide.read_patch(x, y, plan))
                          for x, y in tiles.coords], np.float32)
        tiles, focus, dropped['blur'] = tissue_qc.drop_blurred(tiles, focus, rule.max_blur)
    background = masks.background
    warnings = list(plan.warnings)
    if overview_downsample > max(1.0, mask_downsample):
        warnings.append(f'the tissue mask is at {downsample:.3g}x level 0, coarser than the '
                        f'{mask_downsample:.3g}x that puts {MASK_WINDOW_PIXELS} mask pixels across '
                        'the tissue.neighbourhood window (or a patch): a finer overview of this '
                        "slide would exceed the reader's bounds")
    if not len(tiles):
        width, height = slide.dimensions
        if roi is not None:
            warnings.append(f'the roi {roi_file} misses every tissue patch')
        elif plan.extent > min(width, height):
            warnings.append(f'the slide ({width}x{height} level-0 px) is smaller than one patch '
                            f'({plan.extent:.0f} level-0 px)')
        elif any(len(dropped[c]) for c in tissue_qc.CAUSES[1:]):
            warnings.append('every tissue patch was dropped: ' + ', '.join(
                f'{len(dropped[c])} {c}' for c in tissue_qc.CAUSES[1:] if len(dropped[c])))
        else:
            warnings.append(f'no patch reaches tissue.min_fraction={rule.min_fraction}')
    statistics = {}
    if settings.stain_method != 'none' and len(tiles):
        sample = seeded_subset(slide_id, len(tiles), settings.stain_fit_patches, STAIN_SAMPLE_SEED)
        pixels = np.concatenate([patch[stain_pixels(patch, rule)]  # tissue only: not the white
                                 for patch in (slide.read_patch(x, y, plan)
                                               for x, y in tiles.coords[sample])])
        if settings.stain_method != 'histogram' and len(pixels) > STAIN_FIT_PIXELS:
            pixels = pixels[np.linspace(0, len(pixels) - 1, STAIN_FIT_PIXELS).astype(np.int64)]
        try:
            statistics = stain_transform.MODULES[settings.stain_method].slide_statistics(pixels)
        except ValueError as error:
            warnings.append(f'no {settings.stain_method} stain fit, left unnormalized: {error}')
    scan = dict(coords=tiles.coords, grid=tiles.grid, tissue=tiles.tissue, focus=focus,
                dropped=np.array([len(dropped[c]) for c in tissue_qc.CAUSES], np.int64),
                level=plan.level, read_size=plan.read_size, patch_size=plan.patch_size,
                extent=plan.extent, mpp=np.nan if plan.mpp is None else plan.mpp,
                slide_size=np.asarray(slide.dimensions, np.int64),
                slide_tissue_fraction=np.float32(1.0 - background.mean()),
                tissue_mask=qc.shrink_mask(~background),
                warnings=np.asarray(warnings, dtype=str),
                **{STATISTICS + name: value for name, value in statistics.items()})
    picture = qc.qc_picture(overview, background, slide.dimensions, tiles.coords, plan.extent,
                            masks.pen, masks.fold, dropped['blur'])
    return scan, picture, qc.thumbnail(overview)


def stain_pixels(pixels: np.ndarray, rule: TissueRule) -> np.ndarray:
    """bool [h, w]: the pixels of a patch (uint8 [h, w, 3]) a stain is fitted on: tissue by the
    method's pixel rule, and not ink when tissue.remove_pen."""
    tissue = ~pixel_background(pixels, rule)
    return tissue & ~pen_mask(pixels) if rule.remove_pen else tissue


def qc_flags(patches: int, tissue_fraction: float, dropped: dict[str, int]) -> list[str]:
    """What a reviewer should look at first: 'little tissue' (under LITTLE_TISSUE of the slide),
    'mostly pen' / 'mostly fold' / 'mostly blur' (that cause dropped more patches than were kept)."""
    flags = ['little tissue'] if tissue_fraction < LITTLE_TISSUE else []
    return flags + [f'mostly {cause}' for cause in tissue_qc.CAUSES[1:]
                    if dropped.get(cause, 0) > patches]


def entry_from_tiles(slide_id: str, tiles: dict) -> SlideEntry:
    """The report entry of a scanned or finished slide, rebuilt from its arrays."""
    patches = len(tiles['coords'])
    warnings = [str(w) for w in tiles['warnings']]
    mpp = float(tiles['mpp'])
    dropped = dict(zip(tissue_qc.CAUSES, map(int, tiles.get('dropped', ()))))
    tissue_fraction = float(tiles['slide_tissue_fraction'])
    flags = qc_flags(patches, tissue_fraction, dropped)
    return SlideEntry(slide_id, OK if patches else NO_TISSUE, patches=patches,
                      message='; '.join(flags + warnings),
                      details={'level': int(tiles['level']), 'read_size': int(tiles['read_size']),
                               'mpp': None if np.isnan(mpp) else round(mpp, 4),
                               'slide_tissue_fraction': round(tissue_fraction, 4),
                               'mean_patch_tissue': round(float(np.mean(tiles['tissue'])), 4)
                               if patches else 0.0,
                               'dropped': dropped, 'qc_flags': flags})


def scan_all(records: list[SlideRecord], settings: TileSettings, workdir: str,
             workers: int) -> dict[str, SlideEntry]:
    """Scans slides in `workers` processes with a progress bar. A worker that dies (a reader
    crashing on a corrupt file) costs only its slide: the rest are rescanned one per process."""
    entries = {}
    if not records:
        return entries
    progress = Progress('tile', len(records), 'slides')
    if workers <= 1:
        for record in records:
            entries[record.slide_id] = scan_slide(record, settings, workdir)
            progress.update()
    else:
        _scan_in_pool(records, settings, workdir, workers, entries, progress)
        for record in [r for r in records if r.slide_id not in entries]:
            _scan_in_pool([record], settings, workdir, 1, entries, progress)
            entries.setdefault(record.slide_id, SlideEntry(
                record.slide_id, ERROR, message=f'{record.path}: the reader crashed on this slide'))
    progress.close()
    return entries


def _scan_in_pool(records, settings, workdir, workers, entries, progress) -> None:
    context = multiprocessing.get_context('spawn')
    try:
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(records)), context) as pool:
            futures = {pool.submit(scan_slide, r, settings, workdir): r for r in records}
            for future in concurrent.futures.as_completed(futures):
                entries[futures[future].slide_id] = future.result()
                progress.update()
    except concurrent.futures.process.BrokenProcessPool:
        logging.warning('tile: a worker process died; rescanning the unfinished slides one by one')


def slide_statistics(scan: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The stain statistics a scan file holds ({} when its slide had none to fit)."""
    return {k[len(STATISTICS):]: v for k, v in scan.items() if k.startswith(STATISTICS)}


def stain_reference(config, scans: dict[str, dict], cohort: Cohort
                    ) -> tuple[dict[str, np.ndarray], str]:
    """The reference statistics of stain.method and a description of where they came from."""
    module = stain_transform.MODULES[config.stain.method]
    source = config.stain.reference
    if source != 'cohort':
        image = stain.read_template(source)  # checked before the run
        try:
            return module.slide_statistics(image.reshape(-1, 3)), f'template {source}'
        except ValueError as error:
            raise StageError(f'stain.reference: template {source}: {error}') from None
    train = {s.slide_id for s in cohort.split('train')}
    chosen = [slide_statistics(s) for i, s in scans.items() if i in train]
    chosen = [s for s in chosen if s]
    if not chosen:
        raise StageError('tile: no training slide has tissue, so there is no cohort stain '
                         'reference (stain.reference=cohort: the mean of the training slides; '
                         'validation and test slides must not shape it); see reports/tile.json, '
                         'or give a template image as stain.reference')
    return module.reference(chosen), f'mean of {len(chosen)} training slides'


def run(config, workdir: str, cohort: Cohort) -> list[SlideEntry]:
    """Runs the tile stage over this process's share of the cohort, then (process 0) finishes
    every slide. Returns, on process 0, one report entry per manifest row (`details['process']`:
    the process that scanned the slide in this run); on the others, their own slides' entries."""
    # Imported here: spawned slide workers import this module and must not load jax.
    import jax
    from pathjax.runtime import sharding
    workdir = str(workdir)
    if sharding.is_leader():
        for folder in ('tiles', 'tiles/.scan', 'qc', 'thumbnails'):
            artifacts.remove_stale_temporaries(pathlib.Path(workdir) / folder)
    sharding.barrier('pathjax tile start')  # no process writes before those are gone
    settings = TileSettings.from_config(config)
    process, processes = jax.process_index(), jax.process_count()
    mine = [r for i, r in enumerate(cohort.slides) if i % processes == process]
    redone = forget_changed_slides(workdir, mine)
    todo = [r for r in mine if not tiles_path(workdir, r.slide_id).exists()
            and not scan_path(workdir, r.slide_id).exists()]
    logging.info('tile: %d slides on this process, %d already scanned, %d redone (their file '
                 'changed)', len(mine), len(mine) - len(todo), len(redone))
    scanned = scan_all(todo, settings, workdir, config.workers)
    for slide_id, entry in scanned.items():
        entry.details['process'] = process
        if slide_id in redone:
            entry.details['redone'] = redone[slide_id]
    artifacts.save_json(entries_path(workdir, process),
                        [dataclasses.asdict(e) for e in scanned.values()])
    sharding.barrier('pathjax tile scans')  # every process's scan files are written
    if not sharding.is_leader():
        return list(scanned.values())
    entries = {}
    for other in range(processes):
        path = entries_path(workdir, other)
        entries.update((e['slide_id'], SlideEntry(**e)) for e in json.loads(path.read_text()))
    for path in entries_path(workdir, 0).parent.glob('process-*.json'):  # also older runs'
        path.unlink()
    refitted = _finish(config, workdir, cohort)
    for record in cohort.slides:
        if record.slide_id not in entries:
            entries[record.slide_id] = entry_from_tiles(
                record.slide_id, artifacts.load_npz(tiles_path(workdir, record.slide_id)))
        if record.slide_id in refitted:
            entries[record.slide_id].details.setdefault('redone', refitted[record.slide_id])
    for record, why in cohort.skipped:
        entries[record.slide_id] = SlideEntry(record.slide_id, ERROR, message=why)
    order = sorted(cohort.slides + tuple(r for r, _ in cohort.skipped), key=lambda r: r.line)
    return [entries[r.slide_id] for r in order]


def recorded_text(path: pathlib.Path, key: str = 'source') -> str:
    """A text field of an npz file ('' if absent: made before pathjax recorded it); by default
    the slide file identity that a scan or tiles file records."""
    with np.load(path, allow_pickle=False) as data:
        return str(data[key]) if key in data.files else ''


def forget_slide(workdir, slide_id: str, keep_scan: bool = False) -> None:
    """Deletes what the workdir holds of one slide, downstream first (a run killed meanwhile
    finds the rest and deletes it then): graph, features, staged patches, tiles, scan."""
    from pathjax.data.features import features_path, graph_path  # not in spawned workers
    from pathjax.data.patches import staged_path
    made = [graph_path(workdir, slide_id), features_path(workdir, slide_id),
            staged_path(workdir, slide_id), tiles_path(workdir, slide_id)]
    for path in made + ([] if keep_scan else [scan_path(workdir, slide_id)]):
        path.unlink(missing_ok=True)


def forget_changed_slides(workdir, records: list[SlideRecord]) -> dict[str, str]:
    """Forgets every slide whose scan (or tiles file) was made from another file than its
    manifest path holds now (`source_file`); returns {slide id: what changed}."""
    changed = {}
    for record in records:
        made = [p for p in (scan_path(workdir, record.slide_id),
                            tiles_path(workdir, record.slide_id)) if p.exists()]
        why = made and source_file.scan_change(recorded_text(made[0]), record.path,
                                               record.level0_mpp, record.roi)
        if why:
            logging.info('tile: redoing slide %s: %s', record.slide_id, why)
            forget_slide(workdir, record.slide_id)
            changed[record.slide_id] = why
    return changed


def _finish(config, workdir: str, cohort: Cohort) -> dict[str, str]:
    """Fits each scanned slide's stain LUT and writes its final tiles file. Tiles made from an
    older scan, or with a cohort stain reference made from training slides that changed since,
    are made again (with what derives from them); returns {slide id: why} of those."""
    refitted = {}
    for record in cohort.slides:  # scanned again (by another fold or process) since
        scan, tiles = scan_path(workdir, record.slide_id), tiles_path(workdir, record.slide_id)
        if scan.exists() and tiles.exists() and recorded_text(scan) != recorded_text(tiles):
            forget_slide(workdir, record.slide_id, keep_scan=True)
            refitted[record.slide_id] = 'its slide file changed'
    reference_file = pathlib.Path(workdir) / 'stain' / 'reference.npz'
    training = reference_sources(config, workdir, cohort)
    recorded = recorded_text(reference_file, 'sources') if reference_file.exists() else ''
    if reference_file.exists() and recorded_text(reference_file, 'method') not in (
            config.stain.method, ''):  # '': made before other methods existed, histograms
        reference_file.unlink()  # stain.method changed: the stage's settings redo every slide
    elif training and recorded and recorded != training:
        logging.info('tile: a training slide changed: refitting the stain reference and every '
                     "slide's lookup table")
        reference_file.unlink()
        for record in cohort.slides:
            if tiles_path(workdir, record.slide_id).exists():
                forget_slide(workdir, record.slide_id, keep_scan=True)
                refitted.setdefault(record.slide_id, 'the cohort stain reference changed')
    pending = {r.slide_id: artifacts.load_npz(scan_path(workdir, r.slide_id)) for r in cohort.slides
               if scan_path(workdir, r.slide_id).exists()
               and not tiles_path(workdir, r.slide_id).exists()}
    if not pending:
        return refitted
    method = config.stain.method
    if method == 'none' or not any(len(s['coords']) for s in pending.values()):
        reference = None
    elif reference_file.exists():
        reference = slide_statistics(artifacts.load_npz(reference_file))
    else:
        finished = {r.slide_id: artifacts.load_npz(tiles_path(workdir, r.slide_id))
                    for r in cohort.slides if tiles_path(workdir, r.slide_id).exists()}
        reference, source = stain_reference(config, {**finished, **pending}, cohort)
        artifacts.save_npz(reference_file, method=np.asarray(method), source=np.asarray(source),
                           sources=np.asarray(training),
                           **{STATISTICS + k: v for k, v in reference.items()})
        logging.info('tile: %s stain reference from the %s', method, source)
    for slide_id, scan in pending.items():
        statistics = slide_statistics(scan)
        slide_stain = stain_transform.SlideStain.identity()  # no tissue pixel sampled, or no fit
        if reference is not None and statistics:
            try:
                slide_stain = stain_transform.SlideStain(
                    method, stain_transform.MODULES[method].fit(statistics, reference))
            except ValueError as error:
                logging.warning('tile: slide %s left unnormalized: %s', slide_id, error)
        artifacts.save_npz(tiles_path(workdir, slide_id), **scan, **slide_stain.to_tiles())
    return refitted


def tiles_digest(workdir, slide_id: str) -> str:
    """What a slide's tiles file is made from, as a short digest: its slide file and its stain
    transform ('' when the slide has no tiles file)."""
    path = tiles_path(workdir, slide_id)
    if not path.exists():
        return ''
    tiles = artifacts.load_npz(path)
    digest = hashlib.blake2b(str(tiles.get('source', '')).encode(), digest_size=16)
    digest.update(stain_transform.SlideStain.from_tiles(tiles).digest())
    return digest.hexdigest()


def reference_sources(config, workdir, cohort: Cohort) -> str:
    """JSON of the slide files a cohort stain reference is made from ({training slide id: its
    scan's recorded file}); '' for a template reference, which no slide shapes, and for a cohort
    without training slides (new slides to predict: the trained reference is given)."""
    if config.stain.reference != 'cohort' or not cohort.split('train'):
        return ''
    return json.dumps({r.slide_id: recorded_text(scan_path(workdir, r.slide_id))
                       for r in cohort.split('train') if scan_path(workdir, r.slide_id).exists()},
                      sort_keys=True)

