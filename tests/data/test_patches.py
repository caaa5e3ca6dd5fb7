"""The patch dataset (TFDS, array_record) and its grain input pipeline."""


import numpy as np
import pytest

from pathjax import artifacts, pipeline
from pathjax.data import patches
from pathjax.errors import StageError
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.reader import Slide
from tests.conftest import LEARNING_COHORT, make_config


@pytest.fixture(scope='module')
def built(patch_workdir):
    config = make_config(**LEARNING_COHORT)
    builder = patches.load_builder(patch_workdir, patches.Sampling.from_config(config))
    return patch_workdir, config, builder


def cohort_rows(workdir):
    lines = (workdir / 'cohort.csv').read_text().splitlines()[1:]
    return {row[0]: row for row in (line.split(',') for line in lines)}


def test_dataset_holds_the_sampled_patches_of_train_and_val_slides(built):
    workdir, config, builder = built
    rows = cohort_rows(workdir)
    for split in ('train', 'val'):
        source = builder.as_data_source(split)
        per_slide = {}
        for i in range(len(source)):
            example = source[i]
            slide_id = example['slide_id'].decode()
            assert rows[slide_id][4] == split
            assert example['label'] == config.data.classes.index(rows[slide_id][2])
            assert example['image'].shape == (64, 64, 3) and example['image'].dtype == np.uint8
            per_slide.setdefault(slide_id, []).append(tuple(example['coords']))
        for slide_id, coords in per_slide.items():
            tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz')
            expected = min(len(tiles['coords']), config.learn.patches_per_slide)
            assert len(coords) == len(set(coords)) == expected
            assert set(coords) <= {tuple(c) for c in tiles['coords']}
    assert 'test' not in builder.info.splits


def test_images_are_the_stain_normalized_patches(built):
    workdir, _, builder = built
    rows = cohort_rows(workdir)
    source = builder.as_data_source('train')
    for i in (0, len(source) // 2, len(source) - 1):
        example = source[i]
        slide_id = example['slide_id'].decode()
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz')
        with Slide(rows[slide_id][1]) as slide:
            plan = slide.plan(2.0, 64)
            expected = SlideStain.from_tiles(tiles).apply(slide.read_patch(*example['coords'], plan))
        assert np.abs(example['image'].astype(int) - expected).mean() < 3  # JPEG quality 95


def test_rerun_skips_and_changed_settings_are_refused(built):
    workdir, config, _ = built
    cohort, _ = pipeline.prepare_cohort(config, workdir)
    report_before = (workdir / 'patches' / 'slides.json').read_text()
    entries = patches.run(config, workdir, cohort)
    assert (workdir / 'patches' / 'slides.json').read_text() == report_before
    assert sum(e.patches for e in entries) > 200
    config.learn.patches_per_slide = 5
    with pytest.raises(StageError, match='other settings'):
        patches.run(config, workdir, cohort)


def test_train_batches_are_seeded_per_epoch_and_split_over_processes(built):
    _, _, builder = built
    source = patches.encoded_source(builder, 'train')

    def labels_and_sums(batches):
        return [(b['label'].tolist(), int(b['image'].sum())) for b in batches]

    epoch0 = labels_and_sums(patches.train_batches(source, 8, seed=0, epoch=0))
    assert epoch0 == labels_and_sums(patches.train_batches(source, 8, seed=0, epoch=0))
    assert epoch0 != labels_and_sums(patches.train_batches(source, 8, seed=0, epoch=1))
    assert len(epoch0) == len(source) // 8
    halves = [list(patches.train_batches(source, 4, seed=0, epoch=0, process_index=p,
                                         process_count=2)) for p in range(2)]
    assert len(halves[0]) == len(halves[1])
    # Process p's k-th batch is rows 4p..4p+3 of the k-th global batch of 8.
    alone = list(patches.train_batches(source, 8, seed=0, epoch=0))
    assert len(halves[0]) == len(alone)
    for k, batch in enumerate(alone):
        np.testing.assert_array_equal(np.concatenate([h[k]['image'] for h in halves]),
                                      batch['image'])


def test_eval_batches_cover_every_example_once_with_a_mask(built):
    """Every example once, in order, padded batches masked; each image decoded into its batch
    equals TFDS's own decoding of it (OpenCV's) to within one grey level (both libjpeg-turbo)."""
    _, _, builder = built
    source, decoded = patches.encoded_source(builder, 'val'), builder.as_data_source('val')
    batches = list(patches.eval_batches(source, 32))
    assert all(len(b['label']) == 32 for b in batches)
    mask = np.concatenate([b['mask'] for b in batches])
    assert mask.sum() == len(source) and mask[:len(source)].all()
    labels = np.concatenate([b['label'] for b in batches])[:len(source)]
    np.testing.assert_array_equal(labels, [decoded[i]['label'] for i in range(len(source))])
    images = np.concatenate([b['image'] for b in batches])[:len(source)]
    expected = np.stack([decoded[i]['image'] for i in range(len(source))])
    assert images.dtype == np.uint8 and images.shape == expected.shape
    assert np.abs(images.astype(int) - expected).max() <= 1


def test_a_killed_build_resumes_at_the_first_slide_not_staged(built, tmp_path, monkeypatch):
    """Killed while reading the 4th slide: the rerun reads only the slides not staged yet and
    builds the same dataset as the uninterrupted build (every example, in order)."""
    workdir, _, builder = built
    config = make_config(**LEARNING_COHORT)  # not the module's (another test changes it)
    for name in ('tiles', 'synthetic'):
        (tmp_path / name).symlink_to(workdir / name, target_is_directory=True)
    (tmp_path / 'cohort.csv').write_text((workdir / 'cohort.csv').read_text())
    cohort, _ = pipeline.prepare_cohort(config, tmp_path)
    original, read, killed = patches.stage_slide, [], []

    class Killed(BaseException):
        pass

    def killed_at_the_fourth_slide(reader, record, *args):
        read.append(record.slide_id)
        if len(read) == 4 and not killed:
            killed.append(record.slide_id)
            raise Killed
        return original(reader, record, *args)

    monkeypatch.setattr(patches, 'stage_slide', killed_at_the_fourth_slide)
    with pytest.raises(Killed):
        patches.run(config, tmp_path, cohort)
    assert len(list((tmp_path / 'patches' / 'staged').glob('*.npz'))) == 3
    first_run, read[:] = list(read), []
    entries = patches.run(config, tmp_path, cohort)
    assert not set(read) & set(first_run[:3]) and read[0] == first_run[3]
    assert not (tmp_path / 'patches' / 'staged').exists()
    assert (tmp_path / 'patches' / 'slides.json').read_text() == \
        (workdir / 'patches' / 'slides.json').read_text()
    assert sum(e.patches for e in entries) > 200
    resumed = patches.load_builder(tmp_path, patches.Sampling.from_config(config))
    for split in ('train', 'val'):
        ours, reference = resumed.as_data_source(split), builder.as_data_source(split)
        assert len(ours) == len(reference)
        for i in range(len(ours)):
            a, b = ours[i], reference[i]
            assert a['slide_id'] == b['slide_id'] and a['label'] == b['label']
            np.testing.assert_array_equal(a['coords'], b['coords'])
            np.testing.assert_array_equal(a['image'], b['image'])
