"""Direct tile decoding for slides stored as tiled TIFF pyramids (numpy + tifffile).

For generic tiled TIFF, Aperio SVS and the other TIFF-based formats OpenSlide reads, decoding a
region's tiles straight from the file (`os.pread` + tifffile's codecs, libjpeg-turbo for JPEG)
skips OpenSlide's per-call compositing and colour conversion, which cost more than the JPEG
decode itself. The fast path is used only when every OpenSlide level maps to one tiled RGB page
whose tile table matches its tags, and a decoded probe tile per level equals what OpenSlide
returns; otherwise (or if the probe fails in any way) `open` returns None and the caller keeps
reading through OpenSlide. Regions are read at integer level-pixel positions
(OpenSlide's sub-pixel placement on levels with a non-integer downsample is not reproduced).
"""

import os
import time

import numpy as np
import tifffile
from absl import logging

PROBE_TOLERANCE = 2.0  # mean absolute difference (grey levels) allowed against OpenSlide
PROBE_SIDE = 512  # most pixels of a probe tile compared, per side
WHITE = 255


READ_ATTEMPTS = 3  # reads of a tile's bytes before a read error is final
RETRY_SECONDS = 0.5  # wait before the second read; twice that before the third


class CorruptTileError(Exception):
    """A tile whose bytes are missing from the file, cannot be read, or do not decode."""


class TiffTiles:
    """Reads regions of a tiled TIFF pyramid by decoding its tiles. Thread-safe."""

    def __init__(self, path: str, pages: list):
        self._pages = pages
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str, openslide_handle) -> 'TiffTiles | None':
        """The fast path for `path`, or None when it does not apply (logged at debug level)."""
        try:
            with tifffile.TiffFile(path) as tiff:
                by_size = {}
                for page in tiff.pages:
                    by_size.setdefault((page.imagewidth, page.imagelength), []).append(page)
                pages = []
                for size in openslide_handle.level_dimensions:
                    candidates = [p for p in by_size.get(size, []) if _usable(p)]
                    if len(candidates) != 1:
                        return None
                    pages.append(candidates[0])
                for page in pages:
                    page.decode  # a cached property that needs the file open the first time
                tiles = cls(path, pages)
        except Exception as error:  # not a TIFF, or a layout tifffile cannot parse
            logging.debug('%s: no direct tile path (%s)', path, error)
            return None
        try:
            agrees = tiles._agrees_with(openslide_handle)
        except Exception as error:  # a damaged probe tile, or tags that disagree with the tiles
            logging.warning('%s: probing the direct tile path failed (%s: %s); reading the slide '
                            'through OpenSlide', path, type(error).__name__, error)
            tiles.close()
            return None
        if not agrees:
            logging.debug('%s: decoded tiles differ from OpenSlide; using OpenSlide', path)
            tiles.close()
            return None
        return tiles

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def read(self, level: int, x: int, y: int, width: int, height: int) -> np.ndarray:
        """Region of `level` with top-left (x, y) in that level's pixels: uint8 [height, width, 3];
        pixels outside the level (or in missing tiles) are white."""
        page = self._pages[level]
        tile_w, tile_h = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tile_w)
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + width, page.imagewidth), min(y + height, page.imagelength)
        inside = (x0, y0, x1, y1) == (x, y, x + width, y + height)
        # Inside the level every pixel comes from a tile (or a missing tile's white): no fill.
        out = np.empty((height, width, 3), np.uint8) if inside else np.full(
            (height, width, 3), WHITE, np.uint8)
        if x1 <= x0 or y1 <= y0:
            return out
        for row in range(y0 // tile_h, -(-y1 // tile_h)):
            for col in range(x0 // tile_w, -(-x1 // tile_w)):
                top, left = row * tile_h, col * tile_w
                ty0, tx0 = max(y0, top), max(x0, left)
                ty1, tx1 = min(y1, top + tile_h), min(x1, left + tile_w)
                tile = self._decode(page, row * tiles_across + col)
                out[ty0 - y:ty1 - y, tx0 - x:tx1 - x] = WHITE if tile is None else tile[
                    ty0 - top:ty1 - top, tx0 - left:tx1 - left]
        return out

    def _decode(self, page, index: int) -> np.ndarray | None:
        """Tile `index` of `page` as uint8 [tile_h, tile_w, 3], or None if it is missing."""
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        data = self._pread(count, offset)
        try:
            if len(data) < count:
                raise ValueError(f'short read, {len(data)} of {count} bytes')
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # codecs raise their own error types
            raise CorruptTileError(f'tile {index} of TIFF page {page.index} is truncated or '
                                   f'corrupt ({error})') from None
        return tile.reshape(tile.shape[-3:])[..., :3]

    def _pread(self, count: int, offset: int) -> bytes:
        """The file's bytes at offset; a read error (EIO on a network filesystem, say) is retried
        READ_ATTEMPTS times before it becomes a CorruptTileError."""
        for attempt in range(1, READ_ATTEMPTS + 1):
            try:
                return os.pread(self._fd, count, offset)
            except OSError as error:
                if attempt == READ_ATTEMPTS:
                    raise CorruptTileError(f'reading {count} bytes at offset {offset} failed '
                                           f'{READ_ATTEMPTS} times ({error})') from None
                logging.warning('read error at offset %d (%s); retrying', offset, error)
                time.sleep(RETRY_SECONDS * attempt)

    def _agrees_with(self, openslide_handle) -> bool:
        """Decodes the centre tile of each level (its top-left PROBE_SIDE pixels at most) and
        compares it with OpenSlide: pixel by pixel on level 0, by channel means on the others
        (OpenSlide places regions of levels with a non-integer downsample at sub-pixel offsets,
        which moves pixels but not colours)."""
        for level, page in enumerate(self._pages):
            width = min(page.tilewidth, page.imagewidth, PROBE_SIDE)
            height = min(page.tilelength, page.imagelength, PROBE_SIDE)
            x = min(page.imagewidth // 2 // page.tilewidth * page.tilewidth, page.imagewidth - width)
            y = min(page.imagelength // 2 // page.tilelength * page.tilelength,
                    page.imagelength - height)
            ours = self.read(level, x, y, width, height).astype(np.float32)
            downsample = openslide_handle.level_downsamples[level]
            region = np.asarray(openslide_handle.read_region(
                (int(round(x * downsample)), int(round(y * downsample))), level, (width, height)))
            theirs = np.where(region[..., 3:] == 0, WHITE, region[..., :3]).astype(np.float32)
            if level == 0:
                difference = np.abs(ours - theirs).mean()
            else:
                difference = np.abs(ours.mean(axis=(0, 1)) - theirs.mean(axis=(0, 1))).max()
            if difference > PROBE_TOLERANCE:
                return False
        return True

def _usable(page) -> bool:
    """A tiled RGB(A) uint8 page whose tile table holds one entry per tile of its grid."""
    if not (page.is_tiled and page.samplesperpixel in (3, 4) and page.dtype == np.uint8
            and page.planarconfig == 1 and page.imagedepth == 1):
        return False
    tiles = -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    return len(page.dataoffsets) == len(page.databytecounts) == tiles
