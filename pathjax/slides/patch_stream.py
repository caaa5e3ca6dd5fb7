"""Batches of stain-normalized uint8 patches streamed from a slide by coordinates (numpy only).

Reading is the I/O floor of the method, so the stream
- merges patches that are neighbours on a grid row into one region read (each JPEG tile on a
  shared border is decoded once, and the per-call overhead is paid once per run of patches);
- reads those regions in a pool of threads, each with its own OpenSlide handle (OpenSlide's
  reads and PIL's resizing release the GIL, so threads decode in parallel);
- keeps a bounded number of reads in flight ahead of the consumer, and yields patches in the
  order of the coordinates.
"""

import collections
import concurrent.futures
import dataclasses
import threading
from typing import Iterator

import numpy as np

from pathjax.slides.reader import Slide, resize
from pathjax.slides.stain_transform import SlideStain

MAX_RUN = 4  # patches merged into one region read


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
        """From the arrays of the slide's tiles file (a damaged stain transform: ValueError)."""
        read_size = int(tiles['read_size'])
        return cls(slide_id, path, tiles['coords'], int(tiles['level']), read_size,
                   int(tiles['patch_size']), SlideStain.from_tiles(tiles),
                   float(tiles['extent']) / read_size)


@dataclasses.dataclass(frozen=True)
class PatchBatch:
    """indices: int64 [B] into the slide's coordinates; images: uint8 [B, P, P, 3]."""

    slide_id: str
    indices: np.ndarray
    images: np.ndarray


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


class PatchReader:
    """Reads patches of slides with `workers` threads, `prefetch` region reads ahead.

    Use as a context manager; `batches(slide)` yields PatchBatch in coordinate order.
    """

    def __init__(self, batch_size: int, workers: int = 2, prefetch: int = 16):
        self.batch_size = batch_size
        self.prefetch = max(prefetch, workers)
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

    def _read_run(self, slide: SlidePatches, start: int, stop: int) -> np.ndarray:
        """Patches start..stop-1 (horizontal neighbours): uint8 [stop - start, P, P, 3] (a view
        of the run's region when no resize is needed: the batch copies it once)."""
        handle = self._handle(slide.path)
        x, y = slide.coords[start]
        size, count = slide.read_size, stop - start
        region = handle.read_region(x, y, slide.level, size * count, size)  # [S, count S, 3]
        if size == slide.patch_size:  # the stain over the region, then split without a copy
            return slide.stain.apply(region).reshape(size, count, size, 3).swapaxes(0, 1)
        patches = np.stack([resize(region[:, j * size:(j + 1) * size], slide.patch_size)
                            for j in range(count)])
        return slide.stain.apply(patches)

    def batches(self, slide: SlidePatches) -> Iterator[PatchBatch]:
        runs = plan_runs(slide.coords, slide.read_size, slide.downsample)
        pending = collections.deque()
        next_run = 0
        for batch_start in range(0, len(slide.coords), self.batch_size):
            batch_stop = min(batch_start + self.batch_size, len(slide.coords))
            images = np.empty((batch_stop - batch_start, slide.patch_size, slide.patch_size, 3),
                              np.uint8)
            filled = batch_start
            while filled < batch_stop:
                while next_run < len(runs) and len(pending) < self.prefetch:
                    start, stop = runs[next_run]
                    pending.append((start, self._pool.submit(self._read_run, slide, start, stop)))
                    next_run += 1
                start, future = pending[0]
                patches = future.result()
                take = min(len(patches) - (filled - start), batch_stop - filled)
                images[filled - batch_start:filled - batch_start + take] = \
                    patches[filled - start:filled - start + take]
                filled += take
                if filled - start == len(patches):
                    pending.popleft()
            yield PatchBatch(slide.slide_id, np.arange(batch_start, batch_stop), images)
