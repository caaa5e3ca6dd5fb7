"""Whole-slide image reading through OpenSlide, at a target resolution (numpy only).

`Slide` opens any format OpenSlide opens and turns its pyramid into a `ReadPlan`: which level to
read patches from and how many level pixels one output patch covers, so that patches come out at
`target_mpp` microns per pixel (or, without usable mpp metadata, at a fixed level, with a warning).
Regions of tiled TIFF pyramids are decoded directly (`tiff_tiles`), other formats through OpenSlide.
"""

import dataclasses
import math
import os

import cv2
import numpy as np
import openslide
from PIL import Image

from pathjax.slides.tiff_tiles import Copy, CorruptTileError, TiffTiles, plain_copy

# Resolutions outside this range are metadata defaults (a TIFF's 72 dpi gives 352.8 um/px), not
# microscope resolutions; they are treated as missing.
PLAUSIBLE_MPP = (0.05, 50.0)
# A level is used for a target resolution when it is at most this much coarser than the target,
# and a read within this relative size of the patch is not resized (0.499 um/px reads as 0.5).
RESOLUTION_TOLERANCE = 0.02
# Bounds on reading a whole slide at low resolution (`Slide.read_overview`), whatever size it
# declares: the overview holds at most OVERVIEW_PIXELS (64 Mpx, 192 MiB of RGB) and is read, in
# blocks of bounded size, from a level of at most OVERVIEW_SOURCE_PIXELS (1 Gpx: about 10 s of
# JPEG decoding on the direct tile path, a minute or two through OpenSlide), coarser than asked
# where needed. A slide whose every level is larger (a huge level 0 without a pyramid) is refused.
OVERVIEW_PIXELS = 1 << 26
OVERVIEW_SOURCE_PIXELS = 1 << 30
# A slide declaring larger tiles is refused: OpenSlide allocates a whole tile per read (4 bytes a
# pixel, 256 MiB here) and aborts the process when that allocation fails.
MAX_TILE_PIXELS = 1 << 26


class SlideError(Exception):
    """A slide file that is missing, not a slide, or unreadable."""


@dataclasses.dataclass(frozen=True)
class ReadPlan:
    """How patches of `patch_size` output pixels are read from one slide.

    Attributes:
      level: pyramid level patches are read from.
      read_size: side of the square region read at `level`, in level pixels.
      patch_size: side of the output patch (resized from `read_size` when they differ).
      extent: side of a patch in level-0 pixels (the grid step of the tiling).
      mpp: microns per output pixel (within RESOLUTION_TOLERANCE of the target), or None when
        the slide has no usable mpp.
      warnings: what the user should know about this plan (fallbacks, upsampling).
    """

    level: int
    read_size: int
    patch_size: int
    extent: float
    mpp: float | None
    warnings: tuple[str, ...] = ()


