"""Macenko and Reinhard stain normalization vs torchstain's numpy backend, and their contracts."""

import numpy as np
import pytest
from PIL import Image

from pathjax.slides import stain_macenko, stain_reinhard

METHODS = (stain_macenko, stain_reinhard)


@pytest.fixture(scope='module')
def torchstain_numpy():
    return pytest.importorskip('torchstain.numpy',
                               reason='the reference checks need the test extra (torchstain)')


@pytest.fixture(scope='module')
def pair(shared_data):
    """A real H&E source and target tile, stained visibly differently. uint8 [H, W, 3] each."""
    return tuple(np.asarray(Image.open(shared_data / f'tiles/torchstain/{name}.png').convert('RGB'))
                 for name in ('source', 'target'))


@pytest.fixture(scope='module')
def tile(shared_data):
    path = shared_data / 'tiles/mopadi/TCGA-AD-6964-01Z-00-DX1/Tile_(16896,20480).jpg'
    return np.asarray(Image.open(path).convert('RGB'))


def flat(image):
    return image.reshape(-1, 3)


def stained_pixels(count, seed=0):
    """uint8 [count, 3] mixtures of torchstain's default H and E vectors, OD >= 0.15 everywhere."""
    vectors = np.array([[0.5626, 0.2159], [0.7201, 0.8012], [0.4062, 0.5581]])
    concentrations = np.random.default_rng(seed).uniform(0.4, 1.5, (2, count))
    return np.rint(240 * np.exp(-vectors @ concentrations) - 1).T.astype(np.uint8)


@pytest.mark.parametrize('swap', [False, True])
def test_macenko_matches_torchstain(torchstain_numpy, pair, swap):
    """Same statistics to float64 rounding (the same operations; pinv instead of lstsq), and the
    same image up to the final conversion: torchstain truncates Io exp(-OD') to uint8, we round
    it, so ours - theirs is 0 or 1 on every pixel as long as our float32 value stays within 0.5 of
    their float64 one. It stays within 1e-3: M, the OD table and OpenCV's exp are float32
    (relative errors ~1e-7, so ~1e-4 grey levels at 255; measured 7e-5)."""
    source, target = pair[::-1] if swap else pair
    theirs_target = torchstain_numpy.normalizers.NumpyMacenkoNormalizer()
    theirs_target.fit(target)
    theirs_source = torchstain_numpy.normalizers.NumpyMacenkoNormalizer()
    theirs_source.fit(source)
    reference = stain_macenko.slide_statistics(flat(target))
    slide = stain_macenko.slide_statistics(flat(source))
    for ours, theirs in ((reference, theirs_target), (slide, theirs_source)):
        assert ours['stain_vectors'].shape == (3, 2) and ours['max_concentrations'].shape == (2,)
        np.testing.assert_allclose(ours['stain_vectors'], theirs.HERef, rtol=0, atol=1e-12)
        np.testing.assert_allclose(ours['max_concentrations'], theirs.maxCRef, rtol=1e-12)

    ours = stain_macenko.apply(source, stain_macenko.fit(slide, reference))
    theirs, _, _ = theirs_target.normalize(source, stains=False)
    # torchstain's float image, from its fitted attributes; it truncates to exactly its output.
    od = -np.log((flat(source) + 1.0) / 240)
    concentrations = np.linalg.lstsq(theirs_source.HERef, od.T, rcond=None)[0]
    scale = theirs_target.maxCRef / theirs_source.maxCRef
    exact = 240 * np.exp(-theirs_target.HERef @ (concentrations * scale[:, None]))
    exact = np.minimum(exact, 255).T.reshape(source.shape)
    np.testing.assert_array_equal(np.floor(exact), theirs)

    difference = ours.astype(np.int64) - theirs
    assert difference.min() >= 0 and difference.max() <= 1
    assert np.abs(ours - exact).max() <= 0.5 + 1e-3


