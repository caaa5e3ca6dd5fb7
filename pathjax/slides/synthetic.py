"""Synthetic H&E whole-slide images with a known slide-level signal, for demos and tests.

A slide is rendered at level 0 from two stain density maps, hematoxylin (H) and eosin (E), coloured
by Beer-Lambert: intensity = white * 10^-(H * h_vec + E * e_vec), each slide drawing its own stain
vectors, intensities and white level. Tissue is one to three irregular blobs of fibrous pink
stroma with scattered nuclei and, in places, normal glands (small round basal nuclei, goblets).
Positive slides also carry a motif on 15-25% of their tissue (`motif_fraction`; less is harder):
small glands (36-56 um across) lined by crowded, stratified, elongated dark nuclei 7-10 um long
(normal ones: 5-7 um, basal) around a pale lumen. Every other part is drawn from random streams
that do not depend on the class, so a positive slide equals the negative slide of the same seed
outside its motif area, and patch labels inherited from the slide are noisy, as in mutation
prediction.

Artifacts (`SyntheticSlideSpec.artifacts`, any of ARTIFACTS) are drawn on the rendered slide,
each from a seed stream of its own and with a known level-0 mask (`render_slide(spec,
return_masks=True)`, or `artifact_masks` without rendering): 'fold', 1-2 flaps of tissue folded
over a crease, where the optical densities of the two layers add; 'pen', 1-3 blue, green or
black marker strokes, a translucent dye over tissue and glass; 'blur', 1-2 out-of-focus regions
blurred with sigma 3-6 um.
A cohort with staining sites (`cohort_specs(sites=...)`) gives each site one stain, drawn from
wider ranges than a slide's own, and each case a site that follows its label with a set chance, in
train/val and in test, as submitting sites do in TCGA. With neither, a slide renders exactly as it
did before these existed: the new draws come from new seed streams only.

Sizes are in microns, converted with the slide's mpp. Slides are written as JPEG-tiled pyramids
OpenSlide opens: a generic tiled TIFF or an Aperio-style SVS. Real-size slides (`MosaicSlide`:
level 0 of 100,000 px and more) are laid out from a few rendered texture blocks inside a coarse
tissue mask and written band by band (`write_streamed_slide`), never held whole.
"""

import concurrent.futures
import csv
import dataclasses
import io
import math
import multiprocessing
import pathlib
import tempfile
from typing import Any, Callable, Iterator

import cv2
import numpy as np
import tifffile
from absl import logging
from PIL import Image, ImageDraw, ImageFilter

from pathjax import artifacts as artifacts_lib
from pathjax import cohort as cohort_lib
from pathjax.progress import Progress

FORMATS = ('tiff', 'svs')
ARTIFACTS = ('pen', 'blur', 'fold')
MPPS = (0.25, 0.5)
MOTIF_FRACTION = (0.15, 0.25)  # a positive slide's motif covers a uniform share of its tissue
MANIFEST_COLUMNS = ('slide_id', 'path', 'label', 'case_id')
SITE_COLUMNS = ('site', 'split')  # added to the manifest of a cohort with staining sites
SITE_FOLLOWS_LABEL = (0.8, 0.5)  # chance a case is at its label's site (train/val, test)
SPLIT_FRACTIONS = (0.7, 0.15, 0.15)  # with sites: the generator's split (train, val, test)

_GRID_UM = 8.0  # microns per cell of the coarse grid holding region masks and slow fields
# Optical density per unit of stain (R, G, B): the usual H&E reference vectors.
_H_OD = (0.5626, 0.7201, 0.4062)
_E_OD = (0.2159, 0.8012, 0.5581)
# Stroma nuclei: kind -> (share, semi-major um, semi-minor um, hematoxylin density); index 0 lies
# along the collagen fibres.
_STROMA_NUCLEI = {
    'fibroblast': (0.4, (4.0, 6.5), (1.1, 1.6), (0.55, 0.85)),
    'lymphocyte': (0.25, (2.4, 3.2), (2.1, 2.9), (0.85, 1.15)),
    'oval': (0.35, (3.0, 4.2), (2.2, 3.0), (0.45, 0.7)),
}


@dataclasses.dataclass(frozen=True)
class SyntheticSlideSpec:
    """One slide to render; `positive` slides carry the class motif."""

    slide_id: str
    case_id: str
    label: str
    positive: bool
    mpp: float  # level-0 microns per pixel
    fmt: str  # 'tiff' or 'svs'
    width: int  # level-0 pixels
    height: int
    seed: int
    motif_fraction: tuple[float, float] = MOTIF_FRACTION  # (low, high) share of the tissue
    artifacts: tuple[str, ...] = ()  # drawn with known masks, any of ARTIFACTS
    site: int = -1  # staining site (>= 0), or -1: a stain of the slide's own
    site_stain: tuple[float, ...] = ()  # with a site: its stain (`site_stains`), 9 numbers
    split: str = ''  # 'train', 'val' or 'test' where the generator split the cohort (sites)


@dataclasses.dataclass(frozen=True)
class _GlandStyle:
    """A kind of gland; lengths in microns."""

    radius: tuple[float, float]  # outer radius
    lumen: tuple[float, float]  # lumen radius / outer radius
    wobble: float  # outline irregularity (amplitude of harmonics 2-4)
    nucleus_len: tuple[float, float]  # semi-major axis, radial
    nucleus_wid: tuple[float, float]  # semi-minor axis
    density: tuple[float, float]  # hematoxylin density of the nuclei
    spacing: float  # nucleus spacing along the ring, in mean nucleus widths
    ring: tuple[float, float]  # nucleus position across the epithelium (0 lumen, 1 outer edge)
    packing: float  # centre spacing, in mean outer diameters
    goblets: bool  # pale mucin vacuoles between the nuclei


_NORMAL_GLAND = _GlandStyle(
    radius=(20, 30), lumen=(0.2, 0.35), wobble=0.05, nucleus_len=(2.6, 3.4),
    nucleus_wid=(1.6, 2.1), density=(0.5, 0.75), spacing=1.7, ring=(0.78, 0.88), packing=1.5,
    goblets=True)
_MOTIF_GLAND = _GlandStyle(
    radius=(18, 28), lumen=(0.3, 0.5), wobble=0.12, nucleus_len=(3.5, 5.0),
    nucleus_wid=(1.4, 1.9), density=(0.85, 1.2), spacing=0.85, ring=(0.3, 0.7), packing=1.0,
    goblets=False)


# Fields ------------------------------------------------------------------------------------------


def _noise(rng, shape, cell) -> np.ndarray:
    """Smooth noise [h, w], zero mean, unit variance, correlation length `cell` px (or (cy, cx))."""
    h, w = shape
    cy, cx = (cell, cell) if np.isscalar(cell) else cell
    cy, cx = max(cy, 1.0), max(cx, 1.0)
    coarse = rng.standard_normal((int(h / cy) + 3, int(w / cx) + 3), dtype=np.float32)
    size = (math.ceil(coarse.shape[1] * cx), math.ceil(coarse.shape[0] * cy))
    out = np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))[:h, :w]
    sample = out[::5, ::5]
    return (out - sample.mean()) / (sample.std() + 1e-6)


def _upsample(grid, shape) -> np.ndarray:
    """Bilinear resize of a float grid [gh, gw] to float32 [h, w]."""
    image = Image.fromarray(grid.astype(np.float32))
    return np.asarray(image.resize((shape[1], shape[0]), Image.Resampling.BILINEAR))


def _blend(a, value, weight) -> None:
    """a <- a + (value - a) * weight, in place; a, weight [h, w]."""
    step = np.subtract(value, a)
    step *= weight
    a += step


def _soften(image, radius, scale) -> np.ndarray:
    """A PIL 'L' image box-blurred (radius px) -> float32 [h, w], value 255 -> `scale`."""
    lut = np.arange(256, dtype=np.float32) * (scale / 255)
    return lut[np.asarray(image.filter(ImageFilter.BoxBlur(radius)))]


def _top_fraction(field, within, fraction) -> np.ndarray:
    """Bool mask [gh, gw] of the `fraction` of cells of `within` where `field` is highest."""
    if fraction <= 0 or not within.any():
        return np.zeros_like(within)
    return within & (field > np.quantile(field[within], 1.0 - fraction))


def _tissue_field(rng, gh, gw) -> np.ndarray:
    """1-3 irregular blobs along the long side [gh, gw]: high inside, falling outward."""
    transpose = gh > gw
    long_side, short_side = (gh, gw) if transpose else (gw, gh)
    k = int(rng.integers(1, 4))
    u = np.arange(long_side, dtype=np.float32)[None, :]
    v = np.arange(short_side, dtype=np.float32)[:, None]
    field = np.full((short_side, long_side), -np.inf, np.float32)
    for i in range(k):
        du = u - (i + 0.5 + rng.uniform(-0.1, 0.1)) * long_side / k
        dv = v - short_side * (0.5 + rng.uniform(-0.12, 0.12))
        ru = 0.5 * long_side / k * rng.uniform(0.7, 0.95)
        rv = 0.5 * short_side * rng.uniform(0.55, 0.85)
        angle = rng.uniform(-0.4, 0.4)
        c, s = math.cos(angle), math.sin(angle)
        field = np.maximum(field, 1.0 - np.hypot((du * c + dv * s) / ru, (dv * c - du * s) / rv))
    field += 0.25 * _noise(rng, field.shape, long_side / 5)
    field += 0.08 * _noise(rng, field.shape, long_side / 20)
    return field.T if transpose else field


