"""HED colour jitter against scikit-image's colour deconvolution, on real H&E tiles.

Tolerances (float32 on device against skimage's float64):
- FLOAT_ATOL 4e-6 on rgb in [0, 1] (1e-3 grey levels): the largest error seen on the tiles below
  is 9e-7. The transform is exp(log(rgb) @ M + offset); an absolute error of a few float32 ulps in
  log(rgb) becomes rgb x that in rgb, at most about 3 ulps x |log rgb| x rgb <= 3 ulps / e, and M
  (about the identity) adds a few more; 4e-6 leaves a factor 4 for other backends' log and exp.
- uint8: rounding the float32 result differs from rounding the float64 one only where the exact
  value lies within ~1e-6 x 255 of a half grey level (about 1e-4 of the channels; at most 2e-4 of
  the pixels here), and then by one level: so >= 99.9% of the pixels equal, all within 1.
- identity (alpha 1, beta 0): within IDENTITY_ATOL 1e-6 of max(rgb, 1e-6) in float (seen:
  9e-8), so every uint8 pixel comes back exactly (the error is 2.6e-4 of the 0.5 level needed).
"""

import glob

import jax
import numpy as np
import pytest
from skimage.color import hed2rgb, hed_from_rgb, rgb2hed, rgb_from_hed

from pathjax.data import hed_jitter as hed
from pathjax.slides import synthetic
from tests.conftest import SHARED_DATA

FLOAT_ATOL = 4e-6
IDENTITY_ATOL = 1e-6
CROP = 128
# (alpha, beta) per stain channel (H, E, DAB): HED-light and HED-strong sized, and the identity's
# neighbours in each direction.
JITTERS = [((1.0, 1.0, 1.0), (0.0, 0.0, 0.0)),
           ((0.96, 1.04, 1.01), (0.03, -0.02, 0.01)),
           ((1.05, 0.95, 0.97), (-0.05, 0.05, -0.04)),
           ((0.82, 1.18, 1.1), (0.15, -0.2, 0.05)),
           ((1.2, 0.8, 0.9), (-0.1, 0.12, -0.2))]


def load_tiles() -> dict[str, np.ndarray]:
    """{name: uint8 [CROP, CROP, 3]}: real H&E tiles of ../shared/data (the torchstain source has
    a slightly negative DAB almost everywhere, so scikit-image's stain clamp acts on it), or,
    without that folder, crops of synthetic H&E slides."""
    from PIL import Image
    files = sorted(glob.glob(str(SHARED_DATA / 'tiles' / 'mopadi' / '*' / '*.jpg')))
    files += [str(SHARED_DATA / 'tiles' / 'torchstain' / 'source.png')]
    if SHARED_DATA.is_dir():
        return {f.rsplit('/', 1)[-1]: np.asarray(Image.open(f).convert('RGB'))[:CROP, :CROP]
                for f in files}
    tiles = {}
    for seed in range(4):
        spec = synthetic.SyntheticSlideSpec(f's{seed}', f'c{seed}', 'a', seed % 2 == 1, 0.5,
                                            'tiff', 4 * CROP, 4 * CROP, seed)
        image = synthetic.render_slide(spec)
        tiles[f'synthetic-{seed}'] = image[CROP:2 * CROP, CROP:2 * CROP]
    return tiles


TILES = load_tiles()
SOURCE = 'source.png'


def batch(image, count=1):
    return np.repeat(image[None], count, axis=0)


def unclamped_reference(image, alpha, beta):
    """float64 rgb in [0, 1]: skimage's rgb2hed without its clamp of the stains at >= 0, the
    affine jitter, then skimage's own hed2rgb."""
    rgb = np.maximum(image / 255.0, 1e-6)
    stains = (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb
    return hed2rgb(stains * np.asarray(alpha) + np.asarray(beta))


def float_and_uint8(image, alpha, beta):
    alpha, beta = np.asarray(alpha)[None], np.asarray(beta)[None]
    rgb = np.asarray(jax.jit(hed.jitter_rgb)(batch(image) / 255.0, alpha, beta))[0]
    images = np.asarray(jax.jit(hed.hed_jitter)(batch(image), alpha, beta))[0]
    return rgb, images


def test_matrices_are_scikit_images():
    np.testing.assert_allclose(hed.RGB_FROM_HED, rgb_from_hed, rtol=0, atol=0)
    np.testing.assert_allclose(hed.HED_FROM_RGB, hed_from_rgb, rtol=0, atol=1e-12)


@pytest.mark.parametrize('alpha, beta', JITTERS)
@pytest.mark.parametrize('name', sorted(TILES))
def test_matches_scikit_image(name, alpha, beta):
    """rgb2hed -> stains * alpha + beta -> hed2rgb: exactly skimage's where its stain clamp is
    inactive (every stain > 0), and skimage's matrices and hed2rgb without that clamp everywhere."""
    image = TILES[name]
    rgb, images = float_and_uint8(image, alpha, beta)
    assert rgb.dtype == np.float32 and images.dtype == np.uint8
    unclamped = np.all(rgb2hed(image) > 0, axis=-1)
    skimage_rgb = hed2rgb(rgb2hed(image) * np.asarray(alpha) + np.asarray(beta))
    reference = unclamped_reference(image, alpha, beta)
    np.testing.assert_allclose(rgb[unclamped], skimage_rgb[unclamped], rtol=0, atol=FLOAT_ATOL)
    np.testing.assert_allclose(rgb, reference, rtol=0, atol=FLOAT_ATOL)
    expected = np.round(reference * 255).astype(np.uint8)
    assert np.all(np.abs(images.astype(int) - expected) <= 1)
    assert np.all(images == expected, axis=-1).mean() >= 0.999
    if alpha != (1.0, 1.0, 1.0):
        assert np.abs(images.astype(int) - image).max() >= 4  # the jitter is visible


@pytest.mark.parametrize('name', sorted(TILES))
def test_no_jitter_is_the_identity(name):
    """alpha 1, beta 0 returns every pixel (float error <= 1e-6, uint8 exact), also where
    skimage's rgb2hed -> hed2rgb loses colour by its clamp of negative stains."""
    image = TILES[name]
    rgb, images = float_and_uint8(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))
    np.testing.assert_allclose(rgb, np.maximum(image / 255.0, 1e-6), rtol=0, atol=IDENTITY_ATOL)
    np.testing.assert_array_equal(images, image)
    if name == SOURCE:  # the reason for the difference: skimage's round trip is lossy here
        round_trip = np.round(hed2rgb(rgb2hed(image)) * 255).astype(np.uint8)
        assert np.any(round_trip != image, axis=-1).mean() > 0.5


