"""Extraction: one feature file per tiled slide, same order as the tiles, equal to the network
applied to each patch, resumable, and a missing slide only costs that slide."""

import dataclasses
import json
from types import SimpleNamespace

import jax
import numpy as np
import pytest

from pathjax import artifacts, pipeline
from pathjax.data import slide_sets
from pathjax.data.features import NativeFeatures
from pathjax.errors import StageError
from pathjax.models.patch.feature_net import FeatureNet, create_feature_net
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.patch_stream import PatchReader, Piece, SlidePatches, StreamBatch
from pathjax.slides.stain import IDENTITY_LUT
from pathjax.slides.reader import Slide
from pathjax.train import extract, short_batches
from pathjax.train.feature_learning import FeatureTrainer
from tests.conftest import LEARNING_COHORT, make_config, workdir_with_patches


def direct_features(config, params, slide_path, tiles, indices):
    """The network applied to patches read one by one (independent of the patch stream)."""
    with Slide(slide_path) as slide:
        plan = slide.plan(config.tile.mpp, config.tile.patch_size)
        images = np.stack([SlideStain.from_tiles(tiles).apply(
            slide.read_patch(*tiles['coords'][i], plan)) for i in indices])
    model = create_feature_net(config)
    return np.asarray(model.apply({'params': params}, images, method=FeatureNet.features))