def _fibres(rng, warp, px, theta) -> np.ndarray:
    """Collagen relief [h, w], mean ~0: wavy bundles ~2 um wide split by pale clefts.

    The bundles cross direction theta; warp [h, w] (px, along theta) bends them.
    """
    h, w = warp.shape
    u = np.arange(w, dtype=np.float32)[None, :] * math.cos(theta) + warp
    u += np.arange(h, dtype=np.float32)[:, None] * math.sin(theta)
    u -= u.min()
    profile = _noise(rng, (1, int(u.max()) + 2), 2 * px)[0]
    relief = 0.2 * profile - 0.55 / (1 + np.exp(np.minimum(4 * (profile + 1.4), 30)))
    return relief[u.astype(np.int32)]


# Shapes ------------------------------------------------------------------------------------------


def _ellipse_polygons(rng, nuclei, sides=12) -> np.ndarray:
    """Slightly irregular outlines [N, sides, 2] of ellipses [N, 6] (x, y, a, b, angle, density)."""
    x, y, a, b, angle = (nuclei[:, i, None] for i in range(5))
    t = np.linspace(0, 2 * np.pi, sides, endpoint=False)[None]
    wobble = 1 + 0.08 * rng.standard_normal((len(nuclei), sides))
    ex, ey = a * np.cos(t) * wobble, b * np.sin(t) * wobble
    return np.stack([x + ex * np.cos(angle) - ey * np.sin(angle),
                     y + ex * np.sin(angle) + ey * np.cos(angle)], -1)


def _draw(image, polygons, fill) -> None:
    """Fills polygons [N, K, 2] on a PIL 'L' image with fill: scalar or [N] values in 0-255."""
    draw = ImageDraw.Draw(image)
    fills = np.broadcast_to(np.asarray(fill, int), len(polygons)).tolist()
    for polygon, value in zip(polygons, fills):
        draw.polygon(polygon.ravel().tolist(), fill=value)


@dataclasses.dataclass(frozen=True)
class _Glands:
    """Glands of one style, in level-0 px, with their ring nuclei and goblets."""

    centres: np.ndarray  # [G, 2] (x, y)
    outer: np.ndarray  # [G, 32, 2] outlines
    lumen: np.ndarray  # [G, 32, 2]
    nuclei: np.ndarray  # [N, 6] ellipses (x, y, a, b, angle, density)
    nuclei_outline: np.ndarray  # [N, 12, 2]
    nuclei_gland: np.ndarray  # [N] index of the gland
    goblets_outline: np.ndarray  # [M, 12, 2] mucin vacuoles
    goblets_gland: np.ndarray  # [M]

    def select(self, keep) -> '_Glands':
        """The glands where keep [G] is true, with their nuclei and goblets."""
        nuclei, goblets = keep[self.nuclei_gland], keep[self.goblets_gland]
        return _Glands(self.centres[keep], self.outer[keep], self.lumen[keep], self.nuclei[nuclei],
                       self.nuclei_outline[nuclei], self.nuclei_gland[nuclei],
                       self.goblets_outline[goblets], self.goblets_gland[goblets])


def _glands(rng, style, shape, px) -> _Glands:
    """Candidate glands of `style` on a jittered hex grid over a whole [h, w] slide."""
    h, w = shape
    step = style.packing * sum(style.radius) * px
    rows = np.arange(step / 2, h + step, step * 0.866)
    centres = np.concatenate([np.stack(np.broadcast_arrays(
        np.arange(step / 2 * (1 + r % 2), w + step, step), y), -1) for r, y in enumerate(rows)])
    g = len(centres)
    centres = centres + rng.uniform(-0.15, 0.15, (g, 2)) * step
    outer_r = rng.uniform(*style.radius, g) * px
    lumen_r = outer_r * rng.uniform(*style.lumen, g)
    harmonics = np.array([2, 3, 4])[:, None]  # [3, 1]
    amplitude = rng.uniform(0, style.wobble, (g, 3, 1))
    phase = rng.uniform(0, 2 * np.pi, (g, 3, 1))

    def outline(i, angles):  # radius factor of gland i at angles [n]
        return 1 + (amplitude[i] * np.cos(harmonics * angles + phase[i])).sum(0)

    t = np.linspace(0, 2 * np.pi, 32, endpoint=False)
    unit = np.stack([np.cos(t), np.sin(t)], -1)  # [32, 2]
    shapes = np.stack([outline(i, t) for i in range(g)])[..., None] * unit  # [G, 32, 2]
    outer = centres[:, None] + outer_r[:, None, None] * shapes
    lumen = centres[:, None] + lumen_r[:, None, None] * shapes

    nuclei, goblets = [np.zeros((0, 6))], [np.zeros((0, 6))]
    nuclei_gland, goblets_gland = [np.zeros(0, int)], [np.zeros(0, int)]
    spacing = style.spacing * sum(style.nucleus_wid) * px  # sum = mean width (2 * semi-minor)
    for i in range(g):
        n = max(int(np.pi * (outer_r[i] + lumen_r[i]) / spacing), 6)
        angle = np.linspace(0, 2 * np.pi, n, endpoint=False) + rng.uniform(0, 2 * np.pi)
        angle += rng.uniform(-0.3, 0.3, n) * 2 * np.pi / n
        depth = lumen_r[i] + rng.uniform(*style.ring, n) * (outer_r[i] - lumen_r[i])
        radius = depth * outline(i, angle)
        nuclei.append(np.stack([
            centres[i, 0] + radius * np.cos(angle), centres[i, 1] + radius * np.sin(angle),
            rng.uniform(*style.nucleus_len, n) * px, rng.uniform(*style.nucleus_wid, n) * px,
            angle + rng.normal(0, 0.15, n), rng.uniform(*style.density, n)], -1))
        nuclei_gland.append(np.full(n, i))
        if style.goblets:
            between = angle[::2] + np.pi / n
            radius = (lumen_r[i] + 0.35 * (outer_r[i] - lumen_r[i])) * outline(i, between)
            size = rng.uniform(2.5, 3.5, len(between)) * px
            goblets.append(np.stack([
                centres[i, 0] + radius * np.cos(between), centres[i, 1] + radius * np.sin(between),
                size, size, between, np.zeros_like(between)], -1))
            goblets_gland.append(np.full(len(between), i))
    nuclei, goblets = np.concatenate(nuclei), np.concatenate(goblets)
    return _Glands(centres, outer, lumen, nuclei, _ellipse_polygons(rng, nuclei),
                   np.concatenate(nuclei_gland), _ellipse_polygons(rng, goblets),
                   np.concatenate(goblets_gland))


def _stroma_nuclei(rng, shape, px, fibre_angle) -> np.ndarray:
    """Candidate stroma nuclei [N, 6] (x, y, a, b, angle, density) over a whole [h, w] slide."""
    h, w = shape
    area = rng.uniform(180, 300) * px * px  # tissue px per nucleus
    n = int(h * w / area / 0.55)  # about 55% pass the cellularity test
    kinds = list(_STROMA_NUCLEI.values())
    kind = rng.choice(len(kinds), n, p=[k[0] for k in kinds])
    out = np.zeros((n, 6))
    out[:, 0] = rng.uniform(0, w, n)
    out[:, 1] = rng.uniform(0, h, n)
    out[:, 4] = rng.uniform(0, np.pi, n)
    for i, (_, a, b, density) in enumerate(kinds):
        sel = kind == i
        out[sel, 2] = rng.uniform(*a, sel.sum()) * px
        out[sel, 3] = np.minimum(rng.uniform(*b, sel.sum()) * px, out[sel, 2])
        out[sel, 5] = rng.uniform(*density, sel.sum())
    along = kind == 0
    out[along, 4] = fibre_angle + rng.normal(0, 0.25, along.sum())
    return out


# Render ------------------------------------------------------------------------------------------


def _stain(rng) -> tuple[np.ndarray, np.ndarray]:
    """Per-slide stain: OD vectors [2, 3] (H, E) times intensity, and white level [3]."""
    vectors = np.array([_H_OD, _E_OD]) + rng.normal(0, 0.04, (2, 3))
    vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors *= rng.uniform([0.8, 0.75], [1.2, 1.3])[:, None]
    white = 241 + rng.uniform(-4, 4) + rng.uniform(-2, 2, 3)
    return vectors.astype(np.float32), white.astype(np.float32)


# Staining sites: each site draws its stain once from wider ranges than a slide's own (the
# differences between the submitting sites of TCGA), and its slides jitter a little around it.
_SITE_TAG = 0x517E  # in the seed entropy of a cohort's site streams: [seed, _SITE_TAG, kind, k]
_SITE_MIN_DISTANCE = 24.0  # RGB levels between two sites' colours of some reference tissue
_REFERENCE_TISSUE = ((0.9, 0.1), (0.07, 0.34), (0.2, 0.28))  # (H, E): nucleus, stroma, epithelium
_JITTER_STREAM = 8  # the slide's seed stream for the jitter around its site's stain


def _site_stain(rng) -> np.ndarray:
    """A site's stain: float [9], OD vectors (H, E) times intensity, then the white level."""
    vectors = np.array([_H_OD, _E_OD]) + rng.normal(0, 0.08, (2, 3))
    vectors = np.abs(vectors) / np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors *= rng.uniform([0.7, 0.65], [1.35, 1.4])[:, None]
    white = np.minimum(rng.uniform(232, 249) + rng.uniform(-5, 5, 3), 252)
    return np.concatenate([vectors.ravel(), white])


def stain_colours(vectors, white) -> np.ndarray:
    """RGB float [3, 3] of reference tissue (a nucleus, stroma, epithelium) under a stain (OD
    vectors [2, 3] times intensity, white [3]): how different two stains look."""
    od = np.asarray(_REFERENCE_TISSUE) @ np.asarray(vectors, np.float64).reshape(2, 3)
    return np.asarray(white, np.float64) * 10.0 ** -od


