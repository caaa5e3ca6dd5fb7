"""End to end, slides to features: pathjax's tile and extract stages with a frozen ViT vs a
TRIDENT-style pipeline (OpenSlide read_region in DataLoader workers feeding timm's model).

Both sides use the same ViT-S/16 weights (timm's `vit_small_patch16_224`, random with
torch.manual_seed(0), in a .safetensors file), the same patch coordinates, level and read size
(pathjax's tiles file), the same pixels (RGBA -> RGB over white and the resize of
`pathjax.slides.reader`, the slide's stain LUT) and normalization (the preset's mean and std:
timm's 0.5 / 0.5), the same precision, the same batch size (64; quick 16), on the same cores
and device. Their features (the class token after the final norm) must agree to
MAX_DIFFERENCE[precision], patch by patch in coordinate order, or the run stops.
Precision: float32 (on a GPU without TF32 on either side: JAX_DEFAULT_MATMUL_PRECISION=highest,
torch's TF32 switches off), or bfloat16, each side's own way (pathjax `config.dtype=bfloat16`:
bfloat16 compute, float32 parameters; torch.autocast), as each runs best on a GPU.

pathjax: `python launch.py --config configs/default.py --stages tile,extract` with the preset,
`feature_net.weights`, `feature_net.learn=False`, `workers` = --threads slide readers (its
defaults otherwise: XLA's CPU devices one per core), a fresh workdir. Stage times come from the
run's absl log: tile = 'stage tile' to its report line, extract = 'stage extract' to its report
line (loading and checking the weights, compiling, reading, computing, writing
features/<slide>.npz). Python, JAX and library start-up are in neither (the process's wall time
is recorded beside, `pathjax_seconds['process']`).
TRIDENT-style, in this process: create timm's model (`num_classes=0`: its output is the class
token after the norm), load the state_dict from the file, then per slide a torch Dataset whose
__getitem__ is one OpenSlide `read_region` at pathjax's coordinates, RGB, resize, stain LUT,
torchvision ToTensor + Normalize; a DataLoader (each `--workers` count in turn) into the model
in eval mode under `torch.inference_mode()`; features and coords written to <slide>.h5 as
TRIDENT does (on a GPU: the model on the device, pinned host memory, each batch copied over and
its features back). Timed from model creation to the last file written; the best worker
count is its figure ("each at its best settings"). This process (so pathjax's subprocess too)
is pinned to --threads cores, torch.set_num_threads(--threads). With --rounds, the sides
alternate round by round and medians are reported.

Rows (patches/s; > 1: pathjax faster):
- `end to end extract`: pathjax's extract stage vs the TRIDENT-style extraction.
- `end to end extract, rerun`: pathjax's extract stage run again in the same workdir (its
  features deleted), as a user reruns it with more slides or predicts new ones: its compiled
  programs come from the workdir's persistent compilation cache. The TRIDENT side is the same.
- `end to end tile+extract`: pathjax's tile and extract stages vs the same TRIDENT-style
  extraction, which gets pathjax's coordinates for free (TRIDENT's own tissue segmentation and
  patching are not timed): what a user of each waits for from slide files to features.
Full size also gives both rows on a cohort of biopsy-sized slides (--biopsies, of --biopsy-size:
a few dozen patches each, where per-slide costs weigh: batches that end with the slide, a
DataLoader started per slide), and on the real TCGA slide of ../shared/data/slides (skipped when
the folder is absent; no mpp metadata, so patches are read at level 0).

  python benchmarks/trident_pipeline.py [--quick] [--slides 4] [--size 8192 6144] [--batch 64]
                                        [--biopsies 16] [--biopsy-size 2048 1536]
                                        [--workers 0 1 2] [--threads N] [--rounds 1]
                                        [--real-slide PATH] [--device cpu|cuda]
                                        [--precision float32|bfloat16]
"""

import argparse
import csv
import dataclasses
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import h5py
import numpy as np
import openslide
import timm
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from torchvision import transforms

