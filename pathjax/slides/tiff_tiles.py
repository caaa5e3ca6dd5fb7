"""Direct tile decoding for slides stored as tiled TIFF pyramids (numpy + tifffile).

For generic tiled TIFF, Aperio SVS and the other TIFF-based formats OpenSlide reads, decoding a
region's tiles straight from the file (`os.pread` + tifffile's codecs, libjpeg-turbo for JPEG)
skips OpenSlide's per-call compositing and colour conversion, which cost more than the JPEG
decode itself. The fast path is used only when every OpenSlide level maps to one tiled RGB page
whose tile table matches its tags, and a decoded probe tile per level equals what OpenSlide
returns; otherwise (or if the probe fails in any way) `open` returns None and the caller keeps
reading through OpenSlide. The probe's verdict is kept per file (its device, inode, size and
modification time) for the life of the process: every reader thread opens every slide, and
the probe costs 10 ms, a tenth of a small biopsy's reading. Regions are read at integer
level-pixel positions (OpenSlide's sub-pixel placement on levels with a non-integer downsample
is not reproduced).

8-bit JPEG tiles are decoded by libjpeg-turbo into one reused buffer per thread and copied from
there straight into the caller's arrays (a fresh 196 KiB array per 256-px tile costs its page
faults: a third of the decode time). The buffer starts DECODE_MISALIGNMENT bytes past a 32-byte
boundary: libjpeg-turbo's SIMD colour conversion writes an aligned output with non-temporal
stores, which bypass the cache the copy then reads from (a 32-byte aligned buffer decodes 27%
fewer tiles per second on Zen 5). Each copy can carry a pixelwise map (the stain transform), so
a patch's pixels are written once, from a tile still in cache.
"""

import os
import threading
import time
from typing import Callable

import imagecodecs
import numpy as np
import tifffile
from absl import logging

PROBE_TOLERANCE = 2.0  # mean absolute difference (grey levels) allowed against OpenSlide
PROBE_SIDE = 512  # most pixels of a probe tile compared, per side
WHITE = 255


READ_ATTEMPTS = 3  # reads of a tile's bytes before a read error is final
RETRY_SECONDS = 0.5  # wait before the second read; twice that before the third
JPEG = 7  # the TIFF compression tag's value for JPEG
DECODE_MISALIGNMENT = 8  # bytes past a 32-byte boundary (16 is SSE2's non-temporal alignment)
_PROBED: dict[tuple[int, ...], bool] = {}  # file identity -> whether its tiles agree with OpenSlide

# copy(pixels uint8 [h, w, 3], out uint8 [h, w, 3]): writes pixels, mapped or not, into out.
Copy = Callable[[np.ndarray, np.ndarray], None]


def plain_copy(pixels: np.ndarray, out: np.ndarray) -> None:
    """The Copy that maps nothing."""
    out[...] = pixels


class CorruptTileError(Exception):
    """A tile whose bytes are missing from the file, cannot be read, or do not decode."""


