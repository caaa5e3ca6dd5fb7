"""Batches of slide graphs read from their graph files in a background thread, ahead of the step.

A batch is a list of slide indices, filled to the batch size with masked repeats of its own
slides (`np.resize`) and padded to one bucket: nodes = `graphs.bucket_size` of its largest slide,
edges = `graphs.edge_budget(nodes, k)`, laid out as `graphs.pad_graph` and `graphs.stack_graphs`
would (valid nodes first, padding nodes zero and masked, padding edges 0 -> 0 and masked). Each
slide's arrays are read from its graph file (`features.slide_graph`) straight into a new batch
buffer (by `workers` threads); nothing else of the slide is held. The buffers are never reused
and start on a 64-byte boundary, so a CPU device takes them in place instead of copying them
(about 0.1 s per 128 MiB). `GraphBatches.prefetch` reads and places the batches on the devices
`depth` batches ahead of the consumer, in a background thread, so the host work overlaps the
device step and host memory holds about depth + 2 batches (ready, being read, in the consumer's
hands), never the cohort.
"""

import math
import pathlib
import queue
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent import futures
from typing import Any

import jraph
import numpy as np

from pathjax.data import graphs
from pathjax.data.features import StoredArray, stored_arrays
from pathjax.errors import StageError

PREFETCH = 2  # batches ready ahead of the one the device runs
ALIGN = 64  # bytes; XLA's CPU client uses a host array this aligned in place
_END = object()  # the iterator's end, or an error, in the prefetch queue


class GraphBatches:
    """Reads batches of slides from their graph files.

    Args:
      paths: the slides' graph files [S].
      num_nodes, num_edges: int [S], each slide's node and edge count.
      per_slide: {name: values [S]} that join each batch as [B] arrays (e.g. 'label').
      batch_size, k, feature_dim: the global batch size B, the graph's k, the feature size D.
      rows: this process's rows of every global batch.
      workers: threads reading a batch's slides at once.
    """

    def __init__(self, paths: Sequence[pathlib.Path], num_nodes: np.ndarray,
                 num_edges: np.ndarray, per_slide: dict[str, np.ndarray], *, batch_size: int,
                 k: int, feature_dim: int, rows: slice = slice(None), workers: int = 1):
        self.paths, self.per_slide = list(paths), per_slide
        self.num_nodes, self.num_edges = np.asarray(num_nodes), np.asarray(num_edges)
        self.batch_size, self.k, self.feature_dim, self.rows = batch_size, k, feature_dim, rows
        self.workers = workers

    def read(self, indices: np.ndarray) -> dict:
        """This process's R rows of the batch of slides `indices` [b], b <= batch_size.

        Returns {'graph': GraphsTuple (nodes {'features' [R, N, D], 'grid' [R, N, 2], 'mask'
        [R, N]}, edges {'mask' [R, E]}, senders, receivers [R, E], n_node, n_edge [R, 1]),
        'mask' bool [R] (False on filler rows), and each per_slide array [R]}.
        """
        fill = np.resize(indices, self.batch_size)  # repeats the batch's own slides as filler
        nodes = graphs.bucket_size(int(self.num_nodes[fill].max()))
        edges = graphs.edge_budget(nodes, self.k)
        local = fill[self.rows]
        count = len(local)
        arrays = {'features': _aligned_zeros((count, nodes, self.feature_dim), np.float32),
                  'grid': _aligned_zeros((count, nodes, 2), np.int32),
                  'senders': _aligned_zeros((count, edges), np.int32),
                  'receivers': _aligned_zeros((count, edges), np.int32)}
        with futures.ThreadPoolExecutor(max(1, min(self.workers, count))) as pool:
            list(pool.map(lambda row: self._read_slide(
                local[row], {name: array[row] for name, array in arrays.items()}), range(count)))
        graph = jraph.GraphsTuple(
            nodes={'features': arrays['features'], 'grid': arrays['grid'],
                   'mask': np.arange(nodes) < self.num_nodes[local][:, None]},
            edges={'mask': np.arange(edges) < self.num_edges[local][:, None]},
            senders=arrays['senders'], receivers=arrays['receivers'], globals=None,
            n_node=np.full((count, 1), nodes, np.int32),
            n_edge=np.full((count, 1), edges, np.int32))
        batch = {'graph': graph, 'mask': (np.arange(self.batch_size) < len(indices))[self.rows]}
        batch.update({name: values[local] for name, values in self.per_slide.items()})
        return batch

    def _read_slide(self, slide: int, targets: dict[str, np.ndarray]) -> None:
        """Reads the slide's arrays into the first rows of targets {name: [N, ...] or [E]}."""
        path = self.paths[slide]
        sizes = {'features': self.num_nodes[slide], 'grid': self.num_nodes[slide],
                 'senders': self.num_edges[slide], 'receivers': self.num_edges[slide]}
        try:
            stored = stored_arrays(path)
            with open(path, 'rb', buffering=0) as file:
                for name, target in targets.items():
                    _read_into(file, stored[name], target, sizes[name])
        except Exception as error:
            raise StageError(f'slide {path.stem}: cannot read its graph file {path}: '
                             f'{type(error).__name__}: {error}') from error

    def prefetch(self, batches: Iterable[np.ndarray], place: Callable[[dict], Any] = lambda b: b,
                 depth: int = PREFETCH) -> 'Prefetch':
        """(indices, place(read(indices))) for each batch of `batches`, made in a background
        thread at most `depth` batches ahead of the consumer."""
        return Prefetch(((indices, place(self.read(indices))) for indices in batches), depth)