import slide_files
from feature_net import pin_threads
from full_size import log_times
from patch_reading import read_one
from machine_info import cpu_line
from pathjax import artifacts
from pathjax.cohort import SlideRecord
from pathjax.data.features import features_path
from pathjax.models.patch import vit_presets
from pathjax.slides.patch_stream import SlidePatches
from pathjax.slides.tile_stage import tiles_path
from rows import print_table, row
from vit_encoders import vit_flops

REPO = pathlib.Path(__file__).resolve().parents[1]
PRESET = vit_presets.get_preset('vit_small_patch16_224')
REAL_SLIDE = REPO.parent / 'shared' / 'data' / 'slides' / 'tcga-cr-7395-01a-01-ts1.svs'
# Features are of unit scale (after a layer norm). bfloat16 keeps 8 bits of mantissa: the two
# sides differed by 0.036 at most over 18 patches on the Zen 5 VM; a wrong input is off by ~1.
MAX_DIFFERENCE = {'float32': 1e-4, 'bfloat16': 0.25}
LABEL = 'wild_type'  # configs/default.py's first class; labels play no part in these stages
SIZES = {True: {'slides': 1, 'size': (1536, 1536), 'batch': 16,  # quick
                'biopsies': 2, 'biopsy_size': (1024, 1024)},
         False: {'slides': 4, 'size': (8192, 6144), 'batch': 64,
                 'biopsies': 16, 'biopsy_size': (2048, 1536)}}


# ---- inputs ----

def write_weights(path: pathlib.Path) -> pathlib.Path:
    """timm's ViT-S/16 without a head, random with seed 0, as a .safetensors state_dict."""
    torch.manual_seed(0)
    model = timm.create_model(PRESET.timm_name, pretrained=False,
                              **vit_presets.timm_kwargs(PRESET))
    save_file(model.state_dict(), path)
    return path


def synthetic_records(folder: pathlib.Path, width: int, height: int,
                      copies: int) -> list[SlideRecord]:
    """`copies` hard links to one synthetic SVS slide (0.5 um/px) in `folder`, all training
    slides."""
    folder.mkdir(exist_ok=True)
    path = slide_files.write_slide(folder / 'bench.svs', width, height, block=2048)
    return list(slide_files.cohort(path, copies, folder).slides)


def real_records(path: pathlib.Path) -> list[SlideRecord]:
    return [SlideRecord('real', str(path), LABEL, 'real', 'train', line=2)]


def write_manifest(records: list[SlideRecord], path: pathlib.Path) -> pathlib.Path:
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(('slide_id', 'path', 'label', 'case_id', 'split'))
        writer.writerows((r.slide_id, r.path, LABEL, r.case_id, r.split) for r in records)
    return path


@dataclasses.dataclass(frozen=True)
class Sides:
    """How both sides run: the batch size; pathjax's reader threads, which are also the cores
    both sides are pinned to and torch's threads; the DataLoader worker counts tried; rounds;
    the device ('cpu', or 'cuda': pathjax on JAX's GPU backend) and the precision; whether
    pathjax's extract stage is also rerun in its workdir (the `extract, rerun` row)."""

    batch_size: int
    threads: int
    workers: tuple[int, ...]
    rounds: int = 1
    device: str = 'cpu'
    precision: str = 'float32'
    rerun: bool = True


# ---- pathjax ----

