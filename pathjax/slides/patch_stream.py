"""Batches of stain-normalized uint8 patches streamed from slides by coordinates (numpy only).

Reading is the I/O floor of the method, so the stream
- merges patches that are neighbours on a grid row into one read (each JPEG tile on a shared
  border is decoded once, and the per-call overhead is paid once per run of patches);
- reads those runs in a pool of threads, each with its own slide handle (libjpeg-turbo,
  OpenSlide, PIL's resizing and OpenCV's lookup release the GIL, so threads decode in parallel);
- writes each run straight into its place in the batch, through the stain transform, from the
  decoded tile (no region in between, no copy on the consumer's thread);
- keeps a bounded number of runs in flight ahead of the consumer, and yields patches in the
  order of the coordinates;
- over several slides (`stream`), runs its batches on from one slide into the next, reading
  ahead across the border, so only the last batch is short and a slide of a few patches does
  not cost a batch.
A consumer that can apply the histogram's lookup table itself (the extractor does, on the
device, fused into the network's input normalization) asks for `defer_lut`: the reader then
only decodes and copies, and each batch carries the table (each row its own slide's).
"""

import collections
import concurrent.futures
import dataclasses
import threading
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from pathjax.slides.reader import Slide, SlideError, resize
from pathjax.slides.stain import IDENTITY_LUT
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.tiff_tiles import Copy, plain_copy

MAX_RUN = 4  # patches merged into one region read
MAX_PATCH_SIZE = 4096  # px: a larger patch in a tiles file is damage, not a plan
MAX_READ_RATIO = 32  # read_size / patch_size: 0.125 um/px level 0 read for 4 um/px patches


@dataclasses.dataclass(frozen=True)
class SlidePatches:
    """Where one slide's patches are and how to read them (from its tiles file).

    Attributes:
      slide_id: the manifest's id.
      path: the slide file.
      coords: int64 [N, 2], level-0 (x, y) of each patch's top-left corner.
      level, read_size, patch_size: the read plan (see `reader.ReadPlan`).
      stain: the slide's stain transform.
      downsample: of `level` from level 0.
    """

    slide_id: str
    path: str
    coords: np.ndarray
    level: int
    read_size: int
    patch_size: int
    stain: SlideStain
    downsample: float

    @classmethod
    def from_tiles(cls, slide_id: str, path: str, tiles: dict[str, np.ndarray]) -> 'SlidePatches':
        """From the arrays of the slide's tiles file. ValueError for a damaged one: a stain
        transform that is not one, coordinates that are not [N, 2] integers, or a read plan
        whose sizes are out of bounds (checked before any memory is allocated for them)."""
        coords = np.asarray(tiles['coords'])
        level, read_size, patch_size = (int(tiles[k]) for k in ('level', 'read_size',
                                                                 'patch_size'))
        extent = float(tiles['extent'])
        if coords.ndim != 2 or coords.shape[1] != 2 or coords.dtype.kind not in 'iu':
            raise ValueError(f'coords must be integers [N, 2], not {coords.dtype} '
                             f'{list(coords.shape)}')
        if not (0 <= level and 0 < patch_size <= MAX_PATCH_SIZE
                and 0 < read_size <= MAX_READ_RATIO * patch_size and 0 < extent < np.inf):
            raise ValueError(f'a read plan out of bounds: level {level}, read_size {read_size}, '
                             f'patch_size {patch_size}, extent {extent:g}')
        return cls(slide_id, path, coords, level, read_size, patch_size,
                   SlideStain.from_tiles(tiles), extent / read_size)


@dataclasses.dataclass(frozen=True)
class PatchBatch:
    """indices: int64 [B] into the slide's coordinates; images: uint8 [B, P, P, 3], stain-
    normalized once `lut` (uint8 [3, 256]) maps them: out[..., c] = lut[c, images[..., c]]. The
    table is the identity unless the reader was asked to defer it."""

    slide_id: str
    indices: np.ndarray
    images: np.ndarray
    lut: np.ndarray


@dataclasses.dataclass(frozen=True)
class Piece:
    """Patches start..stop - 1 of `slide`, at rows row..row + stop - start - 1 of a batch."""

    slide: SlidePatches
    start: int
    stop: int
    row: int