def site_stains(seed: int, sites: int) -> np.ndarray:
    """The stains of a cohort's staining sites: float [sites, 9] (H and E OD vectors times
    intensity, then the white level), from `seed` alone; site k's does not depend on how many
    sites there are. A site is redrawn (200 tries at most) until its reference colours
    (`stain_colours`) lie at least _SITE_MIN_DISTANCE RGB levels from every earlier site's."""
    stains, colours = [], []
    for k in range(sites):
        rng = np.random.default_rng(np.random.SeedSequence([seed, _SITE_TAG, 1, k + 1]))
        for _ in range(200):
            stain = _site_stain(rng)
            mine = stain_colours(stain[:6], stain[6:])
            if all(np.linalg.norm(mine - other, axis=1).max() >= _SITE_MIN_DISTANCE
                   for other in colours):
                break
        stains.append(stain)
        colours.append(mine)
    return np.array(stains).reshape(sites, 9)


def _seed_streams(spec: SyntheticSlideSpec) -> list[np.random.SeedSequence]:
    """The slide's 12 seed streams: stain, tissue, regions, texture, nuclei, normal glands, motif
    glands, pixel noise, site jitter, pen, blur, fold. Spawning is prefix-stable (the first 8 of
    spawn(12) are spawn(8)), so the first 8, all a slide without artifacts or site uses, are the
    streams slides were rendered from before there were more."""
    return np.random.SeedSequence(spec.seed).spawn(12)


def _slide_stain(spec: SyntheticSlideSpec, streams) -> tuple[np.ndarray, np.ndarray]:
    if spec.site < 0:
        return _stain(np.random.default_rng(streams[0]))
    if len(spec.site_stain) != 9:
        raise ValueError(f'slide {spec.slide_id} at site {spec.site} needs the site\'s stain (9 '
                         f'numbers, `site_stains`), got {spec.site_stain}')
    rng = np.random.default_rng(streams[_JITTER_STREAM])
    site = np.asarray(spec.site_stain, np.float64)
    intensity = np.linalg.norm(site[:6].reshape(2, 3), axis=1, keepdims=True)
    direction = site[:6].reshape(2, 3) / intensity + rng.normal(0, 0.01, (2, 3))
    direction = np.abs(direction) / np.linalg.norm(direction, axis=1, keepdims=True)
    vectors = direction * intensity * rng.uniform(0.95, 1.05, (2, 1))
    white = site[6:] + rng.uniform(-1.5, 1.5, 3)
    return vectors.astype(np.float32), white.astype(np.float32)


def slide_stain(spec: SyntheticSlideSpec) -> tuple[np.ndarray, np.ndarray]:
    """The stain `render_slide` gives `spec`: OD vectors float32 [2, 3] (H, E) times intensity,
    and the white level [3]. Without a site the slide's own (`_stain`); at a site its site's
    stain jittered a little (directions by ~0.01, intensities by up to 5%, white by 1.5 levels)."""
    return _slide_stain(spec, _seed_streams(spec))


def _check_artifacts(spec: SyntheticSlideSpec) -> None:
    unknown = [a for a in spec.artifacts if a not in ARTIFACTS]
    if unknown:
        raise ValueError(f'slide {spec.slide_id}: unknown artifact(s) {unknown}; choose from '
                         f'{ARTIFACTS}')


def render_slide(spec: SyntheticSlideSpec, return_masks: bool = False):
    """H&E-like level-0 RGB image of `spec`, with its artifacts drawn: uint8 [height, width, 3].

    With `return_masks`, returns (image, masks): masks maps 'tissue', 'motif' (the motif region,
    inside tissue; empty on negative slides) and each of `spec.artifacts` ('pen', 'blur', 'fold':
    the pixels the artifact marks, see `artifact_masks`) to a bool [height, width] mask.
    """
    _check_artifacts(spec)
    # Independent streams, so that the class changes nothing but the motif, and an artifact
    # changes nothing outside its mask.
    streams = _seed_streams(spec)
    stain = _slide_stain(spec, streams)
    image, tissue, motif, tissue_g = _render(spec, streams[:8], stain, fill=False)
    masks = {'tissue': tissue, 'motif': motif}
    if spec.artifacts:
        layout = _layout(spec, streams, tissue_g)
        masks.update(_draw_artifacts(image, layout, tissue, stain[1], 1.0 / spec.mpp))
    return (image, masks) if return_masks else image


def render_texture(spec: SyntheticSlideSpec, stain_seed: int) -> np.ndarray:
    """Tissue over the whole of `spec` (no background), stained as the slides of `stain_seed`:
    uint8 [height, width, 3]. The texture blocks of a mosaic slide share one stain. No artifacts
    or sites here."""
    if spec.artifacts or spec.site >= 0:
        raise ValueError(f'texture blocks (MosaicSlide) have neither artifacts nor staining '
                         f'sites: got artifacts {spec.artifacts}, site {spec.site}')
    streams = np.random.SeedSequence(spec.seed).spawn(8)
    stain = _stain(np.random.default_rng(np.random.SeedSequence(stain_seed).spawn(8)[0]))
    return _render(spec, streams, stain, fill=True)[0]


def _check_size(spec: SyntheticSlideSpec) -> None:
    if spec.width < 1 or spec.height < 1 or spec.mpp <= 0:
        raise ValueError(f'bad slide size or mpp: {spec}')


def _regions(spec: SyntheticSlideSpec, r_tissue, r_regions, fill: bool):
    """The slide's coarse grid (8-um cells), its tissue and motif regions on it, and their masks
    at level 0: (grid, tissue_g, motif_g, tissue, motif). Draws the tissue stream and the first
    draws of the regions stream."""
    _check_size(spec)
    shape, px = (spec.height, spec.width), 1.0 / spec.mpp  # px: pixels per micron
    grid = (math.ceil(shape[0] / px / _GRID_UM), math.ceil(shape[1] / px / _GRID_UM))
    if fill:
        tissue_g = np.ones(grid, bool)
    else:
        tissue_field = _tissue_field(r_tissue, *grid)
        tissue_g = _top_fraction(tissue_field, np.ones(grid, bool), r_tissue.uniform(0.34, 0.5))
    motif_field = _noise(r_regions, grid, 180 / _GRID_UM)
    motif_g = _top_fraction(motif_field, tissue_g,
                            r_regions.uniform(*spec.motif_fraction) * spec.positive)
    tissue = np.full(shape, fill)
    motif = np.zeros(shape, bool)
    if tissue_g.any() and not fill:
        tissue = _upsample(tissue_field, shape) >= tissue_field[tissue_g].min()
    if motif_g.any():
        motif = tissue & (_upsample(motif_field, shape) >= motif_field[motif_g].min())
    return grid, tissue_g, motif_g, tissue, motif


def _render(spec: SyntheticSlideSpec, streams, stain, fill: bool):
    """(image uint8 [h, w, 3], tissue, motif bool [h, w], tissue_g bool [gh, gw]) from the stain
    (OD vectors [2, 3], white [3]) and 8 seed sequences: stain (drawn by the caller), tissue,
    regions, texture, nuclei, normal glands, motif glands, pixel noise. `fill`: tissue
    everywhere."""
    _check_size(spec)
    shape, px = (spec.height, spec.width), 1.0 / spec.mpp  # px: pixels per micron
    r_tissue, r_regions, r_texture, r_nuclei, r_normal, r_motif, r_pixels = (
        np.random.default_rng(s) for s in streams[1:8])
    stain, white = stain[0].copy(), stain[1]

    # Regions and slow fields on a coarse grid.
    grid, tissue_g, motif_g, tissue, motif = _regions(spec, r_tissue, r_regions, fill)
    cell = lambda um: um / _GRID_UM  # noqa: E731  microns -> grid cells
    mucosa_g = _top_fraction(_noise(r_regions, grid, cell(200)), tissue_g,
                             r_regions.uniform(0.2, 0.4)) & ~motif_g
    pale = np.clip(0.8 + 0.35 * _noise(r_regions, grid, cell(120)), 0.25, 1.25)
    cellular = np.clip(0.55 + 0.3 * _noise(r_regions, grid, cell(80)), 0.1, 1.0)
    mix = np.clip(0.5 + 0.8 * _noise(r_regions, grid, cell(150)), 0, 1)
    warp = 25 * px * _noise(r_regions, grid, cell(120))

    def on_grid(region, xy):  # region [gh, gw] at points xy [N, 2] (level-0 px)
        rows = np.clip((xy[:, 1] * grid[0] / shape[0]).astype(int), 0, grid[0] - 1)
        cols = np.clip((xy[:, 0] * grid[1] / shape[1]).astype(int), 0, grid[1] - 1)
        return region[rows, cols]

    # Glands (normal ones in the mucosa region, motif ones in the motif region): epithelium
    # between the outer outline and the lumen; lumen and goblets pale.
    glands = []
    styles = ((r_normal, _NORMAL_GLAND, mucosa_g), (r_motif, _MOTIF_GLAND, motif_g))
    for rng, style, region in styles:
        candidates = _glands(rng, style, shape, px)
        glands.append(candidates.select(on_grid(region, candidates.centres)))
    epithelium = Image.new('L', shape[::-1], 0)
    lumen = Image.new('L', shape[::-1], 0)
    for g in glands:
        _draw(epithelium, g.outer, 255)
        _draw(epithelium, g.lumen, 0)
        _draw(lumen, g.lumen, 255)
        _draw(lumen, g.goblets_outline, 150)
    in_gland = (np.asarray(epithelium) > 0) | (np.asarray(lumen) > 0)

    # Nuclei: stroma nuclei where the tissue is cellular and outside glands, then gland rings.
    theta = r_texture.uniform(0, np.pi)  # fibres cross theta, so they run along theta + pi/2
    candidates = _stroma_nuclei(r_nuclei, shape, px, theta + np.pi / 2)
    polygons = _ellipse_polygons(r_nuclei, candidates)
    accept = r_nuclei.uniform(size=len(candidates)) < on_grid(cellular, candidates)
    x = np.clip(candidates[:, 0].astype(int), 0, shape[1] - 1)
    y = np.clip(candidates[:, 1].astype(int), 0, shape[0] - 1)
    stroma = accept & tissue[y, x] & ~in_gland[y, x]
    nuclei_image = Image.new('L', shape[::-1], 0)
    density = np.concatenate([candidates[stroma, 5]] + [g.nuclei[:, 5] for g in glands])
    _draw(nuclei_image, np.concatenate([polygons[stroma]] + [g.nuclei_outline for g in glands]),
          np.clip(np.round(100 * density), 1, 255))
    nuclei = _soften(nuclei_image, 0.6 * px, 2.55)  # hematoxylin density

    # Stain densities [h, w] (in-place arithmetic: these arrays are large).
    mix, warp = _upsample(mix, shape), _upsample(warp, shape)
    fibres = _fibres(r_texture, warp, px, theta)
    other = _fibres(r_texture, warp, px, theta + r_texture.uniform(1.0, 2.1))
    fibres -= other
    fibres *= mix
    fibres += other  # mix of the two fibre directions
    contrast = _noise(r_texture, shape, 10 * px)
    contrast *= 0.5
    contrast += 0.7
    fibres *= np.clip(contrast, 0, 1, out=contrast)
    fibres += 1
    grain = _noise(r_texture, shape, 0.8 * px)
    epithelium, lumen = _soften(epithelium, 1.2 * px, 1.0), _soften(lumen, 1.2 * px, 1.0)
    eosin = _upsample(pale, shape) * fibres
    eosin *= 1 + 0.12 * grain
    eosin *= 0.34
    _blend(eosin, 0.28, epithelium)
    _blend(eosin, 0.03, lumen)
    eosin *= tissue
    hematoxylin = 0.07 + 0.13 * epithelium
    hematoxylin *= 1 - lumen
    grain *= 0.25
    grain += 1
    nuclei *= grain
    hematoxylin += nuclei
    hematoxylin *= tissue

    # Beer-Lambert colour, with a little sensor noise on the optical density.
    stain *= -math.log(10)
    noise = r_pixels.standard_normal(shape, dtype=np.float32)
    noise *= 0.006
    image = np.empty(shape + (3,), np.uint8)
    for c in range(3):
        od = hematoxylin * stain[0, c]
        od += eosin * stain[1, c]
        od += noise
        intensity = np.exp(od, out=od)
        intensity *= white[c]
        image[..., c] = np.minimum(intensity, 255, out=intensity)
    return image, tissue, motif, tissue_g