def pathjax_run(manifest, weights, workdir: pathlib.Path, sides: Sides, log_name: str = ''
                ) -> dict:
    """launch.py --stages tile,extract in a subprocess; {'tile', 'extract', 'tile+extract',
    'process'} seconds (the stages' from the log, <workdir>.log or `log_name` beside it)."""
    command = [sys.executable, 'launch.py', '--config', 'configs/default.py', '--verbosity=0',
               f'--workdir={workdir}', '--stages=tile,extract',  # the log's timed records
               f'--config.data.manifest={manifest}', f'--config.workers={sides.threads}',
               f'--config.feature_net.backbone={PRESET.name}',
               f'--config.feature_net.weights={weights}', '--config.feature_net.learn=False',
               f'--config.extract.batch_size={sides.batch_size}',
               f'--config.dtype={sides.precision}']
    environment = dict(os.environ)
    if sides.precision == 'float32':
        environment['JAX_DEFAULT_MATMUL_PRECISION'] = 'highest'  # no TF32 on a GPU
    log = workdir.parent / (log_name or f'{workdir.name}.log')
    start = time.perf_counter()
    with open(log, 'w') as out:
        done = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT,
                              env=environment)
    process = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f'pathjax failed ({done.returncode}):\n{log.read_text()[-3000:]}')
    (tile_start,), (tile_end,) = log_times(log, 'stage tile'), log_times(log, 'reports/tile.json')
    (extract_start,), (extract_end,) = (log_times(log, 'stage extract'),
                                        log_times(log, 'reports/extract.json'))
    return {'tile': tile_end - tile_start, 'extract': extract_end - extract_start,
            'tile+extract': extract_end - tile_start, 'process': process}


def tiled_slides(workdir, records: list[SlideRecord]) -> list[SlidePatches]:
    """Each slide's read plan from pathjax's tiles file."""
    return [SlidePatches.from_tiles(r.slide_id, r.path, artifacts.load_npz(
        tiles_path(workdir, r.slide_id))) for r in records]


# ---- TRIDENT-style ----

class RegionDataset(torch.utils.data.Dataset):
    """Patch i of a slide: read_region -> RGB -> resize -> stain LUT -> normalized float32
    [3, S, S]; the slide is opened once per worker."""

    def __init__(self, slide: SlidePatches):
        self.slide, self.handle = slide, None
        self.transform = transforms.Compose([transforms.ToTensor(),
                                             transforms.Normalize(PRESET.mean, PRESET.std)])

    def __len__(self) -> int:
        return len(self.slide.coords)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, np.ndarray]:
        if self.handle is None:
            self.handle = openslide.OpenSlide(self.slide.path)
        patch = read_one(self.handle, self.slide, index)
        return self.transform(Image.fromarray(patch)), self.slide.coords[index]


def trident_model(weights, device: str) -> torch.nn.Module:
    """timm's model as TRIDENT builds an encoder: no head, the class token after the norm."""
    model = timm.create_model(PRESET.timm_name, pretrained=False, num_classes=0)
    model.load_state_dict(load_file(weights))
    return model.eval().to(device)


def trident_slide(model, slide: SlidePatches, workers: int, sides: Sides, out) -> None:
    """One slide's features [N, D] and coords [N, 2] to out/<slide_id>.h5."""
    loader = torch.utils.data.DataLoader(RegionDataset(slide), batch_size=sides.batch_size,
                                         num_workers=workers, shuffle=False,
                                         pin_memory=sides.device == 'cuda')
    features, coords = [], []
    with torch.inference_mode(), torch.autocast(sides.device, torch.bfloat16,
                                                enabled=sides.precision == 'bfloat16'):
        for images, corners in loader:
            output = model(images.to(sides.device, non_blocking=True))
            features.append(output.float().cpu().numpy())
            coords.append(corners.numpy())
    with h5py.File(pathlib.Path(out) / f'{slide.slide_id}.h5', 'w') as f:
        f['features'] = np.concatenate(features)
        f['coords'] = np.concatenate(coords)


def trident_run(weights, slides: list[SlidePatches], workers: int, sides: Sides, out) -> float:
    """Seconds from loading the model to the last slide's file written."""
    start = time.perf_counter()
    model = trident_model(weights, sides.device)
    for slide in slides:
        trident_slide(model, slide, workers, sides, out)
    return time.perf_counter() - start


def max_difference(workdir, slides: list[SlidePatches], out) -> float:
    """Max abs difference of the two sides' features over every patch (coords must match)."""
    worst = 0.0
    for slide in slides:
        ours = artifacts.load_npz(features_path(workdir, slide.slide_id), ('features', 'coords'))
        with h5py.File(pathlib.Path(out) / f'{slide.slide_id}.h5') as f:
            theirs, coords = f['features'][:], f['coords'][:]
        if not np.array_equal(ours['coords'], coords):
            raise RuntimeError(f'{slide.slide_id}: the two sides\' patch coordinates differ')
        worst = max(worst, float(np.abs(ours['features'] - theirs).max()))
    return worst


