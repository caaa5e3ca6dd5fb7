"""Extraction end to end, slide file -> features file: does the device ever wait on reading?

Synthetic SVS slides (0.5 um/px) tiled by pathjax's tile stage; the feature network (VGG-16 at
`feature_net.width`, random parameters, the config's compute dtype).
pathjax: the extract stage's own path, `extract.extract_slides` with an `Extractor` and a
`PatchReader` (patches read and decoded by the reader's threads while the device computes, in
batches that run on from slide to slide, the stain's lookup on the device, at most IN_FLIGHT
batches on the device; each slide's features written to `features/<slide>.npz`). References, in the same process, alternating round by round:
- network alone: the same compiled network on the same batches already in host memory
  (device_put, forward, copy back, the same back-pressure): the device's ceiling. pathjax / it is
  the share of time the device is fed: 1.0 = it never waits on reading. On a CPU host the
  readers and XLA share the same cores, so there it measures their contention.
- naive: per batch, one OpenSlide `read_region` per patch (RGBA -> RGB, resize, LUT), then the
  network, sequentially (reading and computing never overlap).
Both run on the CPU devices launch.py would use (`cpu_devices.expose`). Peak memory: pathjax's
extraction and the naive loop, each in a fresh subprocess (JAX, the compiled network, the
reader), peak RSS sampled by `memory.run_measured`.

  python benchmarks/extraction.py [--quick]
"""

import argparse
import collections
import dataclasses
import os
import pathlib
import statistics
import sys
import tempfile
import time

import jax
import numpy as np
import openslide
from tqdm import tqdm

import slide_files
from feature_net import model_flops, random_params
from memory import run_measured
from patch_reading import read_one
from pathjax import artifacts, cpu_devices
from pathjax.cohort import Cohort
from pathjax.data.features import features_path
from pathjax.models.patch.feature_net import create_feature_net
from pathjax.slides import tile_stage
from pathjax.slides.patch_stream import PatchReader, SlidePatches, StreamBatch
from pathjax.slides.stain import IDENTITY_LUT
from pathjax.train import extract
from rows import print_table, row


@dataclasses.dataclass(frozen=True)
class Setup:
    """What is measured: the slide, its copies, the network and the reading."""

    width: int  # level-0 pixels of the slide
    height: int
    copies: int  # slides in the cohort (hard links to one file)
    mpp: float  # tile.mpp
    patch_size: int  # tile.patch_size
    net_width: float  # feature_net.width
    batch_size: int
    workers: int  # reader threads (run() sets it to the usable cores)
    limit: int = 0  # > 0: at most this many patches per slide (the first in grid order)
    dtype: str = 'auto'


# quick: the demo's resolution (2 um/px, read from level 1) at 128 px; full: the method's.
QUICK = Setup(6144, 4096, copies=2, mpp=2.0, patch_size=128, net_width=0.125, batch_size=16,
              workers=0)
FULL = Setup(8192, 6144, copies=1, mpp=0.5, patch_size=512, net_width=1.0, batch_size=8,
             workers=0, limit=16)


def make_config(setup: Setup):
    return slide_files.config(**{'workers': 1, 'dtype': setup.dtype, 'compilation_cache': False,
                                 'tile.mpp': setup.mpp, 'tile.patch_size': setup.patch_size,
                                 'feature_net.width': setup.net_width, 'feature_net.learn': False,
                                 'extract.batch_size': setup.batch_size})


def prepare(setup: Setup, folder: pathlib.Path) -> Cohort:
    """Writes the slide, tiles the cohort into `folder` (pathjax's tile stage), truncates the
    tiles files to `setup.limit` patches."""
    path = slide_files.write_slide(folder / 'bench.svs', setup.width, setup.height, block=2048)
    cohort = slide_files.cohort(path, setup.copies, folder)
    tile_stage.run(make_config(setup), str(folder), cohort)
    if setup.limit:
        for record in cohort.slides:
            tiles = artifacts.load_npz(tile_stage.tiles_path(folder, record.slide_id))
            for key in ('coords', 'grid', 'tissue'):
                tiles[key] = tiles[key][:setup.limit]
            artifacts.save_npz(tile_stage.tiles_path(folder, record.slide_id), **tiles)
    return cohort