def test_baseline_extraction_writes_every_tiled_slide(patch_workdir, tmp_path, monkeypatch):
    workdir = workdir_with_patches(patch_workdir, tmp_path)
    config = make_config(**LEARNING_COHORT, **{'feature_net.learn': False})
    cohort, _ = pipeline.prepare_cohort(config, workdir)
    entries = extract.run(config, workdir, cohort)
    assert [e.status for e in entries] == ['ok'] * len(cohort.slides)
    params, _ = extract.extractor_params(config, workdir, create_feature_net(config))
    for record, entry in zip(cohort.slides, entries):
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{record.slide_id}.npz')
        features = artifacts.load_npz(extract.features_path(workdir, record.slide_id))
        assert features['features'].shape == (len(tiles['coords']), 64) == (entry.patches, 64)
        assert features['features'].dtype == np.float32
        np.testing.assert_array_equal(features['coords'], tiles['coords'])
        np.testing.assert_array_equal(features['grid'], tiles['grid'])
    record = cohort.slides[0]
    tiles = artifacts.load_npz(workdir / 'tiles' / f'{record.slide_id}.npz')
    some = [0, len(tiles['coords']) // 2, len(tiles['coords']) - 1]
    stored = artifacts.load_npz(extract.features_path(workdir, record.slide_id))['features'][some]
    np.testing.assert_allclose(stored, direct_features(config, params, record.path, tiles, some),
                               rtol=1e-4, atol=1e-5)
    # A rerun skips every finished slide, but still loads the network: on several hosts, Orbax's
    # checkpoint manager waits for every process when it opens, so a host with nothing left to
    # extract must open it too (or the others wait forever).
    before = {p: p.stat().st_mtime_ns for p in (workdir / 'features').glob('*.npz')}
    loaded, load = [], extract.extractor_params
    monkeypatch.setattr(extract, 'extractor_params',
                        lambda *args: loaded.append(args) or load(*args))
    extract.run(config, workdir, cohort)
    assert {p: p.stat().st_mtime_ns for p in (workdir / 'features').glob('*.npz')} == before
    assert len(loaded) == 1
    # A damaged features file (a disk fault, a bad copy) is extracted again, not a crash.
    damaged = extract.features_path(workdir, record.slide_id)
    damaged.write_bytes(b'not an npz file')
    entries = extract.run(config, workdir, cohort)
    assert all(e.status == 'ok' for e in entries)
    np.testing.assert_array_equal(artifacts.load_npz(damaged)['coords'], tiles['coords'])


def test_extraction_uses_the_trained_network_and_survives_a_lost_slide(patch_workdir, tmp_path):
    workdir = workdir_with_patches(patch_workdir, tmp_path)
    config = make_config(**LEARNING_COHORT, **{'learn.epochs': 1})
    FeatureTrainer(config, workdir).fit()
    cohort, _ = pipeline.prepare_cohort(config, workdir)
    # One slide disappears after tiling: its entry says so, the others are extracted.
    records = list(cohort.slides)
    records[1] = dataclasses.replace(records[1], path=str(tmp_path / 'gone.svs'))
    cohort = dataclasses.replace(cohort, slides=tuple(records))
    entries = extract.run(config, workdir, cohort)
    assert entries[1].status == 'error' and 'gone.svs' in entries[1].message
    assert all(e.status == 'ok' for i, e in enumerate(entries) if i != 1)
    trained, _ = extract.extractor_params(config, workdir, create_feature_net(config))
    initial = jax.jit(create_feature_net(config).init)(jax.random.key(config.seed),
                                                       np.zeros((1, 64, 64, 3), np.uint8))['params']
    record = cohort.slides[0]
    tiles = artifacts.load_npz(workdir / 'tiles' / f'{record.slide_id}.npz')
    stored = artifacts.load_npz(extract.features_path(workdir, record.slide_id))['features'][:2]
    np.testing.assert_allclose(stored, direct_features(config, trained, record.path, tiles, [0, 1]),
                               rtol=1e-4, atol=1e-5)
    assert not np.allclose(stored, direct_features(config, initial, record.path, tiles, [0, 1]),
                           rtol=1e-3)
    # Training goes on (learn.epochs 1 -> 2): every extracted slide is stale and made again by
    # the new network, whose identity its file records.
    first = {r.slide_id: artifacts.load_npz(extract.features_path(workdir, r.slide_id))
             for i, r in enumerate(cohort.slides) if i != 1}
    longer = make_config(**LEARNING_COHORT, **{'learn.epochs': 2})
    FeatureTrainer(longer, workdir).fit()
    entries = extract.run(longer, workdir, cohort)
    assert all(e.status == 'ok' for i, e in enumerate(entries) if i != 1)
    retrained, network = extract.extractor_params(longer, workdir, create_feature_net(longer))
    assert json.loads(network)['epoch'] == 2
    for slide_id, old in first.items():
        new = artifacts.load_npz(extract.features_path(workdir, slide_id))
        assert json.loads(str(old['network']))['epoch'] == 1
        assert str(new['network']) == network
        assert not np.allclose(new['features'], old['features'], rtol=1e-3)
    stored = artifacts.load_npz(extract.features_path(workdir, record.slide_id))['features'][:2]
    np.testing.assert_allclose(stored, direct_features(longer, retrained, record.path, tiles,
                                                       [0, 1]), rtol=1e-4, atol=1e-5)
    # Features of two networks never meet in the slide model: one stale file stops train_slide.
    stale_id = next(iter(first))
    artifacts.save_npz(extract.features_path(workdir, stale_id), **first[stale_id])
    with pytest.raises(StageError, match='2 different feature networks'):
        slide_sets.check_one_network([NativeFeatures(workdir, i) for i in first], 'train_slide')


def test_batches_span_slides_each_row_through_its_own_slides_lookup(patch_workdir, tmp_path):
    """The extract stage's batches run on from slide to slide, and leave a histogram slide's
    table to the device (fused into the network's input), row by row: each slide's features
    equal the network on its patches read and looked up on the host, one by one, whether its
    patches share a batch with other slides' (with other tables, or none) or not."""
    workdir = workdir_with_patches(patch_workdir, tmp_path)
    config = make_config(**LEARNING_COHORT, **{'feature_net.learn': False,
                                                'extract.batch_size': 8})
    cohort, _ = pipeline.prepare_cohort(config, workdir)
    rng = np.random.default_rng(0)
    slides, tiles_of = [], {}
    for record, count, method in zip(cohort.slides, (9, 3, 7), ('histogram', 'histogram', 'none')):
        tiles = dict(artifacts.load_npz(workdir / 'tiles' / f'{record.slide_id}.npz'))
        assert len(tiles['coords']) >= count
        tiles.update(coords=tiles['coords'][:count], stain_method=np.asarray(method),
                     stain_lut=np.stack([rng.permutation(256) for _ in range(3)]).astype(np.uint8))
        tiles_of[record.slide_id] = tiles
        slides.append(SlidePatches.from_tiles(record.slide_id, record.path, tiles))
    model = create_feature_net(config)
    params = jax.jit(model.init)(jax.random.key(1), np.zeros((1, 64, 64, 3), np.uint8))['params']
    extractor = extract.Extractor(config, params, model)
    with PatchReader(batch_size=extractor.batch_size, workers=2, defer_lut=True) as reader:
        batches = list(reader.stream(slides))
        results = list(extractor.cohort_features(reader, slides,
                                                 SimpleNamespace(update=lambda n: None)))
    # Batches of 8, 8, 3: the second holds the end of slide 0, all of slide 1 and the start
    # of slide 2; every row carries its slide's table (the identity where the reader applied it).
    assert [len(b.images) for b in batches] == [8, 8, 3]
    assert [(p.slide.slide_id, p.start, p.stop, p.row) for p in batches[1].pieces] == [
        (slides[0].slide_id, 8, 9, 0), (slides[1].slide_id, 0, 3, 1),
        (slides[2].slide_id, 0, 4, 4)]
    luts = np.concatenate([b.luts for b in batches])
    expected_luts = [tiles_of[slides[0].slide_id]['stain_lut']] * 9 + [
        tiles_of[slides[1].slide_id]['stain_lut']] * 3 + [IDENTITY_LUT] * 7
    np.testing.assert_array_equal(luts, np.stack(expected_luts))
    assert [r.slide.slide_id for r in results] == [s.slide_id for s in slides]
    for slide, result in zip(slides, results):
        assert result.error is None
        expected = direct_features(config, params, slide.path, tiles_of[slide.slide_id],
                                   range(len(slide.coords)))
        np.testing.assert_allclose(result.features, expected, rtol=1e-5, atol=1e-6)


def test_the_size_a_short_batch_runs_at():
    # Steps on CPU: VGG-16 at batch 64 on 2 devices in 8 passes, ViT-S/16 in one, a batch of 48.
    assert [short_batches.own_size_step(64, whole, 'cpu') for whole in (16, 2)] == [16, 8]
    assert short_batches.own_size_step(48, 2, 'cpu') == 6
    assert (short_batches.own_size_step(64, 2, 'gpu') == short_batches.own_size_step(64, 8, 'tpu')
            == 64)
    asked = []

    def size(rows, compiled, pays, step=8):
        return short_batches.run_size(rows, 64, step, compiled, lambda own: asked.append(own)
                                      or pays)

    # Its own size, the smallest multiple of the step that holds it, when that costs no compile
    # beyond the first: nothing compiled yet (a cohort in one batch), or that size compiled.
    assert [size(n, set(), False) for n in (1, 8, 9, 35, 63, 64)] == [8, 8, 16, 40, 64, 64]
    assert size(35, {64, 40}, False) == 40 and asked == []
    # Otherwise its own size only where the padding it saves costs more than a compile.
    assert size(35, {64}, True) == 40 and size(35, {64}, False) == 64 and asked == [40, 40]
    assert size(35, {64}, True, step=64) == 64 and size(43, {48}, True, step=6) == 48


def test_micro_batched_extraction_keeps_each_rows_image_with_its_table():
    """On CPU the default VGG-16 extraction runs each device batch as several micro-batches
    (8 images of 512 px per pass at batch 64): every row's image must stay with its lookup
    table through the split, and a short batch's rows equal the network on each image looked
    up on the host at every size it runs at: its own (a multiple of 16 rows: the 8 devices x 2
    passes) or padded to the full batch, which a network this small always is once the full
    size is compiled (its rows cost less than compiling a size)."""
    config = make_config(**{'feature_net.learn': False, 'extract.batch_size': 64,
                            'micro_batch': 4})
    model = create_feature_net(config)
    size = config.tile.patch_size
    params = jax.jit(model.init)(jax.random.key(2), np.zeros((1, size, size, 3), np.uint8))
    extractor = extract.Extractor(config, params['params'], model)
    assert (extractor.micro_batches, extractor.own_size_step) == (2, 16)  # 8 a device, 4 a pass
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (64, size, size, 3), np.uint8)
    luts = np.stack([[rng.permutation(256) for _ in range(3)] for _ in images]).astype(np.uint8)
    looked_up = np.stack([np.stack([lut[c][image[..., c]] for c in range(3)], axis=-1)
                          for image, lut in zip(images, luts)])
    expected = model.apply(params, looked_up, method=FeatureNet.features)

    def check(rows, runs_at):
        features = np.asarray(extractor.dispatch(images[:rows], luts[:rows]))
        assert features.shape == (runs_at, expected.shape[1])
        np.testing.assert_allclose(features[:rows], expected[:rows], rtol=1e-5, atol=1e-5)

    check(13, 16)  # the first size compiled: its own
    check(64, 64)
    check(19, 64)  # padded: its 32 rows would cost far less than the compile
    assert not extractor.padding_costs_more(32)
    extractor.compiled = {64: 1e-9}  # were compiling that cheap, its own size would pay
    assert extractor.padding_costs_more(32)
    check(19, 32)