@pytest.mark.parametrize('swap', [False, True])
def test_reinhard_matches_torchstain(torchstain_numpy, pair, swap):
    """Our Lab is torchstain's formula with OpenCV's rounded D65 white point (0.950456, 1, 1.088754
    vs 0.95047, 1, 1.08883): f(X / Xn) and f(Z / Zn) grow by factors 1 + 4.9e-6 and 1 + 2.3e-5
    (cube roots of the ratios), so a* = 500 (fx - fy) shifts by at most 0.0025 and b* = 200
    (fy - fz) by at most 0.0047 for in-gamut colours (f <= 1), L* not at all (measured 0.002,
    0.0043, 1e-5); standard deviations move by ~3e-5 relative. Back in sRGB that white point and
    OpenCV's spline-interpolated sRGB encoding (<= 0.02 grey levels) keep our float value within
    0.03 of torchstain's (measured 0.01); torchstain truncates and we round, so ours - theirs is 0
    or 1 on every pixel."""
    source, target = pair[::-1] if swap else pair
    theirs_target = torchstain_numpy.normalizers.NumpyReinhardNormalizer()
    theirs_target.fit(target)
    theirs_source = torchstain_numpy.normalizers.NumpyReinhardNormalizer()
    theirs_source.fit(source)
    reference = stain_reinhard.slide_statistics(flat(target))
    slide = stain_reinhard.slide_statistics(flat(source))
    theirs_crop = torchstain_numpy.normalizers.NumpyReinhardNormalizer()
    theirs_crop.fit(source[200:206, 300:306])  # 36 pixels: ddof 1 would be 1.4% off
    crop = stain_reinhard.slide_statistics(flat(source[200:206, 300:306]))
    for ours, theirs in ((reference, theirs_target), (slide, theirs_source), (crop, theirs_crop)):
        assert ours['lab_mean'].shape == ours['lab_std'].shape == (3,)
        np.testing.assert_array_less(np.abs(ours['lab_mean'] - theirs.target_means),
                                      [1e-4, 0.0026, 0.0048])
        np.testing.assert_allclose(ours['lab_std'], theirs.target_stds, rtol=1e-4)

    ours = stain_reinhard.apply(source, stain_reinhard.fit(slide, reference))
    theirs = theirs_target.normalize(source)
    # torchstain's float image with its own functions; it truncates to exactly its output.
    utils = torchstain_numpy.utils
    channels = utils.lab_split(utils.rgb2lab(source.astype(np.float32) / 255))
    statistics = zip(theirs_source.target_means, theirs_source.target_stds,
                     theirs_target.target_means, theirs_target.target_stds)
    standardized = [(x - mean) / std * target_std + target_mean
                    for x, (mean, std, target_mean, target_std) in zip(channels, statistics)]
    exact = utils.lab2rgb(utils.lab_merge(*standardized)) * 255
    np.testing.assert_array_equal(np.floor(exact), theirs)

    difference = ours.astype(np.int64) - theirs
    assert difference.min() >= 0 and difference.max() <= 1
    assert np.abs(ours - exact).max() <= 0.5 + 0.03


def test_macenko_fitted_to_itself_projects_onto_its_stain_plane(tile):
    """fit(s, s) is not the identity: M = HE pinv(HE) is the orthogonal projection onto the stain
    plane. Only the identity matrix gives the pixels back, plus the 1 that torchstain's inverse
    OD (Io exp(-OD), not Io exp(-OD) - 1) adds."""
    statistics = stain_macenko.slide_statistics(flat(tile))
    matrix = stain_macenko.fit(statistics, statistics)['stain_od_matrix']
    assert matrix.dtype == np.float32 and matrix.shape == (3, 3)
    vectors = statistics['stain_vectors']
    np.testing.assert_allclose(matrix, matrix.T, atol=1e-6)
    np.testing.assert_allclose(matrix @ matrix, matrix, atol=1e-6)
    np.testing.assert_allclose(matrix @ vectors, vectors, atol=1e-6)
    np.testing.assert_allclose(np.trace(matrix), 2, atol=1e-6)
    identity = {'stain_od_matrix': np.eye(3, dtype=np.float32)}
    values = np.arange(256, dtype=np.uint8)[:, None].repeat(3, axis=1)
    np.testing.assert_array_equal(stain_macenko.apply(values, identity),
                                  np.minimum(values.astype(np.int64) + 1, 255))