@dataclasses.dataclass(frozen=True)
class StreamBatch:
    """A batch of a stream over several slides: images uint8 [B, P, P, 3] and each row's lookup
    table luts uint8 [B, 3, 256] (as in PatchBatch), the `pieces` of slides they hold in row
    order, and `failed`: {slide id: why} for the slides of this batch whose reading failed
    (their rows hold nothing; a slide is named in the batch where its failure was found)."""

    images: np.ndarray
    luts: np.ndarray
    pieces: tuple[Piece, ...]
    failed: dict[str, str]


def plan_runs(coords: np.ndarray, read_size: int, downsample: float,
              max_run: int = MAX_RUN) -> list[tuple[int, int]]:
    """Splits patch indices into runs [start, stop) of horizontal neighbours that one region read
    of (stop - start) * read_size level pixels covers to within half a level pixel."""
    runs, start = [], 0
    for i in range(1, len(coords) + 1):
        if i < len(coords) and i - start < max_run:
            offset = (coords[i] - coords[start]) / downsample
            if abs(offset[1]) < 0.5 and abs(offset[0] - (i - start) * read_size) < 0.5:
                continue
        runs.append((start, i))
        start = i
    return runs


class _Run(NamedTuple):
    """Patches start..stop - 1 of `slide` (row neighbours), at rows row.. of batch `batch`."""

    batch: int
    row: int
    slide: SlidePatches
    start: int
    stop: int


class _Filling:
    """A batch being read into: its arrays, and the pieces of slides laid out in it so far."""

    def __init__(self, batch_size: int, patch_size: int):
        self.images = np.empty((batch_size, patch_size, patch_size, 3), np.uint8)
        self.luts = np.empty((batch_size, 3, 256), np.uint8)
        self.pieces: list[Piece] = []

    def add(self, run: _Run, lut: np.ndarray) -> np.ndarray:
        """Lays `run` out (extending its slide's piece) -> the rows it is read into."""
        if self.images.shape[1] != run.slide.patch_size:
            raise ValueError(f'{run.slide.slide_id}: patches of {run.slide.patch_size} px in a '
                             f'stream of {self.images.shape[1]} px patches')
        rows = slice(run.row, run.row + run.stop - run.start)
        last = self.pieces[-1] if self.pieces else None
        if last is not None and last.slide is run.slide and last.stop == run.start:
            self.pieces[-1] = dataclasses.replace(last, stop=run.stop)
        else:
            self.pieces.append(Piece(run.slide, run.start, run.stop, run.row))
        self.luts[rows] = lut
        return self.images[rows]

    def done(self, failed: dict[str, str]) -> StreamBatch:
        rows = self.pieces[-1].row + self.pieces[-1].stop - self.pieces[-1].start
        slides = {p.slide.slide_id for p in self.pieces}
        return StreamBatch(self.images[:rows], self.luts[:rows], tuple(self.pieces),
                           {s: why for s, why in failed.items() if s in slides})


