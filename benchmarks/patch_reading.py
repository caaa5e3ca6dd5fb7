"""Patch reading: pathjax's PatchReader vs a naive loop, on the same synthetic slides, in one run.

Naive reference: one process, one `OpenSlide.read_region` per patch, RGBA -> RGB, resize when the
level does not match, then the stain LUT (what a straightforward tiler does). Both produce the
same stain-normalized uint8 patches. Each measurement opens the slide afresh (cold caches) and
the two readers alternate over several rounds; the median patches/s is reported.

  python benchmarks/patch_reading.py [--workers 2] [--rounds 3]
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

from pathjax.slides import stain, synthetic
from pathjax.slides.patch_stream import PatchReader, SlidePatches
from pathjax.slides.reader import Slide, resize, rgba_to_rgb
from pathjax.slides.tiling import grid_positions

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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, default=os.cpu_count())
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--size', type=int, nargs=2, default=(6144, 4096), metavar=('W', 'H'))
    args = parser.parse_args()
    print(f'machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, '
          f'python {platform.python_version()}, openslide {openslide.__library_version__}')
    print(f'patches: {PATCH_SIZE} px at {TARGET_MPP} um/px, PatchReader workers={args.workers}\n')
    print(f'{"slide":34s} {"patches":>7s} {"naive/s":>8s} {"1 thread/s":>10s} '
          f'{"reader/s":>9s} {"ratio":>6s}')
    with tempfile.TemporaryDirectory() as folder:
        for fmt, mpp in (('svs', 0.5), ('tiff', 0.5), ('svs', 0.25)):
            spec = synthetic.SyntheticSlideSpec('bench', 'bench', 'positive', True, mpp, fmt,
                                                *args.size, seed=1)
            path = pathlib.Path(folder) / f'bench_{mpp}.{fmt}'
            synthetic.write_slide(path, synthetic.render_slide(spec), mpp, fmt)
            patches = slide_patches(path)
            naive, single, parallel = [], [], []
            for _ in range(args.rounds):
                naive.append(timed(lambda: naive_read(patches)))
                single.append(timed(lambda: reader_read(patches, 1)))
                parallel.append(timed(lambda: reader_read(patches, args.workers)))
            naive_rate, single_rate, rate = (statistics.median(r) for r in (naive, single, parallel))
            name = f'{fmt} {mpp} um/px, read {patches.read_size} px @ level {patches.level}'
            print(f'{name:34s} {len(patches.coords):7d} {naive_rate:8.1f} {single_rate:10.1f} '
                  f'{rate:9.1f} {rate / naive_rate:5.1f}x')


if __name__ == '__main__':
    main()