# ---- measurement ----

def measure(records, weights, folder: pathlib.Path, sides: Sides) -> dict:
    """Both sides over `records`, alternating round by round: pathjax's median stage seconds
    (in a fresh workdir, and its extract rerun there), TRIDENT-style median seconds per worker
    count, patches, max abs difference."""
    manifest = write_manifest(records, folder / 'manifest.csv')
    pathjax, reruns, trident = [], [], {w: [] for w in sides.workers}
    for i in range(sides.rounds):
        workdir = folder / f'pathjax{i}'
        pathjax.append(pathjax_run(manifest, weights, workdir, sides))
        if sides.rerun:
            shutil.rmtree(workdir / 'features')
            reruns.append(pathjax_run(manifest, weights, workdir, sides,
                                      f'{workdir.name}.rerun.log'))
        slides = tiled_slides(workdir, records)
        for w in sides.workers:
            trident[w].append(trident_run(weights, slides, w, sides, folder))
    return {'pathjax': {k: statistics.median(p[k] for p in pathjax) for k in pathjax[0]},
            'rerun_extract': statistics.median(r['extract'] for r in reruns) if reruns else None,
            'trident': {w: statistics.median(s) for w, s in trident.items()},
            'patches': sum(len(s.coords) for s in slides),
            'max_abs_difference': max_difference(workdir, slides, folder)}


def rows_of(result: dict, what: str, sides: Sides) -> list[dict]:
    """The extract and tile+extract rows of one measurement of the slides `what` describes."""
    patches, seconds = result['patches'], result['pathjax']
    tolerance = MAX_DIFFERENCE[sides.precision]
    if result['max_abs_difference'] > tolerance:
        raise RuntimeError(f'{what}: features differ by {result["max_abs_difference"]:.3g} '
                           f'(> {tolerance:g})')
    rates = {w: patches / s for w, s in result['trident'].items()}
    best = max(rates, key=rates.get)
    extract = patches / seconds['extract']
    flops = extract * vit_flops(PRESET.arch, PRESET.input_size)
    reference = (f'TRIDENT-style: read_region in {best} DataLoader worker(s) (best of '
                 f'{sorted(rates)}), timm eval + inference_mode, h5 per slide')
    bound = (f'ViT-S/16 {sides.precision} forward: {flops / 1e9:.3g} GFLOP/s (pathjax), '
             f'{sides.threads} cores' + (', one GPU' if sides.device == 'cuda' else ''))
    extra = {'max_abs_difference': result['max_abs_difference'], 'threads': sides.threads,
             'device': sides.device, 'precision': sides.precision,
             'patches': patches, 'trident_patches_per_s': {str(w): r for w, r in rates.items()},
             'pathjax_seconds': seconds, 'pathjax_rerun_extract_seconds': result['rerun_extract']}
    rerun = [] if result['rerun_extract'] is None else [
        row(f'end to end extract, rerun: {what}', 'patches/s', patches / result['rerun_extract'],
            rates[best], reference + '; pathjax\'s extract rerun in its workdir (compiled '
            'programs from its cache)', True, bound, **extra)]
    return [
        row(f'end to end extract: {what}', 'patches/s', extract, rates[best],
            reference + ' (model load to files written)', True, bound, flops_per_s=flops,
            **extra),
        *rerun,
        row(f'end to end tile+extract: {what}', 'patches/s', patches / seconds['tile+extract'],
            rates[best], reference + '; its tissue segmentation and patching not timed (given '
            'pathjax\'s coordinates)', True, bound, **extra),
    ]