class RecordingOutput:
    """A fake device result: records when the host reads it (its conversion to numpy)."""

    def __init__(self, values, log):
        self.values, self.log = values, log

    def __array__(self, dtype=None, copy=None):
        self.log.append('read')
        return self.values


def test_extraction_keeps_a_bounded_number_of_batches_in_flight():
    """A reader faster than the network must not pile batches up on the device: at each batch
    the reader yields, at most extract.IN_FLIGHT results are dispatched and unread, yet the
    next batch is dispatched before the host waits for the oldest."""
    config = make_config()
    extractor = extract.Extractor(config, {}, model=None)  # the network is faked below
    batch, count = extractor.batch_size, 23 * extractor.batch_size - 5  # last batch padded
    log, in_flight_at_yield = [], []

    def unread():
        return log.count('dispatch') - log.count('read')

    def fake_features(params, images_and_luts):  # uint8 [B, P, P, 3] -> [B, 3]
        images, _ = images_and_luts
        log.append('dispatch')
        return RecordingOutput(np.asarray(images)[:, 0, 0, :].astype(np.float32), log)

    class FastReader:
        def stream(self, slides):
            (slide,) = slides
            for start in range(0, count, batch):
                indices = np.arange(start, min(start + batch, count))
                images = np.zeros((len(indices), 4, 4, 3), np.uint8)
                images[:, 0, 0, :] = (indices[:, None] * [1, 3, 7]) % 251
                in_flight_at_yield.append(unread())
                yield StreamBatch(images, np.broadcast_to(IDENTITY_LUT, (len(images), 3, 256)),
                                  (Piece(slide, start, start + len(indices), 0),), {})

    class Progress:
        done = 0

        def update(self, n):
            self.done += n

    extractor.features = fake_features
    progress = Progress()
    patches = SimpleNamespace(slide_id='s', coords=np.zeros((count, 2)))
    (result,) = extractor.cohort_features(FastReader(), [patches], progress)
    assert result.slide is patches and result.error is None
    features = result.features
    expected = ((np.arange(count)[:, None] * [1, 3, 7]) % 251).astype(np.float32)
    np.testing.assert_array_equal(features, expected)
    assert features.dtype == np.float32 and progress.done == count
    assert len(in_flight_at_yield) == 23
    assert max(in_flight_at_yield) <= extract.IN_FLIGHT
    # The device is never idle: when the host waits for a result, a later batch is queued too.
    last_dispatch = max(i for i, event in enumerate(log) if event == 'dispatch')
    unread_at_reads = [log[:i].count('dispatch') - log[:i].count('read')
                       for i, event in enumerate(log[:last_dispatch]) if event == 'read']
    assert unread_at_reads and min(unread_at_reads) >= 2


