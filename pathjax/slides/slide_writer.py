"""Writes an RGB image as a JPEG-tiled pyramid that OpenSlide opens (FORMATS): a generic tiled
TIFF or an Aperio-style SVS, from the image in memory (`write_slide`) or band by band from a
function of its rows (`write_streamed_slide`, for slides too large to hold)."""

import dataclasses
import pathlib
import tempfile
from typing import Any, Callable, Iterator

import numpy as np
import tifffile
from PIL import Image

from pathjax import artifacts as artifacts_lib

FORMATS = ('tiff', 'svs')


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