def slide_patches(workdir, cohort: Cohort) -> list[SlidePatches]:
    return [SlidePatches.from_tiles(r.slide_id, r.path, artifacts.load_npz(
        tile_stage.tiles_path(workdir, r.slide_id))) for r in cohort.slides]


def make_extractor(setup: Setup) -> extract.Extractor:
    """The stage's Extractor on random parameters, compiled and warmed up."""
    config = make_config(setup)
    model = create_feature_net(config)
    size = config.tile.patch_size
    params = random_params(model.init, np.zeros((1, size, size, 3), np.uint8))
    extractor = extract.Extractor(config, params, model)
    warm = np.zeros((setup.batch_size, size, size, 3), np.uint8)
    jax.block_until_ready(extractor.dispatch(warm, identity_luts(len(warm))))
    return extractor


# ---- the three passes; each returns the number of patches it turned into features ----

def pathjax_pass(extractor, cohort: Cohort, workdir, workers: int) -> int:
    """The extract stage's path: every slide of the cohort to its features file."""
    for record in cohort.slides:
        features_path(workdir, record.slide_id).unlink(missing_ok=True)
    with PatchReader(batch_size=extractor.batch_size, workers=workers, defer_lut=True) as reader, \
            tqdm(disable=True) as progress:
        entries = extract.extract_slides(extractor, reader, cohort.slides, workdir, progress,
                                         network='random parameters (benchmark)')
    if any(entry.status != 'ok' for entry in entries.values()):
        raise RuntimeError(f'extraction failed: {entries}')
    return sum(entry.patches for entry in entries.values())


def identity_luts(count: int) -> np.ndarray:
    """uint8 [count, 3, 256]: every row's lookup table the identity (stain applied already)."""
    return np.broadcast_to(IDENTITY_LUT, (count, 3, 256))


def preload(extractor, patches: list[SlidePatches], workers: int) -> list[StreamBatch]:
    """The cohort's batches in host memory, as the extract stage's reader gives them."""
    with PatchReader(batch_size=extractor.batch_size, workers=workers, defer_lut=True) as reader:
        return list(reader.stream(patches))


def network_pass(extractor, batches: list[StreamBatch]) -> int:
    """The network alone on preloaded batches, with the stage's back-pressure."""
    pending = collections.deque()
    for batch in batches:
        pending.append(extractor.dispatch(batch.images, batch.luts))
        if len(pending) > extract.IN_FLIGHT:
            np.asarray(pending.popleft())
    for result in pending:
        np.asarray(result)
    return sum(len(batch.images) for batch in batches)


def naive_pass(extractor, patches: list[SlidePatches], out) -> int:
    """read_region per patch, then the network on the batch, one after the other."""
    for slide in patches:
        handle = openslide.OpenSlide(slide.path)
        features = []
        for start in range(0, len(slide.coords), extractor.batch_size):
            stop = min(start + extractor.batch_size, len(slide.coords))
            images = np.stack([read_one(handle, slide, i) for i in range(start, stop)])
            result = extractor.dispatch(images, identity_luts(len(images)))
            features.append(np.asarray(result)[:len(images)].astype(np.float32))
        handle.close()
        np.savez(pathlib.Path(out) / f'{slide.slide_id}.npz', features=np.concatenate(features))
    return sum(len(slide.coords) for slide in patches)


# ---- measurement ----

def timed_rate(function) -> float:
    start = time.perf_counter()
    count = function()
    return count / (time.perf_counter() - start)


def measure(setup: Setup, cohort: Cohort, workdir, rounds: int,
            naive_slides: int | None = None) -> dict:
    """Median patches/s of each pass (naive on the first `naive_slides` slides only, if given);
    the extractor's own setup is not timed."""
    extractor = make_extractor(setup)
    patches = slide_patches(workdir, cohort)
    batches = preload(extractor, patches, setup.workers)
    rates = {'pathjax': [], 'network': [], 'naive': []}
    with tempfile.TemporaryDirectory() as out:
        for _ in range(rounds):
            rates['pathjax'].append(timed_rate(
                lambda: pathjax_pass(extractor, cohort, workdir, setup.workers)))
            rates['network'].append(timed_rate(lambda: network_pass(extractor, batches)))
            rates['naive'].append(timed_rate(
                lambda: naive_pass(extractor, patches[:naive_slides], out)))
    return {name: statistics.median(r) for name, r in rates.items()} | {
        'patches': sum(len(p.coords) for p in patches)}