class Slide:
    """An open whole-slide image. Use as a context manager, or call `close()`. `mpp` (microns
    per level-0 pixel, e.g. a manifest's) overrides the slide's metadata."""

    def __init__(self, path: str | os.PathLike, mpp: float | None = None):
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise SlideError(f'{self.path}: file not found')
        try:
            self._slide = openslide.OpenSlide(self.path)
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(f'{self.path}: not a slide OpenSlide can open (unknown format, or a '
                             'truncated or corrupt file)') from None
        except (openslide.OpenSlideError, OSError) as error:
            raise SlideError(f'{self.path}: unreadable slide ({error})') from None
        try:
            self.dimensions: tuple[int, int] = self._slide.dimensions  # level-0 (width, height)
            self.level_dimensions: tuple[tuple[int, int], ...] = self._slide.level_dimensions
            self.level_downsamples: tuple[float, ...] = self._slide.level_downsamples
            self.mpp, self.mpp_problem = (mpp, '') if mpp else _level0_mpp(self._slide.properties)
            _check_tile_sizes(self._slide.properties, len(self.level_dimensions))
            self._tiles = TiffTiles.open(self.path, self._slide)
        except (openslide.OpenSlideError, OSError, ValueError) as error:
            self._slide.close()
            raise SlideError(f'{self.path}: unreadable slide ({error})') from None

    def __enter__(self) -> 'Slide':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self._tiles is not None:
            self._tiles.close()
        self._slide.close()

    def plan(self, target_mpp: float, patch_size: int, fallback_level: int = 0) -> ReadPlan:
        """The level and read size that give `patch_size`-pixel patches at `target_mpp`."""
        if self.mpp is None:
            level = min(max(fallback_level, 0), len(self.level_downsamples) - 1)
            return ReadPlan(level, patch_size, patch_size, patch_size * self.level_downsamples[level],
                            mpp=None, warnings=(f'{self.mpp_problem}: patches are read at level {level} '
                                                f'(downsample {self.level_downsamples[level]:.3g}) '
                                                'without resizing',))
        level_mpps = [self.mpp * d for d in self.level_downsamples]
        usable = [i for i, m in enumerate(level_mpps) if m <= target_mpp * (1 + RESOLUTION_TOLERANCE)]
        warnings = ()
        if usable:
            level = max(usable, key=lambda i: level_mpps[i])
        else:
            level = 0
            warnings = (f'the finest level ({self.mpp:.3g} um/px) is coarser than tile.mpp '
                        f'({target_mpp:g} um/px): patches are upsampled',)
        read_size = max(1, int(round(patch_size * target_mpp / level_mpps[level])))
        if abs(read_size / patch_size - 1) <= RESOLUTION_TOLERANCE:
            read_size = patch_size
        return ReadPlan(level, read_size, patch_size, read_size * self.level_downsamples[level],
                        mpp=level_mpps[level] * read_size / patch_size, warnings=warnings)

    def read_region(self, x: int, y: int, level: int, width: int, height: int) -> np.ndarray:
        """The region with level-0 top-left (x, y), `width` x `height` level pixels, as uint8
        [height, width, 3]; transparent (unscanned) pixels become white."""
        out = np.empty((1, int(height), int(width), 3), np.uint8)
        self.read_row(x, y, level, out)
        return out[0]

    def read_row(self, x: int, y: int, level: int, out: np.ndarray, copy: Copy = plain_copy
                 ) -> None:
        """Fills out, uint8 [n, h, w, 3], with n regions of `level` side by side: out[j] is the
        one whose level-0 top-left is (x + j w downsample, y), each pixel written through
        `copy(pixels, out pixels)` (a pixelwise map, e.g. the stain's); transparent (unscanned)
        pixels become white."""
        count, height, width = out.shape[:3]
        if not 0 <= level < len(self.level_downsamples):
            raise SlideError(f'{self.path}: no level {level} (the slide has '
                             f'{len(self.level_downsamples)})')
        if self._tiles is not None:
            downsample = self.level_downsamples[level]
            try:
                return self._tiles.read_row(level, int(round(x / downsample)),
                                            int(round(y / downsample)), out, copy)
            except CorruptTileError as error:
                raise SlideError(f'{self.path}: {error}') from None
        try:
            region = self._slide.read_region((int(x), int(y)), level, (count * width, height))
        except openslide.OpenSlideError as error:
            raise SlideError(f'{self.path}: read failed at ({x}, {y}) level {level} ({error})') from None
        region = rgba_to_rgb(np.asarray(region))
        for j in range(count):
            copy(region[:, j * width:(j + 1) * width], out[j])

    def read_patch(self, x: int, y: int, plan: ReadPlan) -> np.ndarray:
        """One patch at level-0 top-left (x, y): uint8 [patch_size, patch_size, 3]."""
        region = self.read_region(x, y, plan.level, plan.read_size, plan.read_size)
        return resize(region, plan.patch_size)

    def overview_downsample(self, wanted: float) -> float:
        """The downsample from level 0 that `read_overview(wanted)` reads at: `wanted` (at least
        1), or coarser so that the overview holds at most about OVERVIEW_PIXELS pixels and is
        read from a level of at most OVERVIEW_SOURCE_PIXELS pixels.

        Raises:
          SlideError: every level has more than OVERVIEW_SOURCE_PIXELS pixels (a huge slide
            without a pyramid).
        """
        return self._overview_level(wanted)[1]

    def _overview_level(self, wanted: float) -> tuple[int, float]:
        """(the level an overview at about `wanted` x level 0 is read from, its downsample)."""
        width0, height0 = self.dimensions
        downsample = max(wanted, 1.0, math.sqrt(width0 * height0 / OVERVIEW_PIXELS),
                         max(width0, height0) / OVERVIEW_PIXELS)  # the latter: a thin slide
        level = self._slide.get_best_level_for_downsample(downsample)
        pixels = [width * height for width, height in self.level_dimensions]
        if pixels[level] > OVERVIEW_SOURCE_PIXELS:
            small = [i for i, n in enumerate(pixels) if n <= OVERVIEW_SOURCE_PIXELS]
            if not small:
                width, height = self.level_dimensions[-1]
                raise SlideError(
                    f'{self.path}: level 0 is {width0}x{height0} px and no level is small enough '
                    f'for an overview (the tissue mask): the coarsest, level {len(pixels) - 1} '
                    f'({width}x{height} px), would decode {pixels[-1] / 1e9:,.1f} Gpx '
                    f'({3 * pixels[-1] / 2**30:,.1f} GiB of RGB), more than the '
                    f'{OVERVIEW_SOURCE_PIXELS / 1e9:.2f} Gpx bound; a slide this large needs a '
                    'pyramid')
            level = max(small, key=lambda i: pixels[i])
            downsample = max(downsample, self.level_downsamples[level])
        return level, downsample

    def read_overview(self, downsample: float, strip_pixels: int = 1 << 22) -> tuple[np.ndarray, float]:
        """The whole slide at about `overview_downsample(downsample)` x level 0, read from the
        finest level that allows, in blocks of about `strip_pixels` level pixels (whole rows
        where they fit) so memory stays bounded; each block is resized with its exact source
        box, so blocks join seamlessly.

        Returns:
          (uint8 [H, W, 3] with H x W <= about OVERVIEW_PIXELS, the actual downsample from
          level 0, averaged over both axes).
        Raises:
          SlideError: as `overview_downsample`, or a read fails.
        """
        level, downsample = self._overview_level(downsample)
        width0, height0 = self.dimensions
        out_width = max(1, int(round(width0 / downsample)))
        out_height = max(1, int(round(height0 / downsample)))
        level_width, level_height = self.level_dimensions[level]
        level_downsample = self.level_downsamples[level]
        scale_x, scale_y = level_width / out_width, level_height / out_height  # level px per out px
        if level_width * scale_y <= strip_pixels:  # whole rows
            rows_per_block = max(1, int(strip_pixels / level_width / scale_y))
            cols_per_block = out_width
        else:
            rows_per_block = 1
            cols_per_block = max(1, int(strip_pixels / scale_x / scale_y))
        strips = []
        for out_row in range(0, out_height, rows_per_block):
            out_rows = min(rows_per_block, out_height - out_row)
            top, bottom = out_row * scale_y, (out_row + out_rows) * scale_y
            first_row, last_row = int(math.floor(top)), min(int(math.ceil(bottom)), level_height)
            blocks = []
            for out_col in range(0, out_width, cols_per_block):
                out_cols = min(cols_per_block, out_width - out_col)
                left, right = out_col * scale_x, (out_col + out_cols) * scale_x
                first_col, last_col = int(math.floor(left)), min(int(math.ceil(right)), level_width)
                block = self.read_region(int(round(first_col * level_downsample)),
                                         int(round(first_row * level_downsample)), level,
                                         last_col - first_col, last_row - first_row)
                box = (left - first_col, top - first_row, right - first_col, bottom - first_row)
                blocks.append(np.asarray(Image.fromarray(block).resize(
                    (out_cols, out_rows), Image.Resampling.BOX, box=box)))
            strips.append(np.concatenate(blocks, axis=1))
        overview = np.concatenate(strips)
        return overview, (width0 / overview.shape[1] + height0 / overview.shape[0]) / 2