class TiffTiles:
    """Reads regions of a tiled TIFF pyramid by decoding its tiles. Thread-safe."""

    def __init__(self, path: str, pages: list):
        self._pages = pages
        self._jpeg = [_jpeg_colorspaces(page) for page in pages]  # None: decode through tifffile
        self._buffers = threading.local()  # each thread's decode buffer per tile shape
        self._fd = os.open(path, os.O_RDONLY)

    @classmethod
    def open(cls, path: str, openslide_handle) -> 'TiffTiles | None':
        """The fast path for `path`, or None when it does not apply (logged at debug level)."""
        try:
            stat = os.stat(path)
            identity = (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)
            if _PROBED.get(identity) is False:
                return None
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
        if identity not in _PROBED:
            try:
                _PROBED[identity] = tiles._agrees_with(openslide_handle)
            except Exception as error:  # a damaged probe tile, or tags that disagree with tiles
                logging.warning('%s: probing the direct tile path failed (%s: %s); reading the '
                                'slide through OpenSlide', path, type(error).__name__, error)
                _PROBED[identity] = False
                tiles.close()
                return None
        if not _PROBED[identity]:
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
        out = np.empty((1, height, width, 3), np.uint8)
        self.read_row(level, x, y, out)
        return out[0]

    def read_row(self, level: int, x: int, y: int, out: np.ndarray, copy: Copy = plain_copy
                 ) -> None:
        """Fills out, uint8 [n, h, w, 3], with n regions of `level` side by side: out[j] is the
        one with top-left (x + j w, y) in the level's pixels. Every pixel goes through
        `copy(tile pixels, out pixels)` (each tile is decoded once); pixels outside the level
        (or in missing tiles) are white, mapped the same way."""
        page = self._pages[level]
        tile_w, tile_h = page.tilewidth, page.tilelength
        tiles_across = -(-page.imagewidth // tile_w)
        count, height, width = out.shape[:3]
        x0, y0 = max(x, 0), max(y, 0)
        x1, y1 = min(x + count * width, page.imagewidth), min(y + height, page.imagelength)
        if (x0, y0, x1, y1) != (x, y, x + count * width, y + height):
            mapped_white = np.empty((1, 1, 3), np.uint8)
            copy(np.full((1, 1, 3), WHITE, np.uint8), mapped_white)
            out[...] = mapped_white  # under the tiles' pixels
        for row in range(y0 // tile_h, -(-y1 // tile_h)):
            for col in range(x0 // tile_w, -(-x1 // tile_w)):
                top, left = row * tile_h, col * tile_w
                ty0, tx0 = max(y0, top), max(x0, left)
                ty1, tx1 = min(y1, top + tile_h), min(x1, left + tile_w)
                tile = self._tile(level, row * tiles_across + col)
                if tile is None:  # a missing tile is white
                    tile = np.full((tile_h, tile_w, 3), WHITE, np.uint8)
                for j in range(max(0, (tx0 - x) // width), min(count, -(-(tx1 - x) // width))):
                    a, b = max(tx0, x + j * width), min(tx1, x + (j + 1) * width)
                    copy(tile[ty0 - top:ty1 - top, a - left:b - left],
                         out[j, ty0 - y:ty1 - y, a - x - j * width:b - x - j * width])

    def _tile(self, level: int, index: int) -> np.ndarray | None:
        """Tile `index` of `level` as uint8 [tile_h, tile_w, 3] (`decode`), or None if it is
        missing from the file."""
        page = self._pages[level]
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        return self.decode(level, index, self._pread(count, offset))

    def decode(self, level: int, index: int, data: bytes) -> np.ndarray:
        """Tile `index` of `level` from its bytes: uint8 [tile_h, tile_w, 3]. A JPEG tile is this
        thread's decode buffer, valid until its next decode."""
        page, count = self._pages[level], self._pages[level].databytecounts[index]
        if len(data) == count and self._jpeg[level] is not None:
            colorspace, outcolorspace = self._jpeg[level]
            buffer = self._buffer((page.tilelength, page.tilewidth, page.samplesperpixel))
            try:
                tile = imagecodecs.jpeg8_decode(data, tables=page.jpegtables, out=buffer,
                                                colorspace=colorspace, outcolorspace=outcolorspace)
                if tile.shape == buffer.shape:
                    return tile[..., :3]
            except Exception:  # a tile of another shape, or corrupt: tifffile decides below
                pass
        try:
            if len(data) < count:
                raise ValueError(f'short read, {len(data)} of {count} bytes')
            tile, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
        except Exception as error:  # codecs raise their own error types
            raise CorruptTileError(f'tile {index} of TIFF page {page.index} is truncated or '
                                   f'corrupt ({error})') from None
        return tile.reshape(tile.shape[-3:])[..., :3]

    def _buffer(self, shape: tuple[int, int, int]) -> np.ndarray:
        """This thread's reused uint8 decode buffer of `shape`, DECODE_MISALIGNMENT bytes past a
        32-byte boundary."""
        buffers = self._buffers.__dict__
        if shape not in buffers:
            buffers[shape] = misaligned_buffer(shape)
        return buffers[shape]

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


def misaligned_buffer(shape: tuple[int, ...]) -> np.ndarray:
    """An uninitialized uint8 array of `shape` starting DECODE_MISALIGNMENT bytes past a 32-byte
    boundary."""
    size = int(np.prod(shape))
    memory = np.empty(size + 64, np.uint8)
    start = (DECODE_MISALIGNMENT - memory.ctypes.data) % 32
    return memory[start:start + size].reshape(shape)


def _jpeg_colorspaces(page) -> tuple | None:
    """(colorspace, outcolorspace) for `imagecodecs.jpeg8_decode` of the page's tiles, as
    tifffile passes them; None for a page that is not 8-bit JPEG (tifffile decodes it)."""
    if page.compression != JPEG or page.bitspersample != 8:
        return None
    return tifffile.tifffile.jpeg_decode_colorspace(page.photometric, page.planarconfig,
                                                   page.extrasamples, page.is_jfif)


def _usable(page) -> bool:
    """A tiled RGB(A) uint8 page whose tile table holds one entry per tile of its grid."""
    if not (page.is_tiled and page.samplesperpixel in (3, 4) and page.dtype == np.uint8
            and page.planarconfig == 1 and page.imagedepth == 1):
        return False
    tiles = -(-page.imagewidth // page.tilewidth) * -(-page.imagelength // page.tilelength)
    return len(page.dataoffsets) == len(page.databytecounts) == tiles
