"""The tile stage: pathjax's per-slide scan vs a plain implementation of the same method.

Per slide, both: open the slide, plan 512-px reads at 0.5 um/px, read a low-resolution overview
(the same downsample), apply the method's background rule (any channel > 200, or >= 90% of the
200x200 level-0 neighbourhood background), keep the grid patches with tissue fraction >= 0.25,
read `stain.fit_patches` (32) kept patches for the stain histograms, and write the results.
pathjax: `tile_stage.scan_all` with one worker (what each of the stage's worker processes does
per slide: strip-wise overview, integer window sums, summed-area patch fractions, direct tile
decoding, QC picture and thumbnail PNGs, scan file). Reference, written plainly below: OpenSlide's
`get_thumbnail`, `scipy.ndimage.uniform_filter` for the neighbourhood rule, a Python loop over
the grid for the patch fractions, one `read_region` per stain patch, `np.savez` + one PNG.
The two alternate slide set by slide set over the rounds; medians are reported. The kept patch
sets are compared (they differ only where the overviews' resampling differs).

Peak memory: each side tiles the same slides in a fresh subprocess (no JAX, as a tile worker),
whose peak RSS `memory.run_measured` samples.

  python benchmarks/tile_stage.py [--quick]
"""

import argparse
import math
import pathlib
import statistics
import sys
import tempfile
import time

import numpy as np
import openslide
from PIL import Image
from scipy import ndimage

import slide_files
from memory import run_measured
from pathjax import artifacts
from pathjax.cohort import SlideRecord
from pathjax.slides import tile_stage
from pathjax.slides.tissue import TissueRule
from rows import print_table, row

PATCH_SIZE, TARGET_MPP, FIT_PATCHES = 512, 0.5, 32
RULE = TissueRule()  # the method's settings: any channel > 200, 200 px at 90%, keep >= 25%
SETTINGS = tile_stage.TileSettings(mpp=TARGET_MPP, patch_size=PATCH_SIZE, fallback_level=0,
                                   rule=RULE, stain_method='histogram',
                                   stain_fit_patches=FIT_PATCHES)


# ---- reference ----

