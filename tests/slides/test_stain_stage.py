"""Every stain.method through the tile stage and the patch stream: each slide's transform is fitted
on its tissue pixels onto the training slides' reference, stored in its tiles file, and is what
the reader applies; normalized slides land on the reference."""

import numpy as np
import pytest

from pathjax import artifacts, pipeline
from pathjax.sampling import seeded_subset
from pathjax.slides import slide_writer, stain_macenko, synthetic, synthetic_cohort, tile_stage
from pathjax.slides.patch_stream import PatchReader, SlidePatches
from pathjax.slides.reader import Slide
from pathjax.slides.stain_transform import MODULES, SlideStain
from tests.conftest import make_config


@pytest.fixture(scope='module')
def manifest(tmp_path_factory):
    config = make_config()
    spec = config.data.synthetic
    return synthetic_cohort.make_cohort(tmp_path_factory.mktemp('cohort'), spec.num_slides,
                                        tuple(config.data.classes), seed=spec.seed,
                                        width=spec.width, height=spec.height)


def tiled(manifest, workdir, method):
    config = make_config(**{'data.manifest': str(manifest), 'stain.method': method})
    assert pipeline.run(config, workdir, ['tile']) == 0
    rows = [line.split(',') for line in (workdir / 'cohort.csv').read_text().splitlines()[1:]]
    return config, rows


def sampled_tissue(config, slide_id, path, tiles, transform=None) -> np.ndarray:
    """The tissue pixels uint8 [N, 3] the tile stage fitted the slide on, read again here
    (normalized by `transform` when given)."""
    pixels = []
    with Slide(path) as slide:
        plan = slide.plan(config.tile.mpp, config.tile.patch_size, config.tile.level)
        for x, y in tiles['coords'][seeded_subset(slide_id, len(tiles['coords']),
                                                  config.stain.fit_patches, 0)]:
            patch = slide.read_patch(int(x), int(y), plan)
            tissue = patch.max(axis=-1) <= config.tissue.threshold
            pixels.append((patch if transform is None else transform.apply(patch))[tissue])
    return np.concatenate(pixels)


@pytest.mark.parametrize('method', ['macenko', 'reinhard'])
def test_each_slide_is_normalized_onto_the_training_reference(manifest, tmp_path, method):
    config, rows = tiled(manifest, tmp_path, method)
    module = MODULES[method]
    reference_file = artifacts.load_npz(tmp_path / 'stain' / 'reference.npz')
    assert str(reference_file['method']) == method
    reference = tile_stage.slide_statistics(reference_file)
    train = [r for r in rows if r[4] == 'train']
    statistics = [module.slide_statistics(sampled_tissue(config, r[0], r[1], artifacts.load_npz(
        tmp_path / 'tiles' / f'{r[0]}.npz'))) for r in train]
    expected = module.reference(statistics)  # from the training slides only, read again here
    for name in expected:
        np.testing.assert_allclose(reference[name], expected[name], rtol=1e-6, atol=1e-9)
    for slide_id, path, *_ in rows:
        tiles = artifacts.load_npz(tmp_path / 'tiles' / f'{slide_id}.npz')
        transform = SlideStain.from_tiles(tiles)
        assert transform.method == method
        fitted = module.fit(module.slide_statistics(sampled_tissue(config, slide_id, path, tiles)),
                            reference)
        for name, value in fitted.items():
            np.testing.assert_allclose(transform.arrays[name], value, rtol=1e-5, atol=1e-6)
        after = module.slide_statistics(sampled_tissue(config, slide_id, path, tiles, transform))
        if method == 'reinhard':  # Lab means land on the reference's (rounding to uint8: < 1)
            np.testing.assert_allclose(after['lab_mean'], reference['lab_mean'], atol=1.0)
        else:  # the stain directions become the reference's
            cosines = (after['stain_vectors'] * reference['stain_vectors']).sum(axis=0)
            assert cosines.min() > np.cos(np.radians(3))


def test_the_reader_applies_the_slides_transform(manifest, tmp_path):
    config, rows = tiled(manifest, tmp_path, 'macenko')
    slide_id, path = rows[0][:2]
    tiles = artifacts.load_npz(tmp_path / 'tiles' / f'{slide_id}.npz')
    patches = SlidePatches.from_tiles(slide_id, path, tiles)
    with PatchReader(batch_size=4, workers=2) as reader:
        streamed = np.concatenate([b.images for b in reader.batches(patches)])
    with Slide(path) as slide:
        plan = slide.plan(config.tile.mpp, config.tile.patch_size, config.tile.level)
        expected = np.stack([stain_macenko.apply(slide.read_patch(int(x), int(y), plan),
                                                 tiles) for x, y in tiles['coords']])
    np.testing.assert_array_equal(streamed, expected)


def test_a_slide_without_stainable_pixels_is_left_unnormalized_with_a_warning(tmp_path):
    """Reinhard cannot fit grey pixels (no colour spread): the slide's entry says so, its
    transform is the identity, the stage goes on."""
    grey = np.full((1536, 2048, 3), 120, np.uint8)
    grey[::7] = 100  # some texture, no colour
    path = tmp_path / 'grey.tiff'
    slide_writer.write_slide(path, grey, 0.5, 'tiff')
    manifest = tmp_path / 'manifest.csv'
    manifest.write_text(f'slide_id,path,label,case_id,split\ngrey,{path},negative,c,train\n')
    config = make_config(**{'data.manifest': str(manifest), 'stain.method': 'reinhard',
                            'stain.reference': str(tmp_path / 'template.png')})
    from PIL import Image
    Image.fromarray(synthetic.render_slide(synthetic.SyntheticSlideSpec(
        't', 'c', 'negative', False, 2.0, 'tiff', 256, 256, 1))).save(tmp_path / 'template.png')
    assert pipeline.run(config, tmp_path / 'work', ['tile']) == 0
    tiles = artifacts.load_npz(tmp_path / 'work' / 'tiles' / 'grey.npz')
    assert SlideStain.from_tiles(tiles).method == 'none'
    assert any('no reinhard stain fit' in str(w) for w in tiles['warnings'])
