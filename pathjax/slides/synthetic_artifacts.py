"""Artifacts drawn on a rendered synthetic slide, each with its known level-0 mask (ARTIFACTS):
'fold', 1-2 flaps of tissue folded over a crease, where the optical densities of the two layers
add; 'pen', 1-3 blue, green or black marker strokes, a translucent dye over tissue and glass;
'blur', 1-2 out-of-focus regions blurred with sigma 3-6 um.

`place_artifacts` lays them out over a slide's coarse tissue grid, `draw_artifacts` draws a
layout on the image, `layout_masks` gives a layout's masks without drawing. Which seed streams
they come from, and the slide they go on, are `synthetic`'s (`render_slide`, `artifact_layout`,
`artifact_masks`).
"""

import dataclasses
import math

import cv2
import numpy as np

from pathjax.slides import synthetic_fields

ARTIFACTS = ('pen', 'blur', 'fold')

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
        variation = synthetic_fields.noise(np.random.default_rng(stroke.noise_seed),
                                           alpha.shape, max(1.5 * stroke.width, 4.0))
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
        region += 0.35 * synthetic_fields.noise(rng, grid, max(size / 3, 2.0))
        field = np.maximum(field, region)
    inside = tissue_g if tissue_g.any() else np.ones(grid, bool)
    return BlurRegion(field, float(np.quantile(field[inside], 1 - share)), float(sigma))


def _blur_weight(region: BlurRegion, shape, px):
    """(y0, y1, x0, x1, weight float32 [y1 - y0, x1 - x0]) or None: the region's share of the
    full blur, 1 inside, smoothly 0 (a Gaussian edge of _BLUR_EDGE_UM) outside."""
    hard = synthetic_fields.upsample(region.field, shape) >= region.threshold
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


def place_artifacts(names, rngs, tissue_g, shape, px) -> ArtifactLayout:
    """The layout of the artifacts `names` (any of ARTIFACTS) on a slide of level-0 `shape`
    (h, w) with `px` pixels per micron and tissue on the cells of tissue_g (bool [gh, gw], the
    slide's 8-um grid); each drawn from its own generator, rngs[name]."""
    return ArtifactLayout(
        pen=_pen_strokes(rngs['pen'], tissue_g, shape) if 'pen' in names else (),
        blur=_blur_region(rngs['blur'], tissue_g, px) if 'blur' in names else None,
        folds=_folds(rngs['fold'], tissue_g, shape, px) if 'fold' in names else ())


def draw_artifacts(image, layout: ArtifactLayout, tissue, white, px) -> dict[str, np.ndarray]:
    """Draws the layout on image (uint8 [h, w, 3], in place; tissue bool [h, w], white level
    [3], px pixels per micron): folds (in the tissue), then pen (on the cover glass), then blur
    (the scanner's focus); returns the mask of each artifact drawn, bool [h, w]."""
    masks = {}
    if layout.folds:
        masks['fold'] = _draw_folds(image, layout.folds, tissue, white)
    if layout.pen:
        masks['pen'] = _draw_pen(image, layout.pen)
    if layout.blur is not None:
        masks['blur'] = _draw_blur(image, layout.blur, px)
    return masks


def layout_masks(layout: ArtifactLayout, tissue, px) -> dict[str, np.ndarray]:
    """The masks `draw_artifacts` returns, without drawing: bool [h, w] for each artifact of the
    layout, given the slide's tissue mask bool [h, w] and px pixels per micron."""
    masks, shape = {}, tissue.shape
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