def test_reinhard_fitted_to_itself_is_the_identity(tile):
    """scale 1, shift 0, and the Lab round trip is within 0.01 grey levels: all pixels come back."""
    statistics = stain_reinhard.slide_statistics(flat(tile))
    transform = stain_reinhard.fit(statistics, statistics)
    np.testing.assert_array_equal(transform['stain_lab_scale'], np.ones(3, np.float32))
    np.testing.assert_allclose(transform['stain_lab_shift'], 0, atol=1e-4)
    np.testing.assert_array_equal(stain_reinhard.apply(tile, transform), tile)
    every_colour = np.random.default_rng(0).integers(0, 256, (4096, 3), dtype=np.uint8)
    np.testing.assert_array_equal(stain_reinhard.apply(every_colour, transform), every_colour)


@pytest.mark.parametrize('method', METHODS, ids=lambda m: m.__name__)
def test_apply_keeps_shape_and_survives_an_npz_round_trip(method, pair, tmp_path):
    source, target = pair
    transform = method.fit(method.slide_statistics(flat(source)),
                           method.slide_statistics(flat(target)))
    assert all(key.startswith('stain_') and value.dtype == np.float32
               for key, value in transform.items())
    patches = np.stack([source[:64, :80], source[100:164, 200:280], source[-64:, -80:]])
    out = method.apply(patches, transform)
    assert out.shape == patches.shape and out.dtype == np.uint8
    for i in range(len(patches)):
        np.testing.assert_array_equal(method.apply(patches[i], transform), out[i])
    np.testing.assert_array_equal(method.apply(flat(patches), transform), flat(out))
    np.testing.assert_array_equal(method.apply(patches[:, ::2], transform), out[:, ::2])
    assert method.apply(patches[:0], transform).shape == (0, 64, 80, 3)

    np.savez(tmp_path / 'tiles.npz', **transform, coordinates=np.zeros((3, 2), np.int64))
    with np.load(tmp_path / 'tiles.npz', allow_pickle=False) as stored:
        np.testing.assert_array_equal(method.apply(patches, stored), out)
    as_float64 = {key: value.astype(np.float64) for key, value in transform.items()}
    np.testing.assert_array_equal(method.apply(patches, as_float64), out)


def test_macenko_reference_is_the_mean_with_unit_vectors(pair):
    first, second = (stain_macenko.slide_statistics(flat(image)) for image in pair)
    single = stain_macenko.reference([first])
    np.testing.assert_allclose(single['stain_vectors'], first['stain_vectors'], atol=1e-12)
    np.testing.assert_allclose(single['max_concentrations'], first['max_concentrations'])
    both = stain_macenko.reference([first, second])
    mean = (first['stain_vectors'] + second['stain_vectors']) / 2
    np.testing.assert_allclose(both['stain_vectors'], mean / np.linalg.norm(mean, axis=0),
                               atol=1e-12)
    np.testing.assert_allclose(np.linalg.norm(both['stain_vectors'], axis=0), 1)
    np.testing.assert_allclose(both['max_concentrations'],
                               (first['max_concentrations'] + second['max_concentrations']) / 2)


def test_reinhard_reference_is_the_mean_and_the_pooled_std():
    first = {'lab_mean': np.array([70.0, 20, -10]), 'lab_std': np.array([10.0, 3, 4])}
    second = {'lab_mean': np.array([50.0, 30, -20]), 'lab_std': np.array([20.0, 4, 3])}
    single = stain_reinhard.reference([first])
    np.testing.assert_array_equal(single['lab_mean'], first['lab_mean'])
    np.testing.assert_allclose(single['lab_std'], first['lab_std'])
    both = stain_reinhard.reference([first, second])
    np.testing.assert_allclose(both['lab_mean'], [60, 25, -15])
    np.testing.assert_allclose(both['lab_std'], np.sqrt([250, 12.5, 12.5]))
    transform = stain_reinhard.fit(first, both)
    np.testing.assert_allclose(transform['stain_lab_scale'], both['lab_std'] / first['lab_std'],
                               rtol=1e-6)
    np.testing.assert_allclose(
        transform['stain_lab_shift'], both['lab_mean'] - first['lab_mean'] * both['lab_std'] /
        first['lab_std'], rtol=1e-6)


