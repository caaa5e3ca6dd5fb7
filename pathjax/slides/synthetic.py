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

Artifacts (`SyntheticSlideSpec.artifacts`, any of `synthetic_artifacts.ARTIFACTS`) are drawn on
the rendered slide, each from a seed stream of its own and with a known level-0 mask
(`render_slide(spec, return_masks=True)`, or `artifact_masks` without rendering). A slide at a
staining site takes its site's stain (`site_stains`, drawn from wider ranges than a slide's own)
jittered a little. With neither, a slide renders exactly as it did before these existed: the new
draws come from new seed streams only. Sizes are in microns, converted with the slide's mpp.

Entry points: `render_slide` (a slide of the usual size, in memory), `render_texture` (tissue
without background, the blocks of `synthetic_mosaic.MosaicSlide`), `slide_stain`, `site_stains`,
`artifact_layout`, `artifact_masks`. Cohorts: `synthetic_cohort`; files: `slide_writer`.
"""

import dataclasses
import math

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pathjax.slides import synthetic_artifacts, synthetic_fields
from pathjax.slides.synthetic_artifacts import ArtifactLayout

MOTIF_FRACTION = (0.15, 0.25)  # a positive slide's motif covers a uniform share of its tissue

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
    artifacts: tuple[str, ...] = ()  # drawn with known masks, any of synthetic_artifacts.ARTIFACTS
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


def _fibres(rng, warp, px, theta) -> np.ndarray:
    """Collagen relief [h, w], mean ~0: wavy bundles ~2 um wide split by pale clefts.

    The bundles cross direction theta; warp [h, w] (px, along theta) bends them.
    """
    h, w = warp.shape
    u = np.arange(w, dtype=np.float32)[None, :] * math.cos(theta) + warp
    u += np.arange(h, dtype=np.float32)[:, None] * math.sin(theta)
    u -= u.min()
    profile = synthetic_fields.noise(rng, (1, int(u.max()) + 2), 2 * px)[0]
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
# The seed entropy of a cohort's site streams is [seed, SITE_TAG, kind, k]; kind 1: the sites'
# stains (here), 2: the cases' sites, 3: the split (synthetic_cohort).
SITE_TAG = 0x517E
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
        rng = np.random.default_rng(np.random.SeedSequence([seed, SITE_TAG, 1, k + 1]))
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
    unknown = [a for a in spec.artifacts if a not in synthetic_artifacts.ARTIFACTS]
    if unknown:
        raise ValueError(f'slide {spec.slide_id}: unknown artifact(s) {unknown}; choose from '
                         f'{synthetic_artifacts.ARTIFACTS}')


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
        masks.update(synthetic_artifacts.draw_artifacts(image, layout, tissue, stain[1],
                                                        1.0 / spec.mpp))
    return (image, masks) if return_masks else image


def render_texture(spec: SyntheticSlideSpec, stain_seed: int) -> np.ndarray:
    """Tissue over the whole of `spec` (no background), stained as the slides of `stain_seed`:
    uint8 [height, width, 3]. The texture blocks of a mosaic slide share one stain. No artifacts
    or sites here."""
    if spec.artifacts or spec.site >= 0:
        raise ValueError(f'texture blocks (MosaicSlide) have neither artifacts nor staining '
                         f'sites: got artifacts {spec.artifacts}, site {spec.site}')
    streams = np.random.SeedSequence(spec.seed).spawn(8)
    return _render(spec, streams, texture_stain(stain_seed), fill=True)[0]


def texture_stain(stain_seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The stain `render_texture` gives the slides of `stain_seed`: the stain of a slide of
    that seed without a site, OD vectors float32 [2, 3] (H, E) times intensity, white level [3]."""
    return _stain(np.random.default_rng(np.random.SeedSequence(stain_seed).spawn(8)[0]))


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
        tissue_field = synthetic_fields.tissue_field(r_tissue, *grid)
        tissue_g = _top_fraction(tissue_field, np.ones(grid, bool), r_tissue.uniform(0.34, 0.5))
    motif_field = synthetic_fields.noise(r_regions, grid, 180 / _GRID_UM)
    motif_g = _top_fraction(motif_field, tissue_g,
                            r_regions.uniform(*spec.motif_fraction) * spec.positive)
    tissue = np.full(shape, fill)
    motif = np.zeros(shape, bool)
    if tissue_g.any() and not fill:
        tissue = synthetic_fields.upsample(tissue_field, shape) >= tissue_field[tissue_g].min()
    if motif_g.any():
        motif_level0 = synthetic_fields.upsample(motif_field, shape)
        motif = tissue & (motif_level0 >= motif_field[motif_g].min())
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
    mucosa_g = _top_fraction(synthetic_fields.noise(r_regions, grid, cell(200)), tissue_g,
                             r_regions.uniform(0.2, 0.4)) & ~motif_g
    pale = np.clip(0.8 + 0.35 * synthetic_fields.noise(r_regions, grid, cell(120)), 0.25, 1.25)
    cellular = np.clip(0.55 + 0.3 * synthetic_fields.noise(r_regions, grid, cell(80)), 0.1, 1.0)
    mix = np.clip(0.5 + 0.8 * synthetic_fields.noise(r_regions, grid, cell(150)), 0, 1)
    warp = 25 * px * synthetic_fields.noise(r_regions, grid, cell(120))

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
    mix, warp = synthetic_fields.upsample(mix, shape), synthetic_fields.upsample(warp, shape)
    fibres = _fibres(r_texture, warp, px, theta)
    other = _fibres(r_texture, warp, px, theta + r_texture.uniform(1.0, 2.1))
    fibres -= other
    fibres *= mix
    fibres += other  # mix of the two fibre directions
    contrast = synthetic_fields.noise(r_texture, shape, 10 * px)
    contrast *= 0.5
    contrast += 0.7
    fibres *= np.clip(contrast, 0, 1, out=contrast)
    fibres += 1
    grain = synthetic_fields.noise(r_texture, shape, 0.8 * px)
    epithelium, lumen = _soften(epithelium, 1.2 * px, 1.0), _soften(lumen, 1.2 * px, 1.0)
    eosin = synthetic_fields.upsample(pale, shape) * fibres
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


def _layout(spec: SyntheticSlideSpec, streams, tissue_g) -> ArtifactLayout:
    """The artifacts of `spec` on its tissue grid tissue_g [gh, gw], from the slide's streams."""
    rngs = {name: np.random.default_rng(streams[i]) for name, i in _ARTIFACT_STREAMS.items()}
    return synthetic_artifacts.place_artifacts(spec.artifacts, rngs, tissue_g,
                                               (spec.height, spec.width), 1.0 / spec.mpp)


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
    return {'tissue': tissue, 'motif': motif,
            **synthetic_artifacts.layout_masks(layout, tissue, 1.0 / spec.mpp)}