# Artifacts ---------------------------------------------------------------------------------------

_ARTIFACT_STREAMS = {'pen': 9, 'blur': 10, 'fold': 11}  # each artifact's own seed stream
# Marker inks: share of strokes, optical density (R, G, B) per unit density, density range. Blue
# absorbs red most, green red and blue, black everything (OD 1.2-1.8).
_INKS = {
    'blue': (0.45, (0.85, 0.6, 0.2), (0.75, 1.25)),
    'green': (0.3, (0.85, 0.3, 0.6), (0.75, 1.25)),
    'black': (0.25, (1.0, 1.0, 0.97), (1.2, 1.8)),
}
_PEN_EDGE = 2.0  # px: the soft edge of a stroke (ink alpha 1 -> 0)
_BLUR_EDGE_UM = 1.5  # sigma (um) of the blur weight's edge: the blend spans about +-6 um
_FOLD_PROFILE_MEAN = math.pi / 4  # mean of a fold's width profile, sqrt(1 - (2t / length)^2)


@dataclasses.dataclass(frozen=True)
class PenStroke:
    """A marker stroke: its ink, the ink's density, its width and its centreline."""

    colour: str  # 'blue', 'green' or 'black'
    ink_od: tuple[float, float, float]  # optical density (R, G, B) per unit density
    density: float  # mean density along the stroke
    width: float  # level-0 px where the ink is at half alpha, edge to edge
    points: np.ndarray  # [N, 2] centreline (x, y), level-0 px; may run off the slide
    noise_seed: int  # the density's variation along the stroke


@dataclasses.dataclass(frozen=True)
class BlurRegion:
    """Out-of-focus regions: where `field` (the slide's 8-um grid, [gh, gw]) >= `threshold`,
    blurred with a Gaussian of `sigma` level-0 px (less over the soft edge)."""

    field: np.ndarray
    threshold: float
    sigma: float


@dataclasses.dataclass(frozen=True)
class Fold:
    """A flap of the section folded over a straight crease: the band 0 <= d <= width(t) beside
    the crease (d: distance from it, to its left; t: position along it, |t| < length / 2; width
    tapering to 0 at the ends, its outer edge wavy) carries the tissue of the mirror point
    across the crease on top of its own."""

    centre: tuple[float, float]  # (x, y), level-0 px: the middle of the crease
    angle: float  # the crease's direction, radians
    length: float  # level-0 px
    width: float  # level-0 px, at the middle
    wobble: tuple[float, float, float]  # the outer edge's wave: relative amplitude, frequency,
    # phase

    def geometry(self, xs, ys):
        """(in_band bool, mirror x, mirror y) at points (xs, ys) (float arrays, level-0 px)."""
        c, s = math.cos(self.angle), math.sin(self.angle)
        dx, dy = xs - self.centre[0], ys - self.centre[1]
        t, d = dx * c + dy * s, dy * c - dx * s
        r = np.clip(2 * t / self.length, -1, 1)
        amplitude, frequency, phase = self.wobble
        edge = self.width * np.sqrt(1 - r * r) * (1 + amplitude * np.sin(frequency * np.pi * r
                                                                         + phase))
        band = (np.abs(t) < self.length / 2) & (d >= 0) & (d <= edge)
        return band, xs + 2 * d * s, ys - 2 * d * c

    def pixels(self, tissue):
        """Where the tissue lies doubled, given the slide's tissue mask [h, w]: (y0, y1, x0, x1,
        doubled bool [y1 - y0, x1 - x0], mirror rows, mirror columns int [same]) or None. A pixel
        is doubled where it and its mirror (nearest pixel) are tissue."""
        h, w = tissue.shape
        c, s = math.cos(self.angle), math.sin(self.angle)
        reach = self.width * (1 + abs(self.wobble[0]))
        corners = [(self.centre[0] + t * c - d * s, self.centre[1] + t * s + d * c)
                   for t in (-self.length / 2, self.length / 2) for d in (0, reach)]
        xs, ys = zip(*corners)
        x0, x1 = max(int(min(xs)) - 1, 0), min(int(max(xs)) + 2, w)
        y0, y1 = max(int(min(ys)) - 1, 0), min(int(max(ys)) + 2, h)
        if x0 >= x1 or y0 >= y1:
            return None
        gy, gx = np.mgrid[y0:y1, x0:x1].astype(np.float32) + 0.5  # pixel centres
        band, mx, my = self.geometry(gx, gy)
        cols, rows = np.floor(mx).astype(np.int64), np.floor(my).astype(np.int64)
        inside = (cols >= 0) & (cols < w) & (rows >= 0) & (rows < h)
        cols, rows = np.clip(cols, 0, w - 1), np.clip(rows, 0, h - 1)
        doubled = band & inside & tissue[y0:y1, x0:x1] & tissue[rows, cols]
        return y0, y1, x0, x1, doubled, rows, cols


@dataclasses.dataclass(frozen=True)
class ArtifactLayout:
    """The artifacts of a slide, as drawn: each from its own seed stream of the slide."""

    pen: tuple[PenStroke, ...] = ()
    blur: BlurRegion | None = None
    folds: tuple[Fold, ...] = ()


def _tissue_cells(tissue_g) -> np.ndarray:
    """(row, col) [N, 2] of the tissue cells of the grid (every cell on a slide without any)."""
    return np.argwhere(tissue_g if tissue_g.any() else np.ones_like(tissue_g))


def _tissue_point(rng, cells, grid, shape) -> tuple[float, float]:
    """A uniform point (x, y), level-0 px, in a random cell of `cells`."""
    row, col = cells[rng.integers(len(cells))]
    return ((col + rng.uniform()) * shape[1] / grid[1], (row + rng.uniform()) * shape[0] / grid[0])


def _on_grid(mask_g, xs, ys, shape) -> np.ndarray:
    """mask_g [gh, gw] at level-0 points (xs, ys); False off the slide."""
    (gh, gw), (h, w) = mask_g.shape, shape
    rows, cols = np.floor(ys * gh / h).astype(np.int64), np.floor(xs * gw / w).astype(np.int64)
    inside = (rows >= 0) & (rows < gh) & (cols >= 0) & (cols < gw)
    return inside & mask_g[np.clip(rows, 0, gh - 1), np.clip(cols, 0, gw - 1)]


def _stroke_path(rng, cells, tissue_g, shape):
    """A marker path through a tissue point: (points [257, 2], its length on the slide in px, the
    share of that on tissue)."""
    h, w = shape
    x, y = _tissue_point(rng, cells, tissue_g.shape, shape)
    theta = rng.uniform(0, np.pi)
    length = rng.uniform(0.5, 0.9) * math.hypot(h, w)
    t = np.linspace(0, 1, 257) - rng.uniform(0.25, 0.75)
    bend = rng.uniform(-0.3, 0.3)
    amplitude, frequency = rng.uniform(0, 0.03, (2, 1)), rng.uniform(0.5, 2.5, (2, 1))
    phase = rng.uniform(0, 2 * np.pi, (2, 1))
    def wave(t):  # across the path, in path lengths
        return bend * t * t + (amplitude * np.sin(2 * np.pi * frequency * t + phase)).sum(0)

    along, across = t * length, (wave(t) - wave(np.zeros(1))) * length
    points = np.stack([x + along * math.cos(theta) - across * math.sin(theta),
                       y + along * math.sin(theta) + across * math.cos(theta)], -1)
    inside = (points[:, 0] >= 0) & (points[:, 0] < w) & (points[:, 1] >= 0) & (points[:, 1] < h)
    steps = np.hypot(*np.diff(points, axis=0).T)
    on_slide = steps[inside[1:] & inside[:-1]].sum()
    on_tissue = _on_grid(tissue_g, points[:, 0], points[:, 1], shape)
    return points, on_slide, on_tissue.sum() / max(inside.sum(), 1)