def reference_scan(path: str, out: pathlib.Path, seed: int = 0) -> np.ndarray:
    """The method written plainly with OpenSlide, numpy and scipy: kept patch coords [N, 2]."""
    slide = openslide.OpenSlide(path)
    width, height = slide.dimensions
    mpp = math.sqrt(float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
                    * float(slide.properties[openslide.PROPERTY_NAME_MPP_Y]))
    level_mpps = [mpp * d for d in slide.level_downsamples]
    level = max((i for i, m in enumerate(level_mpps) if m <= TARGET_MPP * 1.02),
                key=lambda i: level_mpps[i])
    read_size = round(PATCH_SIZE * TARGET_MPP / level_mpps[level])
    extent = read_size * slide.level_downsamples[level]  # patch side, level-0 pixels
    # the overview: neighbourhood / 8 x level 0, or coarser to keep its long side >= 1024
    downsample = max(1.0, min(min(RULE.neighbourhood, extent) / 8, max(width, height) / 1024))
    size = (round(width / downsample), round(height / downsample))
    overview = np.asarray(slide.get_thumbnail(size).convert('RGB'))
    background = (overview > RULE.threshold).any(axis=2)
    window = max(1, round(RULE.neighbourhood / downsample))
    inside = ndimage.uniform_filter(np.ones(background.shape, np.float32), window, mode='constant')
    share = ndimage.uniform_filter(background.astype(np.float32), window, mode='constant') / inside
    background |= share >= RULE.neighbourhood_fraction
    tissue = ~background
    scale_y, scale_x = tissue.shape[0] / height, tissue.shape[1] / width
    kept = []
    for r in range(int(height // extent)):
        for c in range(int(width // extent)):
            x, y = round(c * extent), round(r * extent)
            top, left = round(y * scale_y), round(x * scale_x)
            bottom = max(round((y + extent) * scale_y), top + 1)
            right = max(round((x + extent) * scale_x), left + 1)
            if tissue[top:bottom, left:right].mean() >= RULE.min_fraction:
                kept.append((x, y))
    kept = np.asarray(kept, np.int64).reshape(-1, 2)
    histograms = np.zeros((3, 256), np.int64)
    sample = np.random.default_rng(seed).permutation(len(kept))[:FIT_PATCHES]
    for x, y in kept[sample]:
        region = slide.read_region((int(x), int(y)), level, (read_size, read_size)).convert('RGB')
        patch = np.asarray(region.resize((PATCH_SIZE, PATCH_SIZE), Image.Resampling.BOX))
        histograms += [np.bincount(patch[..., c].ravel(), minlength=256) for c in range(3)]
    slide.close()
    np.savez(out / f'{pathlib.Path(path).stem}.npz', coords=kept, histograms=histograms)
    Image.fromarray(overview).save(out / f'{pathlib.Path(path).stem}.png')
    return kept


# ---- the two sides ----

def records(paths: list[str]) -> list[SlideRecord]:
    return [SlideRecord(pathlib.Path(p).stem, p, 'positive', pathlib.Path(p).stem, 'train', i + 2)
            for i, p in enumerate(paths)]


def pathjax_tile(paths: list[str], workdir: str) -> dict[str, np.ndarray]:
    """tile_stage.scan_all with one worker; kept coords per slide."""
    entries = tile_stage.scan_all(records(paths), SETTINGS, workdir, workers=1)
    bad = [e for e in entries.values() if e.status != 'ok']
    if bad:
        raise RuntimeError(f'pathjax tiling failed: {bad}')
    return {p: artifacts.load_npz(tile_stage.scan_path(workdir, pathlib.Path(p).stem),
                                  ('coords',))['coords'] for p in paths}


def reference_tile(paths: list[str], folder: str) -> dict[str, np.ndarray]:
    return {p: reference_scan(p, pathlib.Path(folder)) for p in paths}


SIDES = {'pathjax': pathjax_tile, 'reference': reference_tile}


def agreement(ours: dict, theirs: dict) -> float:
    """Jaccard index of the two kept patch sets, over all slides."""
    a = {(p, *xy) for p, coords in ours.items() for xy in coords.tolist()}
    b = {(p, *xy) for p, coords in theirs.items() for xy in coords.tolist()}
    return len(a & b) / max(len(a | b), 1)


def peak_rss(side: str, paths: list[str]) -> int:
    """Peak RSS (bytes) of a fresh process tiling `paths` with one side."""
    with tempfile.TemporaryDirectory() as folder:
        measured = run_measured([sys.executable, __file__, '--child', side, '--out', folder,
                                 *paths])
    if measured.returncode:
        raise RuntimeError(f'the {side} tiling subprocess failed ({measured.returncode})')
    return measured.peak_rss


def run(quick: bool) -> list[dict]:
    """Rows: slides/s, kept patches/s, peak RSS. quick: 2 slides of 6144 x 4096 px at
    0.5 um/px, 2 rounds; else 3 slides of 16384 x 12288, 3 rounds (one 2048-px render repeated)."""
    count, (width, height), rounds = (2, (6144, 4096), 2) if quick else (3, (16384, 12288), 3)
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        paths = [str(slide_files.write_slide(folder / f'slide{i}.svs', width, height, block=2048,
                                             seed=i)) for i in range(count)]
        seconds, kept = {side: [] for side in SIDES}, {}
        for _ in range(rounds):
            for side, tile in SIDES.items():
                with tempfile.TemporaryDirectory(dir=folder) as out:
                    start = time.perf_counter()
                    kept[side] = tile(paths, out)
                    seconds[side].append(time.perf_counter() - start)
        peak = {side: peak_rss(side, paths) for side in SIDES}
        level0 = slide_files.level0_bytes(paths[0])
    median = {side: statistics.median(s) for side, s in seconds.items()}
    patches = {side: sum(map(len, kept[side].values())) for side in SIDES}
    what = f'{count} slides of {width} x {height} px at 0.5 um/px'
    reference = 'the method written plainly (get_thumbnail, uniform_filter, a loop over patches)'
    same = agreement(kept['pathjax'], kept['reference'])
    bound = (f'per slide: overview read + {FIT_PATCHES} stain patches decoded (JPEG) + mask on '
             f'the overview, one core; kept patch sets agree to Jaccard {same:.3f}')
    return [
        row(f'tile: {what}', 'slides/s', count / median['pathjax'], count / median['reference'],
            reference, True, bound),
        row(f'tile: kept patches/s, {what}', 'patches/s', patches['pathjax'] / median['pathjax'],
            patches['reference'] / median['reference'], reference, True, bound,
            kept={side: patches[side] for side in SIDES}),
        row(f'tile: peak RSS of a worker process, {what}', 'MiB', peak['pathjax'] / 2**20,
            peak['reference'] / 2**20, 'the plain implementation in its own process', False,
            f'interpreter and libraries; overview and stain patches; one slide\'s level-0 pixels '
            f'would be {level0 / 2**20:.0f} MiB'),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--child', choices=tuple(SIDES), help=argparse.SUPPRESS)
    parser.add_argument('--out', help=argparse.SUPPRESS)
    parser.add_argument('paths', nargs='*', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        SIDES[args.child](args.paths, args.out)
        return
    print_table(run(args.quick))


if __name__ == '__main__':
    main()