@pytest.mark.parametrize('damage', ['truncated', 'stain table', 'stain matrix', 'stain method',
                                    'patch size', 'read size', 'coords'])
def test_a_damaged_tiles_file_is_an_error_entry_naming_it(tmp_path, damage):
    """A tiles file that does not load, whose stain table is not uint8 [3, 256], whose Macenko
    matrix is not finite, whose stain method is unknown, whose patches are not the config's
    size, whose read size is out of bounds or whose coordinates are not [N, 2] integers gives
    the slide an error entry that names the file, before any reading or network work."""
    from pathjax.cohort import SlideRecord
    from pathjax.slides.tile_stage import tiles_path
    record = SlideRecord('s1', str(tmp_path / 's1.svs'), 'a', 'c1', 'train', line=2)
    path = tiles_path(tmp_path, 's1')
    path.parent.mkdir(parents=True)
    tiles = {'coords': np.zeros((2, 2), np.int64), 'level': np.int64(0),
             'read_size': np.int64(64), 'patch_size': np.int64(64), 'extent': np.float64(64),
             'stain_lut': np.zeros((3, 255), np.uint8)}
    if damage == 'stain matrix':
        tiles.update(stain_method=np.asarray('macenko'), stain_od_matrix=np.full((3, 3), np.nan))
    if damage == 'stain method':
        tiles.update(stain_method=np.asarray('vahadane'))
    if damage in ('patch size', 'read size', 'coords'):
        tiles.update(stain_lut=np.zeros((3, 256), np.uint8), grid=np.zeros((2, 2), np.int64))
    if damage == 'patch size':
        tiles.update(patch_size=np.int64(32))
    if damage == 'read size':  # 3 TB per patch, were it allocated
        tiles.update(read_size=np.int64(10 ** 6))
    if damage == 'coords':
        tiles.update(coords=np.zeros((2, 3), np.float64))
    artifacts.save_npz(path, **tiles)
    if damage == 'truncated':
        path.write_bytes(path.read_bytes()[:40])
    entries = {}
    assert not list(extract.streamed_slides(tmp_path, [record], 64, entries, {}))
    entry = entries['s1']
    assert entry.status == 'error'
    assert str(path) in entry.message and 'tile stage again' in entry.message