def _level0_mpp(properties) -> tuple[float | None, str]:
    """(mpp, '') from the slide's metadata, or (None, why it is unusable)."""
    try:
        mpp_x = float(properties[openslide.PROPERTY_NAME_MPP_X])
        mpp_y = float(properties[openslide.PROPERTY_NAME_MPP_Y])
    except (KeyError, ValueError):
        return None, 'no mpp metadata'
    mpp = math.sqrt(mpp_x * mpp_y)
    if not PLAUSIBLE_MPP[0] <= mpp <= PLAUSIBLE_MPP[1]:
        return None, f'implausible mpp metadata ({mpp:.4g} um/px)'
    return mpp, ''


def _check_tile_sizes(properties, levels: int) -> None:
    """Raises ValueError if a level declares tiles of more than MAX_TILE_PIXELS pixels."""
    for level in range(levels):
        width = int(properties.get(f'openslide.level[{level}].tile-width', 0))
        height = int(properties.get(f'openslide.level[{level}].tile-height', 0))
        if width * height > MAX_TILE_PIXELS:
            raise ValueError(f'level {level} declares tiles of {width}x{height} px, more than '
                             f'the {MAX_TILE_PIXELS / 2**20:.0f} Mpx a tile may have')


def rgba_to_rgb(rgba: np.ndarray) -> np.ndarray:
    """uint8 [H, W, 4] (not premultiplied) -> uint8 [H, W, 3] over a white background. Only
    partly transparent pixels are blended: OpenSlide's are opaque, or transparent (unscanned)."""
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() == 255:
        return np.ascontiguousarray(rgb)
    out = np.where(alpha == 0, np.uint8(255), rgb)
    partial = ((alpha != 0) & (alpha != 255))[..., 0]  # [H, W]
    if partial.any():
        weight = alpha[partial].astype(np.uint16)  # [P, 1]
        out[partial] = (rgb[partial] * weight + 255 * (255 - weight) + 127) // 255
    return out


def resize(image: np.ndarray, size: int) -> np.ndarray:
    """Square uint8 [S, S, 3] image -> [size, size, 3]: shrinking, the exact area average
    rounded (OpenCV's INTER_AREA: 0.1 ms from 1024 to 512 px, where PIL's BOX takes 3.3 ms and,
    at ratios that are not whole numbers, weighs each source pixel all or nothing); enlarging,
    PIL's bicubic."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    if image.shape[0] > size:
        return cv2.resize(image, (size, size), interpolation=cv2.INTER_AREA)
    return np.asarray(Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC))