def test_draws_are_uniform_in_their_bounds():
    alpha, beta = map(np.asarray, hed.draw_jitter(jax.random.key(0), 4096, 0.2))
    assert alpha.shape == beta.shape == (4096, 3)
    assert alpha.dtype == beta.dtype == np.float32
    assert 0.8 <= alpha.min() < 0.801 and 1.199 < alpha.max() <= 1.2
    shift = 0.2 * hed.OD_SHIFT  # sigma in log10 optical density, in skimage's stain units
    assert -shift <= beta.min() < -0.995 * shift and 0.995 * shift < beta.max() <= shift
    assert abs(alpha.mean() - 1) < 0.005 and abs(beta.mean()) < 0.005 * shift / 0.2
    assert abs(np.corrcoef(alpha.ravel(), beta.ravel())[0, 1]) < 0.05


def stains_of(images):
    """Unclamped HED stains (float64) of uint8 images [..., 3]."""
    rgb = np.maximum(images / 255.0, 1e-6)
    return (np.log(rgb) / np.log(1e-6)) @ hed_from_rgb


def recovered_jitter(image, augmented):
    """Per sample and stain channel, (alpha, beta) [B, 3] by least squares of the augmented
    stains on the original's, over the pixels with every channel in [16, 250] before and after
    (away from the clipping at 0 and 255, and from the darkest levels, whose quantization error
    in optical density is largest)."""
    def usable(pixels):
        return np.all((pixels >= 16) & (pixels <= 250), axis=-1)
    source, usable_source = stains_of(image).reshape(-1, 3), usable(image.reshape(-1, 3))
    alphas, betas = [], []
    for out in augmented:
        out = out.reshape(-1, 3)
        kept = usable(out) & usable_source
        assert kept.sum() >= 500, kept.sum()
        target = stains_of(out[kept])
        fits = [np.polyfit(source[kept, c], target[:, c], 1) for c in range(3)]
        alphas.append([f[0] for f in fits])
        betas.append([f[1] for f in fits])
    return np.array(alphas), np.array(betas)


# The least squares' errors from uint8 quantization, measured at sigma 0.05: up to 0.0063 in alpha
# and 1.3e-4 in beta on the real tiles (DAB varies little in H&E), 0.0012 and 4e-5 on a
# random-colour patch. (At sigma 0.2 nearly every pixel of a real tile clips at 255 in some
# channel for some draws, so there is nothing left to fit; `test_draws_are_uniform_in_their_bounds`
# covers that strength.)
@pytest.mark.parametrize('source, alpha_tol, beta_tol', [
    ('tile', 0.015, 5e-4), ('random colours', 0.005, 2e-4)])
def test_random_jitter_recovered_by_least_squares(source, alpha_tol, beta_tol):
    """One image 32 times in a batch: each copy gets its own draw, within U(1 -+ sigma) and
    U(-+ sigma) OD and spreading over them; the same key gives the same images, sigma 0 the
    input."""
    sigma = 0.05
    if source == 'tile':
        image = TILES[sorted(TILES)[0]]
    else:
        image = np.random.default_rng(0).integers(20, 236, (CROP, CROP, 3), dtype=np.uint8)
    images = batch(image, 32)
    jitter = jax.jit(hed.random_hed_jitter, static_argnums=2)
    out = np.asarray(jitter(jax.random.key(3), images, sigma))
    assert out.dtype == np.uint8 and out.shape == images.shape
    assert len({o.tobytes() for o in out}) == 32  # every copy differs from every other
    alpha, beta = recovered_jitter(image, out)
    assert np.all((1 - sigma - alpha_tol <= alpha) & (alpha <= 1 + sigma + alpha_tol)), alpha
    shift = sigma * hed.OD_SHIFT
    assert np.all((-shift - beta_tol <= beta) & (beta <= shift + beta_tol)), beta
    for values, centre, half in ((alpha, 1.0, sigma), (beta, 0.0, shift)):  # not narrower
        assert values.min() < centre - half / 2 and values.max() > centre + half / 2
    drawn_alpha, drawn_beta = map(np.asarray, hed.draw_jitter(jax.random.key(3), 32, sigma))
    np.testing.assert_allclose(alpha, drawn_alpha, atol=alpha_tol)
    np.testing.assert_allclose(beta, drawn_beta, atol=beta_tol)
    np.testing.assert_array_equal(np.asarray(jitter(jax.random.key(3), images, sigma)), out)
    assert not np.array_equal(np.asarray(jitter(jax.random.key(4), images, sigma)), out)
    np.testing.assert_array_equal(np.asarray(jitter(jax.random.key(3), images, 0.0)), images)
