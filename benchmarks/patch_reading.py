"""Patch reading: pathjax's PatchReader vs the peers' reading, on the same synthetic slides.

The reference reads as TRIDENT and CLAM do: a torch Dataset whose __getitem__ calls
`OpenSlide.read_region` for one patch (the slide opened in the main process, as CLAM's
Whole_Slide_Bag_FP holds it), RGBA -> RGB, resize when the level does not match, then the stain
LUT; a torch DataLoader batches it (32 patches) in worker processes. Like for like:
- PatchReader with 1 thread against the same per-patch loop in one process (no DataLoader: the
  per-core cost of each reader);
- PatchReader with 1 thread against decoding only the tiles its patches cover (bytes in
  memory, each tile once, one thread): the share of the JPEG decode ceiling it reaches, with
  the stain's lookup table on the reader thread (as the patches stage reads) and left to the
  device (`defer_lut`, as the extract stage reads);
- PatchReader with N threads against the DataLoader with N worker processes (N = the usable
  cores, or --workers), worker start-up included, as a user pays it.
All produce the same stain-normalized uint8 patches. The full size (16384 x 12288 px: 768
patches of 512 px at 0.5 um/px) is a small resection at the method's resolution, so that the
DataLoader's start-up per slide (as CLAM and TRIDENT make one per slide) weighs what it weighs
in a real run, not more. The full run adds the real TCGA slide of ../shared/data (JPEG 2000
tiles, about ten times JPEG's decode cost) where present. Each measurement opens the slide afresh
(cold caches) and the readers alternate over several rounds; the median patches/s is reported.

  python benchmarks/patch_reading.py [--workers 2] [--rounds 3] [--quick]
"""

import argparse
import os
import pathlib
import platform
import statistics
import tempfile
import time
import warnings

import numpy as np
import openslide
import tifffile

import machine_info
import slide_files
from pathjax.slides.patch_stream import PatchReader, SlidePatches
from pathjax.slides.reader import Slide, resize, rgba_to_rgb
from pathjax.slides.stain_transform import SlideStain
from pathjax.slides.tiff_tiles import TiffTiles
from pathjax.slides.tiling import grid_positions
from rows import row

PATCH_SIZE, TARGET_MPP = 512, 0.5
REAL_SLIDE = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'slides'
              / 'tcga-cr-7395-01a-01-ts1.svs')


def read_one(slide: openslide.OpenSlide, patches: SlidePatches, index: int) -> np.ndarray:
    """One patch the peers' way: read_region, RGBA -> RGB, resize, stain. -> [P, P, 3]."""
    x, y = patches.coords[index]
    region = slide.read_region((int(x), int(y)), patches.level,
                               (patches.read_size, patches.read_size))
    patch = resize(rgba_to_rgb(np.asarray(region)), patches.patch_size)
    return patches.stain.apply(patch)


def naive_read(patches: SlidePatches) -> int:
    slide = openslide.OpenSlide(patches.path)
    for index in range(len(patches.coords)):
        read_one(slide, patches, index)
    slide.close()
    return len(patches.coords)


def dataloader_read(patches: SlidePatches, workers: int) -> int:
    """The patches through a torch DataLoader with `workers` worker processes, batches of 32."""
    import torch.utils.data

    class PatchDataset(torch.utils.data.Dataset):
        def __init__(self):
            self.slide = openslide.OpenSlide(patches.path)

        def __len__(self):
            return len(patches.coords)

        def __getitem__(self, index):
            return read_one(self.slide, patches, index)

    dataset = PatchDataset()
    count = 0
    with warnings.catch_warnings():  # the LUT's output is read-only; the batch copies it
        warnings.filterwarnings('ignore', 'The given NumPy array is not writable')
        for batch in torch.utils.data.DataLoader(dataset, batch_size=32, num_workers=workers):
            count += len(batch)
    dataset.slide.close()
    return count


def reader_read(patches: SlidePatches, workers: int, defer_lut: bool = False) -> int:
    count = 0
    with PatchReader(batch_size=32, workers=workers, defer_lut=defer_lut) as reader:
        for batch in reader.batches(patches):
            count += len(batch.indices)
    return count


def slide_patches(path: pathlib.Path) -> SlidePatches:
    """Every whole patch of the slide's grid at TARGET_MPP (the benchmark reads them all)."""
    with Slide(path) as slide:
        plan = slide.plan(TARGET_MPP, PATCH_SIZE)
        coords, _ = grid_positions(*slide.dimensions, plan.extent)
    lut = np.clip(np.arange(256) * 1.1 - 10, 0, 255).astype(np.uint8)[None].repeat(3, axis=0)
    return SlidePatches(path.stem, str(path), coords, plan.level, plan.read_size, PATCH_SIZE,
                        SlideStain('histogram', {'stain_lut': lut}), plan.extent / plan.read_size)


