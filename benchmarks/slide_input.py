"""Slide model input: the graph-file batch loader vs the former load-everything + make_batch path.

Synthetic slides in a temporary folder, in the graph-file layout that `features.slide_graph`
writes (features float32 [n, D], grid, coords, kept, and a random symmetric graph of about k
neighbours per node: senders, receivers int32 [E]); at the defaults 8 slides per batch, 8192
nodes, D = 512, k = 8, so a batch holds 128 MiB of features. One batch's worth of distinct files
is written; the rest of the cohort are hard links to them (the same bytes in the page cache, each
loaded into its own memory by the reference). Batches draw their slides from seeded permutations
of the cohort, as training does.

pathjax: `GraphBatches.prefetch` (each slide's arrays read from its file straight into a new batch
buffer by `--workers` threads, in a background thread, `PREFETCH` batches ahead, each batch put on
the device there). Reference, reimplemented here as it was: every slide's graph loaded into host
memory up front (a `jraph.GraphsTuple` each), then per step `np.pad` of each slide to the batch's
bucket (`graphs.pad_graph`), `np.stack` (`graphs.stack_graphs`) and `jax.device_put`, in the
consumer's thread.

Rows (ratio > 1: pathjax better):
- host wait per batch: the seconds the consumer waits for each batch while a simulated device
  step of `--step` seconds (a sleep: the consumer blocks on the device, as `predict` does) runs
  between batches; the first batch (pipeline fill) is left out. ratio = reference / pathjax.
  This is a hand-over time, prefetching against pathjax's own former synchronous path: the
  ratio says how much of the loading the prefetch hides behind the step, not that equal work
  runs that much faster (the input-alone row says that).
- batches/s of the input alone (no step, no device placement), median of alternating rounds.
  ratio = pathjax / reference.
- host memory while loading the split and running 4 batches: peak RSS growth (sampled from
  /proc/self/statm, glibc made to return freed memory) and tracemalloc's peak (numpy
  allocations), each on its own pass. The reference holds the cohort; pathjax up to PREFETCH + 2
  batches (ready, being read, in the consumer's hands), whatever the cohort.

The files are in the page cache (a cold disk adds its read time to both: the reference once at
load, pathjax every epoch). Linux and glibc only.

  python benchmarks/slide_input.py [--quick] [--slides 128] [--batches 24] [--step 0.2]
"""

import argparse
import ctypes
import functools
import os
import pathlib
import resource
import tempfile
import threading
import time
import tracemalloc

import jax
import numpy as np

from pathjax import artifacts
from pathjax.data import graphs
from pathjax.data.graph_batches import PREFETCH, GraphBatches
from rows import print_table, row

BATCH, NODES, DIM, K = 8, 8192, 512, 8
PAGE = resource.getpagesize()
LIBC = ctypes.CDLL('libc.so.6')
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
REFERENCE = 'every graph loaded up front, then np.pad + np.stack + device_put per batch'


# ---- the synthetic cohort ----

def write_cohort(folder: pathlib.Path, slides: int, seed: int = 0) -> tuple[list, np.ndarray,
                                                                                np.ndarray]:
    """Graph files of `slides` slides, BATCH distinct ones and hard links to them; returns
    (paths, num_nodes [S], num_edges [S])."""
    rng = np.random.default_rng(seed)
    paths, edge_counts = [], []
    for i in range(slides):
        paths.append(folder / f'slide{i}.npz')
        if i >= BATCH:
            os.link(paths[i % BATCH], paths[-1])
            edge_counts.append(edge_counts[i % BATCH])
            continue
        senders, receivers = graphs.symmetric_edges(rng.integers(0, NODES, (NODES, K)))
        grid = rng.integers(0, 200, (NODES, 2)).astype(np.int32)
        artifacts.save_npz(paths[-1], kept=np.arange(NODES), senders=senders,
                           receivers=receivers, grid=grid, coords=grid * 256,
                           features=rng.standard_normal((NODES, DIM), dtype=np.float32))
        edge_counts.append(len(senders))
    return paths, np.full(slides, NODES), np.asarray(edge_counts)