def _pen_strokes(rng, tissue_g, shape) -> tuple[PenStroke, ...]:
    """1-3 marker strokes covering about 3-8% of the slide, each crossing tissue and glass.

    Real strokes are 0.5-1.5 mm wide on slides of some 25 x 75 mm; ours are scaled with the
    slide: the widths keep their 0.5-1.5 ratios, scaled so the strokes cover the drawn share."""
    h, w = shape
    cells = _tissue_cells(tissue_g)
    share = rng.uniform(0.03, 0.08)
    names = list(_INKS)
    drawn = []
    for _ in range(int(rng.integers(1, 4))):
        colour = names[rng.choice(len(names), p=[_INKS[n][0] for n in names])]
        density = rng.uniform(*_INKS[colour][2])
        relative_width = rng.uniform(0.5, 1.5)
        best, best_score = None, math.inf
        for _ in range(16):  # part on tissue, part on glass, mostly on the slide
            points, on_slide, on_tissue = _stroke_path(rng, cells, tissue_g, shape)
            score = abs(on_tissue - 0.5) + (on_slide < 0.35 * math.hypot(h, w))
            if score < best_score:
                best, best_score = (points, on_slide), score
            if score <= 0.25:
                break
        drawn.append((colour, density, relative_width) + best)
    scale = share * h * w / max(sum(d[2] * d[4] for d in drawn), 1.0)
    return tuple(PenStroke(colour, _INKS[colour][1], float(density), max(width * scale, 4.0),
                           points, int(rng.integers(2**63)))
                 for colour, density, width, points, _ in drawn)