def _aligned_zeros(shape: tuple[int, ...], dtype) -> np.ndarray:
    """np.zeros(shape, dtype) whose data starts on an ALIGN-byte boundary."""
    dtype = np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    raw = np.zeros(size + ALIGN, np.uint8)
    start = -raw.ctypes.data % ALIGN
    return raw[start:start + size].view(dtype).reshape(shape)


def _read_into(file, stored: StoredArray, target: np.ndarray, size: int) -> None:
    """Reads a stored array of `size` rows into target[:size] (one read, no copy)."""
    if (stored.dtype != target.dtype or stored.shape[0] != size
            or tuple(stored.shape[1:]) != target.shape[1:] or size > len(target)):
        raise ValueError(f'stored {stored.dtype} {stored.shape} does not fit {size} rows of '
                         f'{target.dtype} {target.shape} (was the file rebuilt since the split '
                         'was loaded?)')
    view = memoryview(target[:size]).cast('B')
    file.seek(stored.offset)
    while view:
        read = file.readinto(view)
        if not read:
            raise EOFError('the file ends early')
        view = view[read:]


class Prefetch:
    """The items of an iterator, made in a background thread at most `depth` ahead of the
    consumer. An exception of the iterator is raised by the consumer's next(). Use it as a
    context manager (or call close()): the thread stops and is joined when the consumer stops."""

    def __init__(self, items: Iterator, depth: int):
        self._items, self._slots = items, threading.Semaphore(depth)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop, self._done = threading.Event(), False
        self._thread = threading.Thread(target=self._produce, name='pathjax-prefetch', daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            while True:
                self._slots.acquire()
                if self._stop.is_set():
                    return
                item = next(self._items, _END)
                self._queue.put((item, None))
                if item is _END:
                    return
        except Exception as error:  # handed to the consumer
            self._queue.put((_END, error))

    def __iter__(self) -> 'Prefetch':
        return self

    def __next__(self):
        if self._done:
            raise StopIteration
        item, error = self._queue.get()
        if item is _END:
            self._done = True
            if error is not None:
                raise error
            raise StopIteration
        self._slots.release()
        return item

    def close(self) -> None:
        """Stops the thread after the item it is making, and waits for it."""
        self._stop.set()
        self._slots.release()  # wakes a thread waiting for a slot
        self._thread.join()
        self._done = True

    def __enter__(self) -> 'Prefetch':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