def run_all(slides: int, size: tuple[int, int], biopsies: int, biopsy_size: tuple[int, int],
            real_slide: str, sides: Sides) -> list[dict]:
    """The rows of the synthetic cohort, of the biopsy-sized one (if any), then of
    `real_slide` where given and present."""
    pin_threads(sides.threads)
    if sides.device == 'cuda' and sides.precision == 'float32':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    found = []
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        weights = write_weights(folder / 'vit_small.safetensors')
        cohorts = [(f'{slides} synthetic slide(s) of {size[0]} x {size[1]} (224 px at '
                    '0.5 um/px)', synthetic_records(folder / 'slides', *size, slides))]
        if biopsies:
            cohorts.append((f'{biopsies} biopsy-sized synthetic slides of {biopsy_size[0]} x '
                            f'{biopsy_size[1]}', synthetic_records(folder / 'biopsies',
                                                                   *biopsy_size, biopsies)))
        if real_slide and pathlib.Path(real_slide).exists():
            cohorts.append(('1 real TCGA slide (JPEG 2000, no mpp: 224 px from level 0)',
                            real_records(pathlib.Path(real_slide))))
        for i, (slides_text, records) in enumerate(cohorts):
            part = folder / f'cohort{i}'
            part.mkdir()
            result = measure(records, weights, part, sides)
            what = (f'{result["patches"]} patches from {slides_text}, ViT-S/16, batch '
                    f'{sides.batch_size}' + ('' if sides.precision == 'float32'
                                             else f', {sides.precision}'))
            found += rows_of(result, what, sides)
    return found


def parse(argv=None):
    cores = len(os.sched_getaffinity(0))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='1 slide of 1536 x 1536 and 2 of 1024 x 1024, batch 16, no real slide')
    parser.add_argument('--slides', type=int, help='synthetic slides (hard links to one)')
    parser.add_argument('--size', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'))
    parser.add_argument('--batch', type=int, help='both sides\' batch (default 64; quick 16)')
    parser.add_argument('--biopsies', type=int,
                        help='biopsy-sized synthetic slides (default 16; quick 2, sharing a batch)')
    parser.add_argument('--biopsy-size', type=int, nargs=2, metavar=('WIDTH', 'HEIGHT'),
                        help='default 2048 x 1536; quick 1024 x 1024')
    parser.add_argument('--workers', type=int, nargs='+',
                        help='DataLoader worker counts to try (default 0, 1 and --threads; '
                        'quick: --threads)')
    parser.add_argument('--threads', type=int, default=cores)
    parser.add_argument('--rounds', type=int, default=1)
    parser.add_argument('--device', choices=('cpu', 'cuda'), default='cpu')
    parser.add_argument('--precision', choices=tuple(MAX_DIFFERENCE), default='float32')
    parser.add_argument('--real-slide', default=str(REAL_SLIDE),
                        help='a real slide for extra rows (full size only; \'\' to skip)')
    args = parser.parse_args(argv)
    defaults = SIZES[args.quick] | {'workers': [args.threads] if args.quick
                                    else sorted({0, 1, args.threads})}
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick:
        args.real_slide = ''
    return args


def rows_from(args) -> list[dict]:
    sides = Sides(args.batch, args.threads, tuple(args.workers), args.rounds, args.device,
                  args.precision)
    return run_all(args.slides, tuple(args.size), args.biopsies, tuple(args.biopsy_size),
                   args.real_slide, sides)


def run(quick: bool) -> list[dict]:
    """Rows: extract (first run and rerun) and tile+extract patches/s, pathjax vs TRIDENT-style.
    quick: 1 synthetic slide of 1536 x 1536 (about 20 patches) and 2 of 1024 x 1024 (a few
    patches each, in one batch), batch 16, DataLoader workers on every usable core; else 4 of
    8192 x 6144 and 16 of 2048 x 1536, batch 64, and the real slide where present, worker
    counts 0, 1 and every usable core. One round."""
    return rows_from(parse(['--quick'] if quick else []))


def main() -> None:
    args = parse()
    print(cpu_line())
    print_table(rows_from(args))


if __name__ == '__main__':
    main()