def test_a_slide_without_tissue_patches_is_its_own_entry_and_not_streamed(tmp_path):
    """A tiles file with no kept patches gives a no-tissue entry and nothing to read; a slide
    never tiled gives an error entry; the slides after them are still streamed."""
    from pathjax.cohort import SlideRecord
    from pathjax.slides.tile_stage import tiles_path
    records = [SlideRecord(s, str(tmp_path / f'{s}.svs'), 'a', s, 'train', line=2 + i)
               for i, s in enumerate(('empty', 'untiled', 'kept'))]
    for slide_id, count in (('empty', 0), ('kept', 3)):
        path = tiles_path(tmp_path, slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.save_npz(path, coords=np.zeros((count, 2), np.int64), level=np.int64(0),
                           read_size=np.int64(64), patch_size=np.int64(64),
                           extent=np.float64(64), stain_method=np.asarray('none'),
                           grid=np.zeros((count, 2), np.int64))
    entries, grids = {}, {}
    streamed = list(extract.streamed_slides(tmp_path, records, 64, entries, grids))
    assert [s.slide_id for s in streamed] == ['kept'] and list(grids) == ['kept']
    assert entries['empty'].status == 'no_tissue' and 'no tissue' in entries['empty'].message
    assert entries['untiled'].status == 'error' and 'not tiled' in entries['untiled'].message