def _stroke_alpha(stroke: PenStroke, shape):
    """(y0, y1, x0, x1, ink alpha float32 [y1 - y0, x1 - x0], distance to the centreline) or
    None: alpha 1 inside, smoothly 0 over _PEN_EDGE px around the half width."""
    h, w = shape
    reach = stroke.width / 2 + _PEN_EDGE
    xs, ys = stroke.points[:, 0], stroke.points[:, 1]
    x0, x1 = max(int(xs.min() - reach), 0), min(int(math.ceil(xs.max() + reach)) + 1, w)
    y0, y1 = max(int(ys.min() - reach), 0), min(int(math.ceil(ys.max() + reach)) + 1, h)
    if x0 >= x1 or y0 >= y1:
        return None
    pad = int(math.ceil(reach)) + 1  # the centreline just off the slide still counts
    canvas = np.full((y1 - y0 + 2 * pad, x1 - x0 + 2 * pad), 255, np.uint8)
    local = np.round((stroke.points - (x0 - pad, y0 - pad)) * 16).astype(np.int32)
    cv2.polylines(canvas, [local], False, 0, 1, cv2.LINE_8, shift=4)
    distance = cv2.distanceTransform(canvas, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
    distance = distance[pad:pad + y1 - y0, pad:pad + x1 - x0]
    alpha = np.clip((stroke.width / 2 - distance) / _PEN_EDGE + 0.5, 0, 1)
    alpha *= alpha * (3 - 2 * alpha)  # smoothstep
    return y0, y1, x0, x1, alpha, distance


def _draw_pen(image, strokes) -> np.ndarray:
    """Draws the strokes on image (uint8 [h, w, 3], in place) as a translucent dye: the light
    through is multiplied by 10^-(alpha * density * ink OD); the density varies along the stroke
    (+-12%) and rises a little at its edges, where marker ink pools. Returns the inked mask."""
    mask = np.zeros(image.shape[:2], bool)
    for stroke in strokes:
        drawn = _stroke_alpha(stroke, image.shape[:2])
        if drawn is None:
            continue
        y0, y1, x0, x1, alpha, distance = drawn
        inked = alpha > 0
        variation = _noise(np.random.default_rng(stroke.noise_seed), alpha.shape,
                           max(1.5 * stroke.width, 4.0))
        edge = np.minimum(distance / (stroke.width / 2), 1) ** 4
        od = (alpha * stroke.density * np.maximum(1 + 0.12 * variation, 0.5) * (1 + 0.2 * edge))
        region = image[y0:y1, x0:x1]
        light = np.power(10.0, -od[inked][:, None] * np.asarray(stroke.ink_od))
        region[inked] = np.clip(np.round(region[inked] * light), 0, 255).astype(np.uint8)
        mask[y0:y1, x0:x1] |= inked
    return mask


def _pen_mask(strokes, shape) -> np.ndarray:
    mask = np.zeros(shape, bool)
    for stroke in strokes:
        drawn = _stroke_alpha(stroke, shape)
        if drawn is not None:
            y0, y1, x0, x1, alpha, _ = drawn
            mask[y0:y1, x0:x1] |= alpha > 0
    return mask


def _blur_region(rng, tissue_g, px) -> BlurRegion:
    """1-2 out-of-focus regions (irregular blobs, or a band across the section) covering 10-20%
    of the tissue (on the 8-um grid), blurred with sigma 3-6 um."""
    grid = tissue_g.shape
    share = rng.uniform(0.10, 0.20)
    sigma = rng.uniform(3, 6) * px
    count = int(rng.integers(1, 3))
    cells = _tissue_cells(tissue_g)
    size = math.sqrt(len(cells) * share / count)  # grid cells: a region's linear size
    rows, cols = np.mgrid[:grid[0], :grid[1]].astype(np.float32)
    field = np.full(grid, -np.inf, np.float32)
    for _ in range(count):
        row, col = cells[rng.integers(len(cells))] + rng.uniform(0, 1, 2)
        angle = rng.uniform(0, np.pi)
        along = (cols - col) * math.cos(angle) + (rows - row) * math.sin(angle)
        across = (rows - row) * math.cos(angle) - (cols - col) * math.sin(angle)
        if rng.uniform() < 0.35:  # a band across the section
            region = 1 - np.abs(across) / (0.3 * size)
        else:  # a blob, up to 2.5 times as long as wide
            region = 1 - np.hypot(along / rng.uniform(1, 2.5), across) / (0.6 * size)
        region += 0.35 * _noise(rng, grid, max(size / 3, 2.0))
        field = np.maximum(field, region)
    inside = tissue_g if tissue_g.any() else np.ones(grid, bool)
    return BlurRegion(field, float(np.quantile(field[inside], 1 - share)), float(sigma))


def _blur_weight(region: BlurRegion, shape, px):
    """(y0, y1, x0, x1, weight float32 [y1 - y0, x1 - x0]) or None: the region's share of the
    full blur, 1 inside, smoothly 0 (a Gaussian edge of _BLUR_EDGE_UM) outside."""
    hard = _upsample(region.field, shape) >= region.threshold
    rows, cols = np.flatnonzero(hard.any(1)), np.flatnonzero(hard.any(0))
    if not len(rows):
        return None
    edge = _BLUR_EDGE_UM * px
    reach = int(math.ceil(4 * edge)) + 1  # OpenCV's float kernels reach 4 sigma
    y0, y1 = max(rows[0] - reach, 0), min(rows[-1] + 1 + reach, shape[0])
    x0, x1 = max(cols[0] - reach, 0), min(cols[-1] + 1 + reach, shape[1])
    weight = cv2.GaussianBlur(hard[y0:y1, x0:x1].astype(np.float32), (0, 0), edge)
    return y0, y1, x0, x1, np.clip(weight, 0, 1)


def _draw_blur(image, region: BlurRegion, px) -> np.ndarray:
    """Blurs image (uint8 [h, w, 3], in place) by the region: sigma = weight * region.sigma,
    as a blend of the sharp image, its blur at sigma / 2 and at sigma. Returns where the blur's
    sigma is at least half its maximum (weight >= 0.5)."""
    mask = np.zeros(image.shape[:2], bool)
    found = _blur_weight(region, image.shape[:2], px)
    if found is None:
        return mask
    y0, y1, x0, x1, weight = found
    margin = int(math.ceil(3 * region.sigma)) + 1  # OpenCV's uint8 kernels reach 3 sigma
    h, w = image.shape[:2]
    sy0, sy1, sx0, sx1 = max(y0 - margin, 0), min(y1 + margin, h), max(x0 - margin, 0), min(
        x1 + margin, w)
    source = image[sy0:sy1, sx0:sx1]
    inner = (slice(y0 - sy0, y1 - sy0), slice(x0 - sx0, x1 - sx0))
    half = cv2.GaussianBlur(source, (0, 0), region.sigma / 2)[inner].astype(np.float32)
    full = cv2.GaussianBlur(source, (0, 0), region.sigma)[inner].astype(np.float32)
    sharp = image[y0:y1, x0:x1]
    twice = (2 * weight)[..., None]
    out = np.where(twice <= 1, sharp + (half - sharp) * twice, half + (full - half) * (twice - 1))
    changed = weight > 0
    sharp[changed] = np.clip(np.round(out[changed]), 0, 255).astype(np.uint8)
    mask[y0:y1, x0:x1] = weight >= 0.5
    return mask


def _folds(rng, tissue_g, shape, px) -> tuple[Fold, ...]:
    """1-2 folds doubling together 3-8% of the tissue: bands 100-300 um wide, or narrower where
    the tissue is small (at most that wide, 6-14 times as long as wide), each placed (best of 32
    tries on the 8-um grid) where its doubled area is closest to its share, apart from others."""
    (h, w), grid = shape, tissue_g.shape
    if not tissue_g.any():
        return ()  # nothing to fold
    share = rng.uniform(0.03, 0.08)
    parts = [1.0] if rng.integers(1, 3) == 1 else [p := rng.uniform(0.35, 0.65), 1 - p]
    cell_area = h * w / (grid[0] * grid[1])
    cells = _tissue_cells(tissue_g)
    gy, gx = (np.mgrid[:grid[0], :grid[1]] + 0.5) * np.array([h / grid[0], w / grid[1]])[:, None,
                                                                                         None]
    taken = np.zeros(grid, bool)
    folds = []
    for part in parts:
        area = share * part * tissue_g.sum() * cell_area
        width = min(rng.uniform(100, 300) * px,
                    math.sqrt(area / (_FOLD_PROFILE_MEAN * rng.uniform(6, 14))))
        length = area / (_FOLD_PROFILE_MEAN * width)
        wobble = (rng.uniform(0.05, 0.15), rng.uniform(1, 4), rng.uniform(0, 2 * np.pi))
        best, best_score = None, math.inf
        for _ in range(32):
            fold = Fold(_tissue_point(rng, cells, grid, shape), rng.uniform(0, 2 * np.pi),
                        length, width, wobble)
            band, mx, my = fold.geometry(gx, gy)
            doubled = band & tissue_g & _on_grid(tissue_g, mx, my, shape)
            score = abs(math.log((doubled.sum() + 1) * cell_area / (area + cell_area)))
            score += 10 * (band & taken).any()
            if score < best_score:
                best, best_score, best_band = fold, score, band
            if score < 0.1:
                break
        folds.append(best)
        taken |= best_band
    return tuple(folds)


def _draw_folds(image, folds, tissue, white) -> np.ndarray:
    """Doubles the tissue under each fold (image uint8 [h, w, 3], in place): by Beer-Lambert the
    optical densities add, intensity = white * (I / white) * (I_mirror / white), the mirror
    pixels taken from the image before any fold. Returns the doubled mask."""
    mask = np.zeros(image.shape[:2], bool)
    drawn = []
    for fold in folds:
        found = fold.pixels(tissue)
        if found is not None:
            y0, y1, x0, x1, doubled, rows, cols = found
            drawn.append((y0, y1, x0, x1, doubled,
                          image[rows[doubled], cols[doubled]].astype(np.float32)))
    white = np.asarray(white, np.float32)
    for y0, y1, x0, x1, doubled, mirror in drawn:
        region = image[y0:y1, x0:x1]
        region[doubled] = np.clip(np.round(region[doubled] * (mirror / white)), 0, 255
                                  ).astype(np.uint8)
        mask[y0:y1, x0:x1] |= doubled
    return mask


def _fold_mask(folds, tissue) -> np.ndarray:
    mask = np.zeros(tissue.shape, bool)
    for fold in folds:
        found = fold.pixels(tissue)
        if found is not None:
            y0, y1, x0, x1, doubled, _, _ = found
            mask[y0:y1, x0:x1] |= doubled
    return mask


def _layout(spec: SyntheticSlideSpec, streams, tissue_g) -> ArtifactLayout:
    shape, px = (spec.height, spec.width), 1.0 / spec.mpp
    rng = {name: np.random.default_rng(streams[i]) for name, i in _ARTIFACT_STREAMS.items()}
    return ArtifactLayout(
        pen=_pen_strokes(rng['pen'], tissue_g, shape) if 'pen' in spec.artifacts else (),
        blur=_blur_region(rng['blur'], tissue_g, px) if 'blur' in spec.artifacts else None,
        folds=_folds(rng['fold'], tissue_g, shape, px) if 'fold' in spec.artifacts else ())


def _draw_artifacts(image, layout: ArtifactLayout, tissue, white, px) -> dict[str, np.ndarray]:
    """Draws the layout on image (in place): folds (in the tissue), then pen (on the cover
    glass), then blur (the scanner's focus); returns the mask of each artifact drawn."""
    masks = {}
    if layout.folds:
        masks['fold'] = _draw_folds(image, layout.folds, tissue, white)
    if layout.pen:
        masks['pen'] = _draw_pen(image, layout.pen)
    if layout.blur is not None:
        masks['blur'] = _draw_blur(image, layout.blur, px)
    return masks


def _slide_layout(spec: SyntheticSlideSpec):
    """(layout, tissue, motif) of `spec` without rendering its pixels."""
    _check_artifacts(spec)
    streams = _seed_streams(spec)
    r_tissue, r_regions = (np.random.default_rng(s) for s in streams[1:3])
    _, tissue_g, _, tissue, motif = _regions(spec, r_tissue, r_regions, fill=False)
    return _layout(spec, streams, tissue_g), tissue, motif


def artifact_layout(spec: SyntheticSlideSpec) -> ArtifactLayout:
    """The artifacts `render_slide` draws on `spec` (pen strokes, blur region, folds), without
    rendering: for tests and for scoring quality control against them."""
    return _slide_layout(spec)[0]


def artifact_masks(spec: SyntheticSlideSpec) -> dict[str, np.ndarray]:
    """The masks of `render_slide(spec, return_masks=True)` without rendering the slide: bool
    [height, width] for 'tissue', 'motif' and each of spec.artifacts: 'pen' where any ink is
    (the soft edge included), 'blur' where the blur's sigma is at least half its maximum, 'fold'
    where the tissue lies doubled (fold band, tissue, and tissue at the mirror point)."""
    layout, tissue, motif = _slide_layout(spec)
    masks = {'tissue': tissue, 'motif': motif}
    shape, px = tissue.shape, 1.0 / spec.mpp
    if layout.folds:
        masks['fold'] = _fold_mask(layout.folds, tissue)
    if layout.pen:
        masks['pen'] = _pen_mask(layout.pen, shape)
    if layout.blur is not None:
        found = _blur_weight(layout.blur, shape, px)
        masks['blur'] = np.zeros(shape, bool)
        if found is not None:
            y0, y1, x0, x1, weight = found
            masks['blur'][y0:y1, x0:x1] = weight >= 0.5
    return masks


# Write -------------------------------------------------------------------------------------------


def _level_sizes(size, tile_size) -> list[tuple[int, int]]:
    """(width, height) of each pyramid level of a level-0 `size`: 4x smaller (rounded up) while
    the smaller side is >= 2 * tile_size (and at least one more level above 1024 px)."""
    sizes = [tuple(size)]
    while True:
        w, h = sizes[-1]
        wanted = min(h, w) >= 2 * tile_size or (len(sizes) == 1 and max(h, w) > 1024)
        if not wanted or min(h, w) < 4:
            return sizes
        sizes.append((-(-w // 4), -(-h // 4)))


def _pyramid(image, tile_size) -> list[np.ndarray]:
    """Level 0 = image, then the 4x box-downsampled levels of `_level_sizes`."""
    levels = [image]
    for _ in _level_sizes(image.shape[1::-1], tile_size)[1:]:
        levels.append(np.asarray(Image.fromarray(levels[-1]).reduce(4)))
    return levels


def _page_tags(fmt, index, level_size, size, mpp, tile_size, quality) -> dict:
    """tifffile.write arguments naming pyramid level `index`; sizes are (width, height)."""
    if fmt == 'tiff':  # generic: resolution in pixels per cm; reduced levels flagged as such
        per_cm = tuple(1e4 * n / (mpp * n0) for n, n0 in zip(level_size, size))
        return dict(resolution=per_cm, resolutionunit='CENTIMETER', subfiletype=1 if index else 0)
    w, h = size
    text = f'Aperio Image Library v10.0.0\n{w}x{h} [0,0 {w}x{h}] ({tile_size}x{tile_size})'
    if index:
        text += f' -> {level_size[0]}x{level_size[1]}'
    return dict(description=f'{text} JPEG/RGB Q={quality}|AppMag = {round(10 / mpp)}|MPP = {mpp:g}')


def _check_layout(fmt, tile_size) -> None:
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    if tile_size <= 0 or tile_size % 16:
        raise ValueError(f'tile_size must be a positive multiple of 16 (JPEG 2x2 subsampling), '
                         f'got {tile_size}')


def _jpeg_args(quality) -> dict:
    return dict(photometric='rgb', compression='jpeg', compressionargs={'level': quality},
                metadata=None)


def _write_thumbnail(tif, thumb: np.ndarray, size, quality) -> None:
    """The Aperio thumbnail page (stripped, after level 0) of a slide of level-0 `size`."""
    text = (f'Aperio Image Library v10.0.0\n{size[0]}x{size[1]} -> '
            f'{thumb.shape[1]}x{thumb.shape[0]} - ')
    tif.write(thumb, rowsperstrip=64, description=text, **_jpeg_args(quality))


def write_slide(path, image: np.ndarray, mpp: float, fmt: str, tile_size: int = 256,
                jpeg_quality: int = 90) -> None:
    """Writes image (uint8 [H, W, 3]) atomically as a JPEG-tiled pyramid that OpenSlide opens.

    Level 0 is the image, then levels downsampled by 4 while the smaller side is >= 2 * tile_size
    (at least 2 levels above 1024 px). 'tiff': generic tiled TIFF, one top-level page per level,
    the reduced ones flagged NewSubfileType=1 (OpenSlide ignores them otherwise), resolution in
    pixels per centimetre. 'svs': Aperio layout, level 0 with the Aperio description (MPP,
    AppMag), a stripped thumbnail page, then the other levels. Tiles are JPEG in YCbCr with 2x2
    chroma subsampling (tifffile's default), which OpenSlide decodes to the right colours.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f'image must be uint8 [H, W, 3], got {image.dtype} {image.shape}')
    _check_layout(fmt, tile_size)
    size = image.shape[1], image.shape[0]
    with artifacts_lib.atomic_path(path) as temporary:
        with tifffile.TiffWriter(temporary, bigtiff=image.nbytes > 2**31) as tif:
            for i, level in enumerate(_pyramid(image, tile_size)):
                tags = _page_tags(fmt, i, level.shape[1::-1], size, mpp, tile_size, jpeg_quality)
                tif.write(level, tile=(tile_size, tile_size), **tags, **_jpeg_args(jpeg_quality))
                if fmt == 'svs' and i == 0:
                    thumb = Image.fromarray(image)
                    thumb.thumbnail((768, 768), Image.Resampling.BOX)
                    _write_thumbnail(tif, np.asarray(thumb), size, jpeg_quality)


def write_streamed_slide(path, rows: Callable[[int, int], np.ndarray], size: tuple[int, int],
                         mpp: float, fmt: str = 'svs', tile_size: int = 256,
                         jpeg_quality: int = 80) -> None:
    """Writes a slide as `write_slide` does (same layout and levels) without holding its image.

    `rows(top, height)` gives level-0 rows [top, top + height) as uint8 [height, width, 3], size
    = (width, height); it is called once per band of `tile_size` rows, top to bottom. Each level is
    written band by band, tile by tile, while its bands box-reduced by 4 (the pixels of
    write_slide's levels) go to an unnamed temporary file beside `path`, which the next level
    reads back (about 1/15 of level 0's raw size on disk). The SVS thumbnail is reduced further
    from level 0's reduced bands as they pass. Memory: a few bands, whatever the slide's size.
    """
    _check_layout(fmt, tile_size)
    sizes = _level_sizes(size, tile_size)
    path = pathlib.Path(path)
    with artifacts_lib.atomic_path(path) as temporary:
        with tifffile.TiffWriter(temporary, bigtiff=size[0] * size[1] * 3 > 2**31) as tif:
            source = rows  # rows of the level being written
            for i, (width, height) in enumerate(sizes):
                reduced = tempfile.TemporaryFile(dir=path.parent) if i + 1 < len(sizes) else None
                thumb = None  # the thumbnail (long side <= 768 px), from the quarter bands
                if fmt == 'svs' and i == 0:
                    thumb = _BandReducer(-(-max(size) // (4 * 768)))

                def pass_on(quarter):  # the band box-reduced by 4
                    if reduced is not None:
                        reduced.write(quarter.tobytes())
                    if thumb is not None:
                        thumb.add(quarter)

                tiles = _tiles(_bands(source, width, height, tile_size), tile_size,
                               pass_on if reduced is not None or thumb is not None else None)
                tags = _page_tags(fmt, i, (width, height), size, mpp, tile_size, jpeg_quality)
                tif.write(tiles, shape=(height, width, 3), dtype=np.uint8,
                          tile=(tile_size, tile_size), **tags, **_jpeg_args(jpeg_quality))
                if thumb is not None:
                    _write_thumbnail(tif, thumb.result(), size, jpeg_quality)
                if i:
                    source.file.close()
                if reduced is not None:
                    reduced.seek(0)
                    source = _FileRows(reduced, width=-(-width // 4))


def _bands(rows, width, height, tile_size) -> Iterator[np.ndarray]:
    """A level's rows, top to bottom, in bands of `tile_size` rows: uint8 [<= tile_size, W, 3]."""
    for top in range(0, height, tile_size):
        count = min(tile_size, height - top)
        band = np.asarray(rows(top, count))
        if band.shape != (count, width, 3) or band.dtype != np.uint8:
            raise ValueError(f'rows({top}, {count}) gave {band.dtype} {band.shape}, not uint8 '
                             f'{(count, width, 3)}')
        yield band


def _tiles(bands, tile_size, pass_on) -> Iterator[np.ndarray]:
    """The tiles [tile_size, tile_size, 3] of each band, row-major, edge tiles padded with zeros
    (as tifffile pads); first each band box-reduced by 4 goes to `pass_on` (unless None)."""
    for band in bands:
        if pass_on is not None:
            pass_on(np.asarray(Image.fromarray(band).reduce(4)))
        for left in range(0, band.shape[1], tile_size):
            tile = band[:, left:left + tile_size]
            if tile.shape[:2] != (tile_size, tile_size):
                tile = np.pad(tile, ((0, tile_size - tile.shape[0]),
                                     (0, tile_size - tile.shape[1]), (0, 0)))
            yield tile


@dataclasses.dataclass
class _FileRows:
    """rows(top, height) of an image stored as raw uint8 rows of `width` px, read in order."""

    file: Any
    width: int

    def __call__(self, top: int, height: int) -> np.ndarray:
        del top  # sequential
        data = self.file.read(height * self.width * 3)
        return np.frombuffer(data, np.uint8).reshape(height, self.width, 3)


class _BandReducer:
    """Box-reduces an image by an integer factor from its bands of rows, as they come."""

    def __init__(self, factor: int):
        self.factor, self.carry, self.parts = factor, None, []

    def add(self, band: np.ndarray) -> None:
        """Takes the next rows, uint8 [h, W, 3]."""
        rows = band if self.carry is None else np.concatenate([self.carry, band])
        whole = len(rows) // self.factor * self.factor
        if whole:
            self.parts.append(np.asarray(Image.fromarray(rows[:whole]).reduce(self.factor)))
        self.carry = rows[whole:].copy()

    def result(self) -> np.ndarray:
        """The reduced image, uint8 [ceil(H / factor), ceil(W / factor), 3]."""
        if self.carry is not None and len(self.carry):
            self.parts.append(np.asarray(Image.fromarray(self.carry).reduce(self.factor)))
            self.carry = None
        return np.concatenate(self.parts)


# Real-size slides --------------------------------------------------------------------------------

_MASK_UM = 32.0  # microns per cell of a mosaic slide's tissue-mask grid


class MosaicSlide:
    """A real-size slide made row by row from a few rendered texture blocks, for full-size runs.

    Level 0 (`spec`'s size and mpp) is a grid of `cell_size`-px squares, each cut at a random
    offset from one of `blocks` texture blocks (`render_texture`: block_size^2 px of tissue
    with the existing morphology, the class motif on positive slides, one stain per slide), in one
    of 4 orientations (as is, flipped, transposed, rotated), shown inside a coarse irregular tissue
    mask (islands around 1-3 centres, `tissue_fraction` of the slide, bilinear edges at 32 um)
    over the slide's glass (its white level and sensor noise). Held: the blocks, each also
    transposed (blocks x 2 x block_size^2 x 3 bytes), and the mask grid; `rows` makes any band.
    """

    def __init__(self, spec: SyntheticSlideSpec, *, blocks: int = 4, block_size: int = 4096,
                 cell_size: int = 2048, tissue_fraction: float = 0.6):
        if not 0 < cell_size <= block_size or blocks < 1 or not 0 < tissue_fraction <= 1:
            raise ValueError(f'bad mosaic: {blocks} blocks of {block_size} px, cells of '
                             f'{cell_size} px, tissue fraction {tissue_fraction}')
        if spec.artifacts or spec.site >= 0:
            raise ValueError(f'a mosaic slide has neither artifacts nor a staining site (render '
                             f'slides of the usual size for those): got artifacts '
                             f'{spec.artifacts}, site {spec.site}')
        self.spec, self.cell_size = spec, cell_size
        stain_stream = np.random.SeedSequence(spec.seed).spawn(8)[0]  # render_texture's
        _, white = _stain(np.random.default_rng(stain_stream))
        rng = np.random.default_rng([spec.seed, 1])
        self._blocks = []  # (block, its transpose), uint8 [block_size, block_size, 3] each
        for i in range(blocks):
            block_spec = dataclasses.replace(spec, width=block_size, height=block_size,
                                             seed=int(rng.integers(2**63)))
            block = render_texture(block_spec, spec.seed)
            self._blocks.append((block, np.ascontiguousarray(block.transpose(1, 0, 2))))
        cells = (-(-spec.height // cell_size), -(-spec.width // cell_size))
        self._choice = rng.integers(blocks, size=cells)
        self._orientation = rng.integers(4, size=cells)  # bit 0: transposed, bit 1: flipped
        self._offset = rng.integers(block_size - cell_size + 1, size=cells + (2,))  # (y, x)
        noise = rng.standard_normal((cell_size, cell_size), dtype=np.float32)
        glass = white * np.exp(0.006 * noise)[..., None]  # Beer-Lambert of no stain
        self._glass = np.minimum(glass, 255).astype(np.uint8)
        self._mask_px = _MASK_UM / spec.mpp  # level-0 px per mask cell
        grid = (math.ceil(spec.height / self._mask_px), math.ceil(spec.width / self._mask_px))
        field = (_tissue_field(rng, *grid) + 0.02 * _noise(rng, grid, 12)).astype(np.float32)
        self._threshold = float(np.quantile(field, 1 - tissue_fraction))
        self.tissue_fraction = float((field >= self._threshold).mean())
        self._grid, self._field = field, Image.fromarray(field)  # [gh, gw]; as a PIL 'F' image

    def rows(self, top: int, height: int) -> np.ndarray:
        """Level-0 rows [top, top + height): uint8 [height, width, 3]."""
        c = self.cell_size
        out = np.empty((height, self.spec.width, 3), np.uint8)
        for row in range(top // c, (top + height - 1) // c + 1):
            y0, y1 = max(top, row * c), min(top + height, (row + 1) * c)
            for col in range(len(self._choice[row])):
                x0, x1 = col * c, min(self.spec.width, (col + 1) * c)
                target = out[y0 - top:y1 - top, x0:x1]
                glass = self._glass[y0 - row * c:y1 - row * c, :x1 - x0]
                uniform = self._uniform(y0, y1, x0, x1)
                if uniform is False:
                    target[...] = glass
                    continue
                target[...] = self._texture(row, col)[y0 - row * c:y1 - row * c, :x1 - x0]
                if uniform is None:
                    np.copyto(target, glass, where=~self.tissue(y0, y1, x0, x1)[..., None])
        return out

    def tissue(self, y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
        """The tissue mask of level-0 rows [y0, y1) and columns [x0, x1): bool [y1-y0, x1-x0]."""
        m = self._mask_px
        field = self._field.resize((x1 - x0, y1 - y0), Image.Resampling.BILINEAR,
                                   box=(x0 / m, y0 / m, x1 / m, y1 / m))
        return np.asarray(field) >= self._threshold

    def _uniform(self, y0: int, y1: int, x0: int, x1: int) -> bool | None:
        """True / False when the area is all tissue / all glass (the mask grid's cells around it
        are all above / below the threshold: bilinear values stay within their range), else
        None."""
        m = self._mask_px
        cells = self._grid[max(int(y0 / m) - 1, 0):int(y1 / m) + 2,
                           max(int(x0 / m) - 1, 0):int(x1 / m) + 2]
        if cells.min() >= self._threshold:
            return True
        if cells.max() < self._threshold:
            return False
        return None

    def _texture(self, row: int, col: int) -> np.ndarray:
        """The cell's texture, a view [cell_size, cell_size, 3] of a block."""
        orientation, (y, x) = self._orientation[row, col], self._offset[row, col]
        block = self._blocks[self._choice[row, col]][orientation & 1]
        if orientation & 2:
            block = block[::-1]
        return block[y:y + self.cell_size, x:x + self.cell_size]


# Cohort ------------------------------------------------------------------------------------------


def cohort_specs(num_slides: int, classes=('negative', 'positive'), *, seed: int = 0,
                 width: int = 4096, height: int = 3072, slides_per_case: int | None = None,
                 formats=FORMATS, motif_fraction: tuple[float, float] = MOTIF_FRACTION,
                 artifacts=(), sites: int = 0,
                 site_follows_label: tuple[float, float] = SITE_FOLLOWS_LABEL,
                 split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS
                 ) -> list[SyntheticSlideSpec]:
    """The slides of a synthetic cohort, in manifest order.

    Cases alternate between the classes (classes[1] carries the motif), so any num_slides >= 2
    has both. slides_per_case=None mixes: about a quarter of cases hold 2 slides (same case and
    label). Format and mpp cycle within each class, so neither tells the class. Every slide
    carries `artifacts` (any of ARTIFACTS). With `sites` >= 2 the cohort is split
    (`split_fractions`, by case, stratified by label: `cohort.split_by_case`) and each case put
    at a staining site: a case of class index y at site y mod sites with chance
    site_follows_label[0] in train and val, [1] in test, else at one of the other sites
    (uniformly); the slides take their site's stain (`site_stains`). sites=0: no splits, a stain
    per slide. Everything is deterministic from `seed`.
    """
    if len(classes) != 2:
        raise ValueError(f'a synthetic cohort has exactly 2 classes, got {classes}')
    if num_slides < 0 or (slides_per_case is not None and slides_per_case < 1):
        raise ValueError(f'bad num_slides {num_slides} or slides_per_case {slides_per_case}')
    unknown = sorted(set(artifacts) - set(ARTIFACTS))
    if unknown:
        raise ValueError(f'unknown artifact(s) {unknown}; choose from {ARTIFACTS}')
    if sites < 0 or sites == 1:
        raise ValueError(f'sites must be 0 (a stain per slide) or >= 2, got {sites}')
    drawn = tuple(a for a in ARTIFACTS if a in artifacts)
    specs, per_class, case = [], [0, 0], 0
    while len(specs) < num_slides:
        label = case % 2
        count = slides_per_case or (2 if case % 8 in (2, 7) else 1)
        for _ in range(min(count, num_slides - len(specs))):
            k, j = per_class[label], len(specs)
            per_class[label] += 1
            specs.append(SyntheticSlideSpec(
                slide_id=f'syn{seed}_{j:04d}', case_id=f'syn{seed}_case{case:04d}',
                label=classes[label], positive=bool(label), mpp=MPPS[k // len(formats) % len(MPPS)],
                fmt=formats[k % len(formats)], width=width, height=height,
                seed=int(np.random.SeedSequence([seed, j]).generate_state(1)[0]),
                motif_fraction=tuple(motif_fraction), artifacts=drawn))
        case += 1
    if sites:
        specs = _place_at_sites(specs, classes, seed, sites, site_follows_label, split_fractions)
    return specs


def _place_at_sites(specs, classes, seed, sites, site_follows_label, split_fractions):
    """The specs with their split and site (see cohort_specs): splits dealt by
    cohort.split_by_case, sites drawn per case in manifest order, both from `seed`."""
    chances = tuple(site_follows_label)
    if len(chances) != 2 or not all(0 <= p <= 1 for p in chances):
        raise ValueError(f'site_follows_label must be (train/val, test) chances in [0, 1], '
                         f'got {chances}')
    records = [cohort_lib.SlideRecord(slide_id=s.slide_id, path='', label=s.label,
                                      case_id=s.case_id, split='', line=i + 2)
               for i, s in enumerate(specs)]
    split_seed = int(np.random.SeedSequence([seed, _SITE_TAG, 3, 1]).generate_state(1)[0])
    split_of = cohort_lib.split_by_case(records, tuple(split_fractions), split_seed)
    rng = np.random.default_rng(np.random.SeedSequence([seed, _SITE_TAG, 2, 1]))
    site_of = {}
    for spec in specs:
        if spec.case_id in site_of:
            continue
        home = classes.index(spec.label) % sites
        chance = chances[0] if split_of[spec.case_id] in ('train', 'val') else chances[1]
        follows, other = rng.uniform() < chance, int(rng.integers(sites - 1))
        site_of[spec.case_id] = home if follows else (home + 1 + other) % sites
    stains = site_stains(seed, sites)
    return [dataclasses.replace(spec, site=site_of[spec.case_id], split=split_of[spec.case_id],
                                site_stain=tuple(float(v) for v in stains[site_of[spec.case_id]]))
            for spec in specs]


def slide_file_name(spec: SyntheticSlideSpec) -> str:
    """The slide's file in a generated cohort: <slide_id>.<fmt>, the artifacts and site (what
    changes the pixels beyond the slide's seed) added before the suffix, e.g.
    syn0_0003-pen-fold-site1.svs, so that a cohort made with other settings is not reused."""
    variant = ''.join(f'-{a}' for a in spec.artifacts)
    variant += f'-site{spec.site}' if spec.site >= 0 else ''
    return f'{spec.slide_id}{variant}.{spec.fmt}'


def site_name(site: int) -> str:
    """A site's name in the manifest's `site` column."""
    return f'site{site}'


def _render_and_write(spec: SyntheticSlideSpec, path: pathlib.Path) -> None:
    write_slide(path, render_slide(spec), spec.mpp, spec.fmt)


def make_cohort(out_dir, num_slides: int, classes=('negative', 'positive'), *, seed: int = 0,
                width: int = 4096, height: int = 3072, slides_per_case: int | None = None,
                formats=FORMATS, workers: int = 1,
                motif_fraction: tuple[float, float] = MOTIF_FRACTION, artifacts=(),
                sites: int = 0, site_follows_label: tuple[float, float] = SITE_FOLLOWS_LABEL,
                split_fractions: tuple[float, float, float] = SPLIT_FRACTIONS) -> pathlib.Path:
    """Renders and writes a synthetic cohort and out_dir/manifest.csv; returns the manifest path.

    Manifest columns: slide_id, path (absolute), label, case_id, and with sites >= 2 also site
    ('site0', 'site1', ...) and split ('train', 'val', 'test'). Deterministic from `seed`. A slide
    whose file exists is not rendered again (files are written atomically, named by
    `slide_file_name`); the others are rendered in `workers` processes. Layout: cohort_specs.
    """
    out_dir = pathlib.Path(out_dir).resolve()
    specs = cohort_specs(num_slides, classes, seed=seed, width=width, height=height,
                         slides_per_case=slides_per_case, formats=formats,
                         motif_fraction=motif_fraction, artifacts=artifacts, sites=sites,
                         site_follows_label=site_follows_label, split_fractions=split_fractions)
    paths = [out_dir / slide_file_name(spec) for spec in specs]
    todo = [(spec, path) for spec, path in zip(specs, paths) if not path.exists()]
    if todo:
        logging.info('rendering %d synthetic slides', len(todo))
        progress = Progress('synthetic slides', len(todo), 'slides')
        if workers <= 1:
            for spec, path in todo:
                _render_and_write(spec, path)
                progress.update()
        else:
            context = multiprocessing.get_context('spawn')
            with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), context) as pool:
                for future in concurrent.futures.as_completed(
                        [pool.submit(_render_and_write, spec, path) for spec, path in todo]):
                    future.result()
                    progress.update()
        progress.close()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator='\n')
    writer.writerow(MANIFEST_COLUMNS + (SITE_COLUMNS if sites else ()))
    for spec, path in zip(specs, paths):
        row = (spec.slide_id, str(path), spec.label, spec.case_id)
        writer.writerow(row + ((site_name(spec.site), spec.split) if sites else ()))
    manifest = out_dir / 'manifest.csv'
    artifacts_lib.save_text(manifest, text.getvalue())
    return manifest
