"""Macenko stain normalization (Macenko et al., ISBI 2009) as torchstain's numpy backend fits it.

Optical density OD = -log((I + 1) / Io) per channel (Io = 240). The pixels with OD >= beta = 0.15
in every channel are "stained"; v1, v2, the eigenvectors of the largest and second largest
eigenvalues of their OD covariance (ddof 1), span the stain plane. The angles phi = atan2(OD.v1,
OD.v2) (measured from v2, as torchstain does: H&E OD lies on one side of the v2 axis, so they
do not wrap and the eigenvectors' signs do not matter) at percentiles alpha = 1 and 100 - alpha
give two unit stain vectors; hematoxylin is the one with the larger red OD, eosin the other:
HE = [h, e], [3, 2]. Stain
concentrations C = pinv(HE) OD (least squares) over all pixels; maxC = their 99th percentiles.

Normalizing a slide onto a reference replaces HE by HE_ref and rescales C by maxC_ref / maxC, so
in OD space the per-pixel map is one 3x3 matrix, M = HE_ref diag(maxC_ref / maxC) pinv(HE), and
out = Io exp(-M OD), clipped to [0, 255] and rounded (torchstain truncates). As in torchstain, the
+1 of the OD is not taken back: M = identity gives I + 1. For a slide fitted onto itself, M is the
orthogonal projection onto its stain plane, which drops the OD outside the plane.
"""

import cv2
import numpy as np

from pathjax.slides.stain import opencv_pixels

IO = 240.0  # transmitted light intensity
ALPHA = 1.0  # percentile of the stain angles taken as each stain's direction
BETA = 0.15  # OD below which a channel counts as unstained
MIN_STAINED = 100  # stained pixels needed to fit the stain vectors
OD_TABLE = -np.log((np.arange(256) + 1.0) / IO)  # OD of each uint8 value, float64 [256]
OD_TABLE_32 = OD_TABLE.astype(np.float32)