class PatchReader:
    """Reads patches of slides with `workers` threads, `prefetch` runs of patches ahead.

    Use as a context manager; `batches(slide)` yields one slide's PatchBatch in coordinate
    order, `stream(slides)` batches that run on from slide to slide (StreamBatch). With
    `defer_lut`, a histogram-normalized slide's patches come before its lookup table (the
    batch's `lut`, or each row's in `luts`); other stain methods are applied by the reader
    either way.
    """

    def __init__(self, batch_size: int, workers: int = 2, prefetch: int = 16,
                 defer_lut: bool = False):
        self.batch_size = batch_size
        self.prefetch = max(prefetch, workers)
        self.defer_lut = defer_lut
        self._pool = concurrent.futures.ThreadPoolExecutor(max(1, workers))
        self._local = threading.local()
        self._open = set()  # every thread's open handle, closed with the reader
        self._lock = threading.Lock()

    def __enter__(self) -> 'PatchReader':
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for handle in self._open:
                handle.close()
            self._open.clear()

    def _handle(self, path: str) -> Slide:
        """This thread's open handle on `path` (one slide open per thread at a time)."""
        current = getattr(self._local, 'slide', None)
        if current is None or current.path != path:
            self._local.slide = None
            if current is not None:
                with self._lock:
                    self._open.discard(current)
                current.close()
            opened = Slide(path)
            with self._lock:
                self._open.add(opened)
            self._local.slide = opened
        return self._local.slide

    def _read_run(self, slide: SlidePatches, start: int, out: np.ndarray, copy: Copy) -> None:
        """Writes patches start..start + len(out) - 1 (horizontal neighbours) into out, uint8
        [n, P, P, 3], each pixel through `copy` (the stain, or a plain copy)."""
        handle = self._handle(slide.path)
        x, y = slide.coords[start]
        size = slide.read_size
        if size == slide.patch_size:
            handle.read_row(x, y, slide.level, out, copy)
            return
        regions = self._buffer((len(out), size, size, 3))
        handle.read_row(x, y, slide.level, regions)
        for region, patch in zip(regions, out):
            copy(resize(region, slide.patch_size), patch)

    def _buffer(self, shape: tuple[int, ...]) -> np.ndarray:
        """This thread's reused uint8 buffer of `shape` (the regions read before resizing)."""
        buffer = getattr(self._local, 'buffer', None)
        if buffer is None or buffer.shape != shape:
            buffer = self._local.buffer = np.empty(shape, np.uint8)
        return buffer

    def batches(self, slide: SlidePatches) -> Iterator[PatchBatch]:
        """The slide's patches in batches of `batch_size` (the last one shorter), in coordinate
        order (`stream` over the one slide). Raises SlideError for a slide that cannot be read."""
        for batch in self.stream([slide]):
            if batch.failed:
                raise SlideError(batch.failed[slide.slide_id])
            (piece,) = batch.pieces
            yield PatchBatch(slide.slide_id, np.arange(piece.start, piece.stop), batch.images,
                             batch.luts[0])

    def stream(self, slides: Iterable[SlidePatches]) -> Iterator[StreamBatch]:
        """The patches of `slides` (taken one after another as the stream needs them), in
        batches of `batch_size` that run on from one slide into the next (the last batch
        shorter), in order. Each batch's runs are read into its array by the pool, `prefetch`
        runs ahead. A slide whose reading fails is named in the `failed` of the batch where it
        failed, and none of its later patches is read or laid out."""
        failed = {}  # slide id -> why its reading failed
        plan = self._plan(slides, failed)
        filling, in_flight = {}, collections.deque()  # batch number -> _Filling / its runs
        upcoming, number = next(plan, None), 0
        while True:
            while upcoming is not None and (len(in_flight) < self.prefetch
                                            or upcoming.batch == number):
                in_flight.append(self._submit(upcoming, filling))
                upcoming = next(plan, None)
            if number not in filling:
                return
            while in_flight and in_flight[0][0] == number:
                _, slide_id, future = in_flight.popleft()
                try:
                    future.result()
                except SlideError as error:
                    failed.setdefault(slide_id, str(error))
            batch = filling.pop(number)
            yield batch.done(failed)
            number += 1

    def _plan(self, slides: Iterable[SlidePatches], failed: dict[str, str]) -> Iterator[_Run]:
        """Every run of the slides' patches, laid out batch by batch; a slide stops being laid
        out once it is in `failed`."""
        batch, row = 0, 0
        for slide in slides:
            first = 0
            while first < len(slide.coords) and slide.slide_id not in failed:
                stop = min(len(slide.coords), first + self.batch_size - row)  # to the batch's end
                for start, end in plan_runs(slide.coords[first:stop], slide.read_size,
                                            slide.downsample):
                    if slide.slide_id in failed:
                        break
                    yield _Run(batch, row, slide, first + start, first + end)
                    row += end - start
                if row == self.batch_size:
                    batch, row = batch + 1, 0
                first = stop

    def _submit(self, run: _Run, filling: dict[int, _Filling]):
        """Starts reading `run` into its batch's array: (batch number, slide id, future)."""
        slide = run.slide
        if run.batch not in filling:
            filling[run.batch] = _Filling(self.batch_size, slide.patch_size)
        batch = filling[run.batch]
        if self.defer_lut and slide.stain.method == 'histogram':
            copy, lut = plain_copy, slide.stain.arrays['stain_lut']
        else:
            copy, lut = slide.stain.copy_into, IDENTITY_LUT
        out = batch.add(run, lut)
        return run.batch, slide.slide_id, self._pool.submit(self._read_run, slide, run.start, out,
                                                            copy)
