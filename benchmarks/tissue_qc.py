"""Tissue QC against known masks: how many kept patches carry pen, blur or a fold with QC off
(the method's background rule alone) and on, on synthetic slides that carry all three; what
tissue.method=otsu keeps against the true tissue; and what QC drops on the shared real slide.

A kept patch counts as inked (folded) when at least tissue.max_artifact_fraction (0.1) of its
area is ink (fold) by the generator's mask, as blurred when at least half of it is in the
out-of-focus region; a patch is clean when under 1% of it is any artifact. Each setting tiles the
same slides with the tile stage's per-slide scan (`tile_stage.scan_slide`, one process).

  python benchmarks/tissue_qc.py [--quick] [--method-size]

--method-size reads 512 px patches at 0.5 um/px (the method's); the default is the demo's 64 px
at 2 um/px. Not a speed benchmark: the figures are shares, recorded in BENCHMARKS.md.
"""

import argparse
import json
import pathlib
import tempfile

import numpy as np

from pathjax import artifacts
from pathjax.cohort import SlideRecord
from pathjax.slides import synthetic, synthetic_artifacts, synthetic_cohort, tile_stage
from pathjax.slides.tiling import patch_tissue_fractions
from pathjax.slides.tissue import TissueRule

REAL_SLIDE = (pathlib.Path(__file__).resolve().parents[2] / 'shared' / 'data' / 'slides'
              / 'tcga-cr-7395-01a-01-ts1.svs')
ARTIFACT_SHARE = {'pen': 0.1, 'fold': 0.1, 'blur': 0.5}  # of a patch's area: it carries that
CLEAN_SHARE = 0.01
SIZES = {'demo': (2.0, 64, 50.0), 'method': (0.5, 512, 100.0)}  # mpp, patch px, tissue.max_blur
QC = {'remove_pen': True, 'remove_folds': True, 'max_blur': 'the size\'s'}
SETTINGS = {'seed, no QC': {}, 'seed + pen, fold, blur QC': QC,
            'otsu, no QC': {'method': 'otsu'}, 'otsu + pen, fold, blur QC': {'method': 'otsu', **QC}}


def scan(path, slide_id: str, workdir: pathlib.Path, size: str, setting: dict) -> dict:
    """The scan arrays of one slide tiled with `setting` (TissueRule fields) at `size`."""
    mpp, patch_size, max_blur = SIZES[size]
    fields = dict(setting, max_blur=max_blur if 'max_blur' in setting else 0.0)
    settings = tile_stage.TileSettings(mpp=mpp, patch_size=patch_size, fallback_level=0,
                                       rule=TissueRule(**fields), stain_method='none',
                                       stain_fit_patches=1)
    record = SlideRecord(slide_id, str(path), 'negative', slide_id, 'train', line=2)
    entry = tile_stage.scan_slide(record, settings, str(workdir))
    if entry.status == 'error':
        raise RuntimeError(f'{slide_id}: {entry.message}')
    return artifacts.load_npz(tile_stage.scan_path(workdir, slide_id))


def synthetic_shares(count: int, width: int, height: int, size: str, folder: pathlib.Path
                     ) -> dict[str, dict]:
    """{setting: shares of the kept patches that carry each artifact, clean patches lost,
    true tissue of the kept patches} over `count` synthetic slides with pen, blur and folds."""
    manifest = synthetic_cohort.make_cohort(folder / 'slides', count, seed=3, width=width,
                                            height=height, artifacts=synthetic_artifacts.ARTIFACTS)
    specs = synthetic_cohort.cohort_specs(count, seed=3, width=width, height=height,
                                          artifacts=synthetic_artifacts.ARTIFACTS)
    paths = [line.split(',')[1] for line in manifest.read_text().splitlines()[1:]]
    masks = [synthetic.artifact_masks(spec) for spec in specs]
    out, clean_kept = {}, {}
    for name, setting in SETTINGS.items():
        kept, carrying = 0, {a: 0 for a in ARTIFACT_SHARE}
        clean, tissue = set(), []
        for spec, path, mask in zip(specs, paths, masks):
            tiles = scan(path, spec.slide_id, folder / name.replace(' ', '_'), size, setting)
            size_0, extent = (spec.width, spec.height), float(tiles['extent'])
            share = {a: patch_tissue_fractions(mask[a], size_0, tiles['coords'], extent)
                     for a in ARTIFACT_SHARE}
            kept += len(tiles['coords'])
            for artifact, least in ARTIFACT_SHARE.items():
                carrying[artifact] += int((share[artifact] >= least).sum())
            free = np.all([share[a] < CLEAN_SHARE for a in ARTIFACT_SHARE], axis=0)
            clean |= {(spec.slide_id, int(x), int(y)) for x, y in tiles['coords'][free]}
            tissue.append(patch_tissue_fractions(mask['tissue'], size_0, tiles['coords'], extent))
        clean_kept[name] = clean
        out[name] = {'kept': kept, **{f'{a} share': carrying[a] / max(kept, 1) for a in carrying},
                     'true tissue of kept': float(np.concatenate(tissue).mean())}
    for name in SETTINGS:  # clean patches of the same tissue rule dropped by QC
        plain = clean_kept[name.split(' +')[0].replace(', no QC', '') + ', no QC']
        out[name]['clean patches lost'] = len(plain - clean_kept[name]) / max(len(plain), 1)
    return out


def real_slide_drops(folder: pathlib.Path, size: str) -> dict[str, dict]:
    """{setting: kept patches and drops per cause} on the shared real TCGA slide."""
    out = {}
    for name, setting in SETTINGS.items():
        tiles = scan(REAL_SLIDE, 'tcga', folder / ('real_' + name.replace(' ', '_')), size, setting)
        out[name] = {'kept': len(tiles['coords']),
                     **{f'dropped {c}': int(n) for c, n in zip(('background', 'pen', 'fold', 'blur'),
                                                             tiles['dropped'])}}
    return out


def run(quick: bool, size: str = 'demo') -> dict:
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        count, width, height = (2, 2048, 1536) if quick else (8, 4096, 3072)
        result = {'size': size, 'slides': count, 'slide_size': [width, height],
                  'synthetic': synthetic_shares(count, width, height, size, folder)}
        if REAL_SLIDE.exists():
            result['real'] = real_slide_drops(folder, size)
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--method-size', action='store_true')
    args = parser.parse_args()
    result = run(args.quick, 'method' if args.method_size else 'demo')
    print(json.dumps(result, indent=1))


if __name__ == '__main__':
    main()