def peak_rss(side: str, setup: Setup, workdir) -> int:
    """Peak RSS (bytes) of a fresh process extracting the cohort with one side."""
    fields = dataclasses.asdict(setup)
    command = [sys.executable, __file__, '--child', side, '--workdir', str(workdir),
               *[f'--{key}={value}' for key, value in fields.items()]]
    measured = run_measured(command)
    if measured.returncode:
        raise RuntimeError(f'the {side} extraction subprocess failed ({measured.returncode})')
    return measured.peak_rss


def child(side: str, setup: Setup, workdir: str) -> None:
    """One pass of one side over the cohort tiled in `workdir` (the memory subprocess)."""
    cpu_devices.expose(make_config(setup))  # before JAX starts, as launch.py's run does
    cohort = slide_files.cohort(pathlib.Path(workdir) / 'bench.svs', setup.copies, workdir)
    extractor = make_extractor(setup)
    if side == 'pathjax':
        pathjax_pass(extractor, cohort, workdir, setup.workers)
    else:
        with tempfile.TemporaryDirectory() as out:
            naive_pass(extractor, slide_patches(workdir, cohort), out)


def run(quick: bool) -> list[dict]:
    """Rows: patches/s vs the network alone and vs the naive loop; peak RSS vs the naive loop.
    quick: 2 slides of 6144 x 4096, 128-px patches at 2 um/px, VGG-16 at 1/8 width, batch 16;
    else the first 16 patches of an 8192 x 6144 slide, 512 px at 0.5 um/px, the full VGG-16,
    batch 8. Three rounds (quick) or two."""
    setup = dataclasses.replace(QUICK if quick else FULL,
                                workers=len(os.sched_getaffinity(0)))
    cpu_devices.expose(make_config(setup))  # before JAX starts, as launch.py's run does
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        cohort = prepare(setup, folder)
        rates = measure(setup, cohort, folder, rounds=3 if quick else 2)
        peak = {side: peak_rss(side, setup, folder) for side in ('pathjax', 'naive')}
        level0 = slide_files.level0_bytes(folder / 'bench.svs')
    gflops = rates['network'] * model_flops(setup.patch_size, setup.net_width, False) / 1e9
    device = jax.devices()[0]
    what = (f'{rates["patches"]} patches of {setup.patch_size} px at {setup.mpp:g} um/px from '
            f'{setup.copies} slide(s) of {setup.width} x {setup.height}, VGG-16 width '
            f'{setup.net_width:g}, batch {setup.batch_size}')
    network = (f'network: {gflops:.0f} GFLOP/s on {device.device_kind} ({device.platform}); '
               f'reading: JPEG decode on {setup.workers} threads')
    shared = ', the same cores as XLA' if device.platform == 'cpu' else ''
    return [
        row(f'extract vs network alone: {what}', 'patches/s', rates['pathjax'], rates['network'],
            'the same network on the same batches preloaded in memory (the device\'s ceiling)',
            True, network + shared, flops_per_s=gflops * 1e9),
        row(f'extract vs naive loop: {what}', 'patches/s', rates['pathjax'], rates['naive'],
            'read_region per patch, then the network, sequentially', True, network),
        row(f'extract: peak RSS of the process, {what}', 'MiB', peak['pathjax'] / 2**20,
            peak['naive'] / 2**20, 'the naive loop in its own process', False,
            f'JAX, the compiled network, batches in flight and reader buffers; one slide\'s '
            f'level-0 pixels would be {level0 / 2**20:.0f} MiB'),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--child', choices=('pathjax', 'naive'), help=argparse.SUPPRESS)
    parser.add_argument('--workdir', help=argparse.SUPPRESS)
    for field in dataclasses.fields(Setup):
        parser.add_argument(f'--{field.name}', type=field.type, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        setup = Setup(**{f.name: getattr(args, f.name) for f in dataclasses.fields(Setup)})
        child(args.child, setup, args.workdir)
        return
    print_table(run(args.quick))


if __name__ == '__main__':
    main()