def batch_order(slides: int, batches: int, seed: int = 0) -> list[np.ndarray]:
    """`batches` batches of BATCH slide indices, epoch after epoch of seeded permutations."""
    order = np.concatenate([np.random.default_rng([seed, epoch]).permutation(slides)
                            for epoch in range(-(-batches * BATCH // slides))])
    return [order[i * BATCH:(i + 1) * BATCH] for i in range(batches)]


# ---- the two inputs: iterators of (indices, placed batch) with close() ----

def reference_load(paths: list) -> list:
    """The former `load_slides`: every slide's graph in host memory."""
    return [graphs.slide_graph(d['features'], d['grid'], d['senders'], d['receivers'])
            for d in (artifacts.load_npz(p, ('features', 'grid', 'senders', 'receivers'))
                      for p in paths)]


def reference_batch(slide_graphs: list, labels: np.ndarray, indices: np.ndarray) -> dict:
    """The former `make_batch`."""
    fill = np.resize(indices, BATCH)
    nodes = graphs.bucket_size(max(int(slide_graphs[i].n_node[0]) for i in fill))
    padded = [graphs.pad_graph(slide_graphs[i], nodes, graphs.edge_budget(nodes, K)) for i in fill]
    return {'graph': graphs.stack_graphs(padded), 'label': labels[fill],
            'mask': np.arange(BATCH) < len(indices)}


class ReferenceInput:
    """The former path: batches made in the consumer's thread from graphs in memory."""

    def __init__(self, slide_graphs: list, batches: list, place):
        self.slide_graphs, self.labels = slide_graphs, np.zeros(len(slide_graphs), np.int32)
        self.batches, self.place = iter(batches), place

    def __iter__(self):
        return self

    def __next__(self):
        indices = next(self.batches)
        return indices, self.place(reference_batch(self.slide_graphs, self.labels, indices))

    def close(self):
        self.slide_graphs = None


def pathjax_input(cohort, batches, place, workers):
    paths, num_nodes, num_edges = cohort
    reader = GraphBatches(paths, num_nodes, num_edges, {'label': np.zeros(len(paths), np.int32)},
                          batch_size=BATCH, k=K, feature_dim=DIM, workers=workers)
    return reader.prefetch(batches, place)


def on_device(batch: dict) -> dict:
    return jax.block_until_ready(jax.device_put(batch))


# ---- measurements: each takes make_input(place) -> input ----

def host_wait(make_input, step: float) -> float:
    """Mean seconds the consumer waits for a batch, a blocking `step` between batches."""
    loader = make_input(on_device)
    waits = []
    try:
        while True:
            start = time.perf_counter()
            if next(loader, None) is None:
                break
            waits.append(time.perf_counter() - start)
            time.sleep(step)  # the device step
    finally:
        loader.close()
    return float(np.mean(waits[1:]))


def input_rate(make_input) -> float:
    """Batches per second of the input alone, after the first."""
    loader = make_input(lambda batch: batch)
    try:
        next(loader)
        start, count = time.perf_counter(), 0
        for _ in loader:
            count += 1
        return count / (time.perf_counter() - start)
    finally:
        loader.close()


def consume(make_input) -> None:
    loader = make_input(on_device)
    for _ in loader:
        pass
    loader.close()


def rss_bytes() -> int:
    with open('/proc/self/statm') as statm:
        return int(statm.read().split()[1]) * PAGE


def peak_rss_growth(make_input) -> float:
    """Peak resident-memory growth (bytes) while making the input and consuming its batches."""
    LIBC.malloc_trim(0)  # freed memory back to the OS, so that what the input holds is new
    base, peak, done = rss_bytes(), [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_bytes())
            time.sleep(0.002)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        consume(make_input)
    finally:
        done.set()
        sampler.join()
    return peak[0] - base


def traced_peak(make_input) -> float:
    """tracemalloc's peak (bytes) while making the input and consuming its batches."""
    tracemalloc.start()
    try:
        consume(make_input)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def run(quick: bool, slides: int | None = None, batches: int | None = None,
        step: float = 0.2, workers: int | None = None) -> list[dict]:
    """The benchmark's rows (see the module docstring); quick: 64 slides, 6 batches."""
    slides = slides or (64 if quick else 128)
    batches = batches or (6 if quick else 24)
    workers = workers or min(BATCH, os.cpu_count() or 1)
    with tempfile.TemporaryDirectory(prefix='slide_input_') as folder:
        cohort = write_cohort(pathlib.Path(folder), slides)
        order = batch_order(slides, batches)
        loaded = reference_load(cohort[0])  # for the timed passes; the memory passes load theirs
        timed = {'pathjax': lambda place: pathjax_input(cohort, order, place, workers),
                 'reference': functools.partial(ReferenceInput, loaded, order)}
        for make_input in timed.values():  # first transfers and allocations
            make_input(on_device).close()
        wait = {name: host_wait(f, step) for name, f in timed.items()}
        rounds = [{name: input_rate(f) for name, f in timed.items()}
                  for _ in range(2 if quick else 3)]
        rate = {name: float(np.median([r[name] for r in rounds])) for name in timed}
        del loaded, timed
        few = {'pathjax': lambda place: pathjax_input(cohort, order[:4], place, workers),
               'reference': lambda place: ReferenceInput(reference_load(cohort[0]), order[:4],
                                                         place)}
        # From now on glibc returns freed large arrays to the OS (it keeps them otherwise), so
        # RSS growth counts what each input holds.
        LIBC.mallopt(M_MMAP_THRESHOLD, 2**20)
        rss = {name: peak_rss_growth(f) / 2**20 for name, f in few.items()}
        traced = {name: traced_peak(f) / 2**20 for name, f in few.items()}
    batch_mib, slide_mib = BATCH * NODES * DIM * 4 / 2**20, NODES * DIM * 4 / 2**20
    return [
        row(f'host wait per batch, {step:g} s device step (hand-over: prefetch vs the former '
            'synchronous path, not equal work)', 's', max(wait['pathjax'], 1e-6),
            wait['reference'], REFERENCE, False,
            f'reference: np.pad + np.stack + device_put of {batch_mib:.0f} MiB in the consumer; '
            'pathjax: the hand-over, while the loader is faster than the step'),
        row('input alone', 'batches/s', rate['pathjax'], rate['reference'], REFERENCE, True,
            'memory bandwidth: reference copies each slide twice (pad, stack), one thread; '
            f'pathjax once, from the page cache into fresh pages, {workers} threads'),
        row(f'peak RSS growth, {slides} slides, 4 batches', 'MiB', rss['pathjax'],
            rss['reference'], REFERENCE, False,
            f'reference: the cohort ({slides} x {slide_mib:.0f} MiB) + a batch; pathjax: up to '
            f'{PREFETCH} + 2 batches of {batch_mib:.0f} MiB'),
        row(f'tracemalloc peak, {slides} slides, 4 batches', 'MiB', traced['pathjax'],
            traced['reference'], REFERENCE, False,
            'as peak RSS, numpy allocations only'),
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--quick', action='store_true', help='64 slides, 6 batches (< 30 s)')
    parser.add_argument('--slides', type=int, help='cohort size (default 128, quick 64)')
    parser.add_argument('--batches', type=int, help='batches timed (default 24, quick 6)')
    parser.add_argument('--step', type=float, default=0.2, help='simulated device step, s')
    parser.add_argument('--workers', type=int, help='reading threads (default: min(8, CPUs))')
    args = parser.parse_args()
    rows = run(args.quick, args.slides, args.batches, args.step, args.workers)
    print(f'\n## Slide input: {BATCH} slides per batch, {NODES} nodes, D = {DIM}, k = {K}; '
          f'{os.cpu_count()} CPUs, jax {jax.__version__} ({jax.default_backend()})\n')
    print_table(rows)


if __name__ == '__main__':
    main()