def covered_tiles(patches: SlidePatches, page) -> list[int]:
    """Indices of the level's tiles that the patches' regions cover, each once."""
    across = -(-page.imagewidth // page.tilewidth)
    found = set()
    for x, y in patches.coords:
        left, top = int(round(x / patches.downsample)), int(round(y / patches.downsample))
        for tile_row in range(top // page.tilelength,
                              (top + patches.read_size - 1) // page.tilelength + 1):
            for col in range(left // page.tilewidth,
                             (left + patches.read_size - 1) // page.tilewidth + 1):
                found.add(tile_row * across + col)
    return sorted(found)


def decode_only(patches: SlidePatches) -> float:
    """The decode-only ceiling: patches/s when only the tiles the patches cover are decoded, by
    the reader's own decode call (`TiffTiles.decode`: libjpeg-turbo into a reused buffer for
    JPEG, tifffile's codec otherwise), their bytes read beforehand, each tile once, one thread,
    no assembly, stain or copies."""
    with tifffile.TiffFile(patches.path) as tif:
        page = tif.series[0].levels[patches.level].keyframe
        tiles = covered_tiles(patches, page)
        data = []
        for index in tiles:
            tif.filehandle.seek(page.dataoffsets[index])
            data.append(tif.filehandle.read(page.databytecounts[index]))
    handle = openslide.OpenSlide(patches.path)
    decoder = TiffTiles.open(patches.path, handle)
    start = time.perf_counter()
    for index, raw in zip(tiles, data):
        decoder.decode(patches.level, index, raw)
    seconds = time.perf_counter() - start
    decoder.close()
    handle.close()
    return len(patches.coords) / seconds


def timed(function) -> float:
    start = time.perf_counter()
    count = function()
    return count / (time.perf_counter() - start)


def measure(path: pathlib.Path, workers: int, rounds: int) -> dict:
    """Median patches/s of the per-patch loop, the DataLoader with `workers` processes,
    PatchReader with 1 and `workers` threads, and the decode-only ceiling, alternating round by
    round."""
    patches = slide_patches(path)
    rates = {'naive': [], 'dataloader': [], 'single': [], 'parallel': [], 'decode': [],
             'deferred': []}
    for _ in range(rounds):
        rates['decode'].append(decode_only(patches))
        rates['naive'].append(timed(lambda: naive_read(patches)))
        rates['single'].append(timed(lambda: reader_read(patches, 1)))
        rates['deferred'].append(timed(lambda: reader_read(patches, 1, defer_lut=True)))
        rates['dataloader'].append(timed(lambda: dataloader_read(patches, workers)))
        rates['parallel'].append(timed(lambda: reader_read(patches, workers)))
    return {'patches': patches, **{name: statistics.median(r) for name, r in rates.items()}}


def slides(quick: bool) -> list[tuple[str, float]]:
    """(format, level-0 mpp) of the slides measured."""
    return [('svs', 0.5)] if quick else [('svs', 0.5), ('tiff', 0.5), ('svs', 0.25)]


def rows_of(result: dict, what: str, workers: int) -> list[dict]:
    """One slide's rows: 1 thread vs the per-patch loop and vs decode-only; `workers` threads
    vs the DataLoader with `workers` processes."""
    codec = 'JPEG 2000' if 'JPEG 2000' in what else 'JPEG'
    bound = f'{codec} decode of {result["patches"].read_size}-px regions on the cores used'
    return [
        row(f'PatchReader, 1 thread: {what}', 'patches/s', result['single'], result['naive'],
            'one OpenSlide read_region per patch, one process', True,
            bound + ' (one core each)'),
        row(f'PatchReader, 1 thread, share of decode-only: {what}', 'patches/s',
            result['single'], result['decode'], 'decoding only the tiles the patches cover, '
            'once each, bytes in memory, 1 thread (the ceiling)', True,
            'the ratio is the share of the decode ceiling reached'),
        row(f'PatchReader, 1 thread, stain lookup left to the device, share of decode-only: '
            f'{what}', 'patches/s', result['deferred'], result['decode'],
            'decoding only the tiles the patches cover (the ceiling)', True,
            'as the extract stage reads: the lookup is fused into the network\'s input'),
        row(f'PatchReader, {workers} threads: {what}', 'patches/s', result['parallel'],
            result['dataloader'], f'read_region per patch in a torch DataLoader, {workers} '
            'worker processes (TRIDENT, CLAM)', True,
            bound + f' ({workers} threads against {workers} processes)',
            single_process_loop=result['naive']),
    ]


def run(quick: bool, workers: int | None = None, rounds: int = 3,
        size: tuple[int, int] = (16384, 12288)) -> list[dict]:
    """Rows per slide (`rows_of`). quick: one SVS slide at 0.5 um/px, 4096 x 3072 (one 2048-px
    render repeated); else SVS and TIFF at 0.5 um/px, SVS at 0.25 um/px, and the real JPEG 2000
    TCGA slide of ../shared/data where present (read at level 0: it has no mpp)."""
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
            rows += rows_of(result, f'{fmt} {mpp} um/px, {len(patches.coords)} patches of '
                            f'{PATCH_SIZE} px (read {patches.read_size} px at level '
                            f'{patches.level})', workers)
    if not quick and REAL_SLIDE.exists():
        result = measure(REAL_SLIDE, workers, rounds)
        rows += rows_of(result, f'real TCGA SVS (JPEG 2000), {len(result["patches"].coords)} '
                        f'patches of {PATCH_SIZE} px at level 0', workers)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--rounds', type=int, default=3)
    parser.add_argument('--size', type=int, nargs=2, default=(16384, 12288), metavar=('W', 'H'))
    parser.add_argument('--quick', action='store_true', help='one small slide')
    args = parser.parse_args()
    print(f'machine: {machine_info.cpu_line()}, {os.cpu_count()} cores, '
          f'python {platform.python_version()}, openslide {openslide.__library_version__}')
    print(f'patches: {PATCH_SIZE} px at {TARGET_MPP} um/px, PatchReader workers={args.workers}, '
          f'median of {args.rounds} rounds\n')
    print(f'{"row":96s} {"patches/s":>9s} {"ref/s":>8s} {"ratio":>6s}  reference')
    for r in run(args.quick, args.workers, args.rounds, tuple(args.size)):
        print(f'{r["name"]:96s} {r["pathjax"]:9.1f} {r["reference"]:8.1f} {r["ratio"]:5.1f}x  '
              f'{r["reference_name"]}')


if __name__ == '__main__':
    main()