def slide_statistics(pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Stain vectors and maximal concentrations of one slide's tissue pixels (or a template's).

    pixels: uint8 [N, 3] RGB -> {'stain_vectors': float64 [3, 2] (H, E columns, unit length),
    'max_concentrations': float64 [2]}. Too few stained pixels, or pixels whose OD does not span
    two stains, is a ValueError."""
    pixels = np.asarray(pixels)
    if pixels.dtype != np.uint8 or pixels.ndim != 2 or pixels.shape[1] != 3 or not len(pixels):
        raise ValueError(f'Macenko statistics need uint8 [N, 3] RGB pixels, N > 0, got '
                         f'{pixels.dtype} {list(pixels.shape)}')
    od = OD_TABLE[pixels]
    stained = od[(od >= BETA).all(axis=1)]
    if len(stained) < MIN_STAINED:
        raise ValueError(f'too few stained pixels to fit Macenko stain vectors: {len(stained)} of '
                         f'{len(pixels)} have optical density >= {BETA} in every channel, '
                         f'{MIN_STAINED} are needed')
    eigenvalues, eigenvectors = np.linalg.eigh(np.cov(stained.T))
    if not eigenvalues[1] > 1e-9 * eigenvalues[2]:
        raise ValueError('degenerate stained pixels: their optical densities do not span a plane, '
                         'so two stains cannot be told apart')
    plane = eigenvectors[:, 1:3]  # [v2, v1]
    projected = stained @ plane
    phi = np.arctan2(projected[:, 1], projected[:, 0])
    v_min, v_max = (plane @ np.array([np.cos(angle), np.sin(angle)])
                    for angle in np.percentile(phi, [ALPHA, 100 - ALPHA]))
    vectors = np.stack([v_min, v_max] if v_min[0] > v_max[0] else [v_max, v_min], axis=1)
    inverse = checked_inverse(vectors, 'the fitted stain vectors')
    concentrations = inverse @ od.T
    max_concentrations = np.percentile(concentrations, 99, axis=1)
    if not (max_concentrations > 0).all():
        raise ValueError(f'degenerate stain concentrations: 99th percentiles {max_concentrations} '
                         'are not positive (are nearly all the pixels background?)')
    return {'stain_vectors': vectors, 'max_concentrations': max_concentrations}


def checked_inverse(vectors: np.ndarray, what: str) -> np.ndarray:
    """pinv of stain vectors [3, 2] -> [2, 3]; ValueError when the two are (nearly) parallel."""
    singular = np.linalg.svd(vectors, compute_uv=False)
    if not singular[1] > 1e-6 * singular[0]:
        raise ValueError(f'{what} are (nearly) parallel: the two stains cannot be told apart')
    return np.linalg.pinv(vectors)


def checked_statistics(statistics, what: str = 'Macenko statistics') -> dict[str, np.ndarray]:
    """`statistics` as float64 arrays, or a ValueError saying what is wrong (they may come from a
    damaged file)."""
    try:
        vectors = np.asarray(statistics['stain_vectors'])
        max_concentrations = np.asarray(statistics['max_concentrations'])
    except (KeyError, TypeError, IndexError):
        raise ValueError(f'{what} need stain_vectors and max_concentrations') from None
    for name, array, shape in (('stain_vectors', vectors, (3, 2)),
                               ('max_concentrations', max_concentrations, (2,))):
        if array.shape != shape or array.dtype.kind != 'f' or not np.isfinite(array).all():
            raise ValueError(f'{what}: {name} must be finite floats {list(shape)}, got '
                             f'{array.dtype} {list(array.shape)}')
    if not (max_concentrations > 0).all():
        raise ValueError(f'{what}: max_concentrations must be positive, got {max_concentrations}')
    if not (np.linalg.norm(vectors, axis=0) > 0).all():
        raise ValueError(f'{what}: a stain vector is zero')
    return {'stain_vectors': vectors.astype(np.float64),
            'max_concentrations': max_concentrations.astype(np.float64)}


def reference(statistics: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """A cohort reference, every slide weighing the same: the mean stain vectors (each column
    renormalized to unit length) and the mean maximal concentrations."""
    if not statistics:
        raise ValueError('no slide statistics to build a Macenko stain reference from')
    checked = [checked_statistics(s) for s in statistics]
    vectors = np.mean([s['stain_vectors'] for s in checked], axis=0)
    norms = np.linalg.norm(vectors, axis=0)
    if not (norms > 1e-6).all():
        raise ValueError('the slides\' stain vectors cancel out: no mean stain direction')
    return {'stain_vectors': vectors / norms,
            'max_concentrations': np.mean([s['max_concentrations'] for s in checked], axis=0)}


def fit(slide: dict[str, np.ndarray], reference: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The slide's OD map onto the reference: {'stain_od_matrix': float32 [3, 3] M},
    M = HE_ref diag(maxC_ref / maxC_slide) pinv(HE_slide)."""
    slide = checked_statistics(slide, 'Macenko slide statistics')
    reference = checked_statistics(reference, 'Macenko reference statistics')
    scale = reference['max_concentrations'] / slide['max_concentrations']
    inverse = checked_inverse(slide['stain_vectors'], 'the slide\'s stain vectors')
    matrix = reference['stain_vectors'] @ (scale[:, None] * inverse)
    return {'stain_od_matrix': matrix.astype(np.float32)}


def apply(images: np.ndarray, transform: dict[str, np.ndarray]) -> np.ndarray:
    """uint8 [..., 3] -> uint8 [..., 3]: out = Io exp(-M OD) per pixel, clipped and rounded.

    OD comes from a 256-entry table and exp(log(Io) - M OD) is one OpenCV affine transform and one
    exp, all float32. `transform` may come from an npz file: M must be finite floats [3, 3]."""
    try:
        matrix = np.asarray(transform['stain_od_matrix'])
    except (KeyError, TypeError, IndexError):
        raise ValueError('a Macenko transform needs stain_od_matrix') from None
    if matrix.shape != (3, 3) or matrix.dtype.kind != 'f' or not np.isfinite(matrix).all():
        raise ValueError(f'stain_od_matrix must be finite floats [3, 3], got {matrix.dtype} '
                         f'{list(matrix.shape)}')
    pixels = opencv_pixels(images, 'Macenko')
    if not pixels.size:
        return pixels.reshape(np.shape(images)).copy()
    affine = np.concatenate([-matrix, np.full((3, 1), np.log(IO))], axis=1).astype(np.float32)
    log_out = cv2.transform(cv2.LUT(pixels, OD_TABLE_32), affine)
    return cv2.convertScaleAbs(cv2.exp(log_out, dst=log_out)).reshape(np.shape(images))
