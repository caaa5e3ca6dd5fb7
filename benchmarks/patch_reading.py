"""Patch reading: pathjax's PatchReader vs a naive loop, on the same synthetic slides, in one run.

Naive reference: one process, one `OpenSlide.read_region` per patch, RGBA -> RGB, resize when the
level does not match, then the stain LUT (what a straightforward tiler does). Both produce the
same stain-normalized uint8 patches. Each measurement opens the slide afresh (cold caches) and
the two readers alternate over several rounds; the median patches/s is reported.

  python benchmarks/patch_reading.py [--workers 2] [--rounds 3] [--quick]
"""

import argparse
import os
import pathlib
import platform
import statistics
import tempfile
import time

import numpy as np
import openslide

import machine_info
import slide_files
from pathjax.slides import stain
from pathjax.slides.patch_stream import PatchReader, SlidePatches
from pathjax.slides.reader import Slide, resize, rgba_to_rgb
from pathjax.slides.tiling import grid_positions
from rows import row

PATCH_SIZE, TARGET_MPP = 512, 0.5


def naive_read(patches: SlidePatches) -> int:
    slide = openslide.OpenSlide(patches.path)
    for x, y in patches.coords:
        region = slide.read_region((int(x), int(y)), patches.level,
                                   (patches.read_size, patches.read_size))
        patch = resize(rgba_to_rgb(np.asarray(region)), patches.patch_size)
        stain.apply_lut(patch, patches.lut)
    slide.close()
    return len(patches.coords)


def reader_read(patches: SlidePatches, workers: int) -> int:
    count = 0
    with PatchReader(batch_size=32, workers=workers) as reader:
        for batch in reader.batches(patches):
            count += len(batch.indices)
    return count


def slide_patches(path: pathlib.Path) -> SlidePatches:
    """Every whole patch of the slide's grid at TARGET_MPP (the benchmark reads them all)."""
    with Slide(path) as slide:
        plan = slide.plan(TARGET_MPP, PATCH_SIZE)
        coords, _ = grid_positions(*slide.dimensions, plan.extent)
    lut = np.clip(np.arange(256) * 1.1 - 10, 0, 255).astype(np.uint8)[None].repeat(3, axis=0)
    return SlidePatches(path.stem, str(path), coords, plan.level, plan.read_size, PATCH_SIZE, lut,
                        plan.extent / plan.read_size)


def timed(function) -> float:
    start = time.perf_counter()
    count = function()
    return count / (time.perf_counter() - start)


def measure(path: pathlib.Path, workers: int, rounds: int) -> dict:
    """Median patches/s of the naive loop and of PatchReader with 1 and `workers` threads,
    alternating round by round."""
    patches = slide_patches(path)
    rates = {'naive': [], 'single': [], 'parallel': []}
    for _ in range(rounds):
        rates['naive'].append(timed(lambda: naive_read(patches)))
        rates['single'].append(timed(lambda: reader_read(patches, 1)))
        rates['parallel'].append(timed(lambda: reader_read(patches, workers)))
    return {'patches': patches, **{name: statistics.median(r) for name, r in rates.items()}}


def slides(quick: bool) -> list[tuple[str, float]]:
    """(format, level-0 mpp) of the slides measured."""
    return [('svs', 0.5)] if quick else [('svs', 0.5), ('tiff', 0.5), ('svs', 0.25)]


def run(quick: bool, workers: int | None = None, rounds: int = 3,
        size: tuple[int, int] = (6144, 4096)) -> list[dict]:
    """Rows: PatchReader (1 thread, `workers` threads) vs the naive loop, per slide. quick: one
    SVS slide at 0.5 um/px, 4096 x 3072 (one 2048-px render repeated)."""
    workers = workers or len(os.sched_getaffinity(0))
    width, height = (4096, 3072) if quick else size
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for fmt, mpp in slides(quick):
            path = slide_files.write_slide(pathlib.Path(folder) / f'bench_{mpp}.{fmt}', width,
                                           height, mpp=mpp, fmt=fmt,
                                           block=2048 if quick else None)
            result = measure(path, workers, rounds)
            patches = result['patches']
            what = (f'{fmt} {mpp} um/px, {len(patches.coords)} patches of {PATCH_SIZE} px '
                    f'(read {patches.read_size} px at level {patches.level})')
            bound = (f'JPEG decode of {patches.read_size}-px regions on the threads\' cores '
                     f'(naive: one read_region per patch, one core)')
            for threads, rate in ((1, result['single']), (workers, result['parallel'])):
                rows.append(row(f'PatchReader, {threads} thread{"s" * (threads > 1)}: {what}',
                                'patches/s', rate, result['naive'],
                                'one OpenSlide read_region per patch, one process',
                                True, bound))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--size', type=int, nargs=2, default=(6144, 4096), metavar=('W', 'H'))
    parser.add_argument('--quick', action='store_true', help='one small slide')
    args = parser.parse_args()
    print(f'machine: {machine_info.cpu_line()}, {os.cpu_count()} cores, '
          f'python {platform.python_version()}, openslide {openslide.__library_version__}')
    print(f'patches: {PATCH_SIZE} px at {TARGET_MPP} um/px, PatchReader workers={args.workers}, '
          f'median of {args.rounds} rounds\n')
    print(f'{"row":96s} {"patches/s":>9s} {"naive/s":>8s} {"ratio":>6s}')
    for r in run(args.quick, args.workers, args.rounds, tuple(args.size)):
        print(f'{r["name"]:96s} {r["pathjax"]:9.1f} {r["reference"]:8.1f} {r["ratio"]:5.1f}x')


if __name__ == '__main__':
    main()