def bad_statistics():
    """Damaged statistics per method: (method, statistics, message)."""
    macenko = {'stain_vectors': np.array([[0.6, 0.1], [0.7, 0.9], [0.4, 0.4]]),
               'max_concentrations': np.array([1.5, 1.0])}
    reinhard = {'lab_mean': np.array([70.0, 20, -10]), 'lab_std': np.array([10.0, 3, 4])}
    cases = []
    for method, good, vector, positive in ((stain_macenko, macenko, 'stain_vectors',
                                            'max_concentrations'),
                                           (stain_reinhard, reinhard, 'lab_mean', 'lab_std')):
        nan = good[vector].copy()
        nan.flat[0] = np.nan
        cases += [(method, {**good, vector: nan}, 'finite'),
                  (method, {**good, vector: good[vector][:2]}, 'finite floats'),
                  (method, {**good, vector: good[vector].astype(np.int64)}, 'finite floats'),
                  (method, {**good, positive: np.zeros_like(good[positive])}, positive),
                  (method, {vector: good[vector]}, 'need'),
                  (method, None, 'need')]
    parallel = np.array([[0.6, 0.6], [0.7, 0.7], [0.4, 0.4]])
    cases.append((stain_macenko, {**macenko, 'stain_vectors': parallel}, 'parallel'))
    return cases


@pytest.mark.parametrize('method,statistics,message', bad_statistics())
def test_fit_and_reference_refuse_damaged_statistics(method, statistics, message):
    good = method.reference([method.slide_statistics(stained_pixels(1000))])
    with pytest.raises(ValueError, match=message):
        method.fit(statistics, good)
    if message != 'parallel':  # parallel vectors are a fine reference, only not a slide to invert
        with pytest.raises(ValueError, match=message):
            method.fit(good, statistics)
        with pytest.raises(ValueError, match=message):
            method.reference([good, statistics])


@pytest.mark.parametrize('method', METHODS, ids=lambda m: m.__name__)
def test_slide_statistics_refuse_bad_pixels(method):
    pixels = stained_pixels(1000)
    for bad in (pixels.reshape(10, 100, 3), pixels[:, :2], pixels.astype(np.float32),
                pixels[:0]):
        with pytest.raises(ValueError, match=r'uint8 \[N, 3\]'):
            method.slide_statistics(bad)
    message = 'too few stained pixels' if method is stain_macenko else 'no spread'
    with pytest.raises(ValueError, match=message):
        method.slide_statistics(np.full((1000, 3), 255, np.uint8))  # all white
    with pytest.raises(ValueError, match='no slide statistics'):
        method.reference([])


def test_macenko_needs_enough_pixels_spanning_two_stains():
    white = np.full((50, 3), 255, np.uint8)
    stained = stained_pixels(99)
    with pytest.raises(ValueError, match='99 of 149'):
        stain_macenko.slide_statistics(np.concatenate([white, stained]))
    stain_macenko.slide_statistics(np.concatenate([white, stained, stained[:1]]))
    with pytest.raises(ValueError, match='not positive'):  # 1% tissue: C's 99th percentile < 0
        stain_macenko.slide_statistics(np.concatenate([white.repeat(200, 0), stained_pixels(100)]))
    with pytest.raises(ValueError, match='do not span a plane'):
        stain_macenko.slide_statistics(np.tile(np.array([[120, 60, 150]], np.uint8), (500, 1)))


@pytest.mark.parametrize('method', METHODS, ids=lambda m: m.__name__)
def test_apply_refuses_bad_transforms_and_images(method, pair):
    source, target = pair
    transform = method.fit(method.slide_statistics(flat(source)),
                           method.slide_statistics(flat(target)))
    key = next(iter(transform))
    nan = transform[key].copy()
    nan.flat[1] = np.nan
    for bad in ({**transform, key: nan}, {**transform, key: transform[key][:2]},
                {**transform, key: transform[key].astype(np.int32)}, {}, None):
        with pytest.raises(ValueError, match='stain_'):
            method.apply(source, bad)
    for bad in (source.astype(np.float32), source[..., :2], source[0, 0]):
        with pytest.raises(ValueError, match=r'uint8 \[\.\.\., 3\]'):
            method.apply(bad, transform)
