"""The feature stage's input: the patches stage's TFDS dataset read back as training batches.

The dataset: 512-px patches (quick: 256 px) cut from a synthetic H&E slide, JPEG quality 95 as
the patches stage encodes them, written by the stage's own builder (`SlidePatchesBuilder`, in
array_record) from staged files, as the stage writes them.
pathjax: one epoch of `patches.train_batches` (grain over TFDS's data source, the images left
encoded: seeded shuffle, batches of 32, each image decoded by libjpeg-turbo (imagecodecs)
straight into its row of the batch, `workers` threads each decoding whole batches), as
learn_features reads it. References, in the same process, alternating round by round:
- decode-only ceiling: the same JPEG bytes, already in memory, decoded by the same call into
  one reused buffer, one after another on one thread (no record reads, parsing, shuffling,
  batching or fresh memory);
- the former path: the same grain pipeline with TFDS's own decoding (OpenCV's imdecode into a
  fresh array, BGR -> RGB) per example and grain's stacking into the batch, on one thread;
- torch DataLoader: a Dataset over the same data source with the image left encoded
  (`SkipDecoding`), each item decoded with PIL into a uint8 tensor as torchvision's image
  datasets do, shuffled, batches of 32, as many worker processes as pathjax has threads
  (started per epoch, as a DataLoader does by default).
Both pipelines' per-epoch start-up is included. Median of `--rounds` rounds.

Rows (patches/s; > 1: pathjax faster):
- `learn_features input, 1 thread, share of decode-only`: pathjax on one thread against the
  ceiling (1.0 = all its time is decoding).
- `learn_features input, 1 thread vs TFDS's decoding`: against the former path.
- `learn_features input, N threads vs DataLoader N workers`.
The cohort-time model's learn_features decode rate (BENCHMARKS.md) comes from this script.

  python benchmarks/patch_input.py [--quick] [--patches 1024] [--workers N] [--rounds 5]
"""

import argparse
import io
import os
import pathlib
import statistics
import tempfile
import time

import grain
import imagecodecs
import numpy as np
from PIL import Image

from machine_info import cpu_line
from pathjax import artifacts
from pathjax.cohort import SlideRecord
from pathjax.console import quiet_stdout
from pathjax.data import patches as patch_data
from pathjax.slides import synthetic
from rows import print_table, row

BATCH = 32
SLIDES = 4  # the patches are staged as this many slides' files


def patch_images(count: int, size: int) -> list[np.ndarray]:
    """`count` uint8 [size, size, 3] patches cut in reading order from one synthetic slide."""
    per_row = 8
    spec = synthetic.SyntheticSlideSpec('input', 'input', 'positive', True, 0.5, 'svs',
                                        per_row * size, -(-count // per_row) * size, seed=3)
    slide = synthetic.render_slide(spec)
    return [slide[r * size:(r + 1) * size, c * size:(c + 1) * size]
            for r in range(-(-count // per_row)) for c in range(per_row)][:count]


def write_dataset(folder: pathlib.Path, images: list[np.ndarray]):
    """The training split of a dataset built by the patches stage's builder -> its data source."""
    sampling = patch_data.Sampling(len(images) // SLIDES, images[0].shape[0], 0, ('a', 'b'))
    records = []
    for index, share in enumerate(np.array_split(np.arange(len(images)), SLIDES)):
        record = SlideRecord(f'slide{index}', '', ('a', 'b')[index % 2], f'case{index}', 'train',
                             line=index + 2)
        encoded = [jpeg(images[i]) for i in share]
        path = patch_data.staged_path(folder, record.slide_id)
        path.parent.mkdir(parents=True, exist_ok=True)
        artifacts.save_npz(path, jpeg=np.frombuffer(b''.join(encoded), np.uint8),
                           sizes=np.asarray([len(e) for e in encoded], np.int64),
                           coords=np.stack([share, share], axis=1).astype(np.int64),
                           sampling=np.asarray(sampling.as_json()))
        records.append(record)
    builder = patch_data.SlidePatchesBuilder(data_dir=str(patch_data.dataset_dir(folder)),
                                             sampling=sampling, slides={'train': records},
                                             workdir=str(folder))
    with quiet_stdout():
        builder.download_and_prepare()
    return builder


def jpeg(image: np.ndarray) -> bytes:
    encoded = io.BytesIO()
    Image.fromarray(image).save(encoded, format='JPEG', quality=patch_data.JPEG_QUALITY)
    return encoded.getvalue()


# ---- the passes; each returns the number of patches it decoded ----

def pathjax_pass(source, workers: int, epoch: int) -> int:
    return sum(len(batch['label']) for batch in patch_data.train_batches(
        source, BATCH, seed=0, epoch=epoch, workers=workers))


def former_pass(decoded_source, epoch: int) -> int:
    """train_batches as it was: TFDS's decoding per example, grain's stacking, one thread."""
    dataset = grain.MapDataset.source(decoded_source).shuffle(
        seed=patch_data.epoch_seed(0, epoch))
    dataset = dataset.map(lambda e: {'image': np.asarray(e['image'], np.uint8),
                                     'label': np.asarray(e['label'], np.int32)})
    dataset = dataset.batch(BATCH, drop_remainder=True)
    return sum(len(batch['label'])
               for batch in dataset.to_iter_dataset(patch_data.read_options(1)))


def decode_only(encoded: list[bytes], size: int) -> int:
    buffer = np.empty((size, size, 3), np.uint8)
    for data in encoded:
        imagecodecs.jpeg8_decode(data, out=buffer)
    return len(encoded)


def dataloader_pass(encoded_source, workers: int, epoch: int) -> int:
    """The DataLoader reference: PIL decode per item in `workers` processes."""
    import torch
    import torch.utils.data

    class PatchDataset(torch.utils.data.Dataset):
        def __len__(self):
            return len(encoded_source)

        def __getitem__(self, index):
            example = encoded_source[index]
            image = Image.open(io.BytesIO(example['image'])).convert('RGB')
            return torch.from_numpy(np.array(image)), int(example['label'])  # as pil_to_tensor

    loader = torch.utils.data.DataLoader(
        PatchDataset(), batch_size=BATCH, shuffle=True, drop_last=True, num_workers=workers,
        generator=torch.Generator().manual_seed(epoch))
    return sum(len(labels) for _, labels in loader)


def timed(function) -> float:
    start = time.perf_counter()
    count = function()
    return count / (time.perf_counter() - start)


def measure(patches: int, size: int, workers: int, rounds: int) -> dict:
    """Median patches/s of each pass over a fresh dataset of `patches` patches."""
    with tempfile.TemporaryDirectory(prefix='patch_input_') as folder:
        builder = write_dataset(pathlib.Path(folder), patch_images(patches, size))
        source = patch_data.encoded_source(builder, 'train')
        decoded_source = builder.as_data_source('train')
        encoded = [source[i]['image'] for i in range(len(source))]
        passes = {'pathjax, 1 thread': lambda e: pathjax_pass(source, 1, e),
                  f'pathjax, {workers} threads': lambda e: pathjax_pass(source, workers, e),
                  'decode-only': lambda e: decode_only(encoded, size),
                  'former, 1 thread': lambda e: former_pass(decoded_source, e),
                  f'DataLoader, {workers} workers': lambda e: dataloader_pass(
                      source, workers, e)}
        rates = {name: [] for name in passes}
        for epoch in range(rounds):
            for name, one_pass in passes.items():
                rates[name].append(timed(lambda: one_pass(epoch)))
        mean_bytes = statistics.mean(len(e) for e in encoded)
    return {name: statistics.median(r) for name, r in rates.items()} | {
        'patches': len(encoded), 'size': size, 'workers': workers, 'jpeg_bytes': mean_bytes}


def rows_of(result: dict) -> list[dict]:
    workers = result['workers']
    what = (f'{result["patches"]} patches of {result["size"]} px, JPEG quality '
            f'{patch_data.JPEG_QUALITY} ({result["jpeg_bytes"] / 1024:.0f} KiB each), '
            f'batch {BATCH}')
    bound = 'JPEG decode (libjpeg-turbo) on the cores used'
    return [
        row(f'learn_features input, 1 thread, share of decode-only: {what}', 'patches/s',
            result['pathjax, 1 thread'], result['decode-only'], 'the same bytes decoded by the '
            'same call into one buffer in a loop, in memory, 1 thread', True, bound, threads=1),
        row(f'learn_features input, 1 thread vs TFDS\'s decoding: {what}', 'patches/s',
            result['pathjax, 1 thread'], result['former, 1 thread'], 'the former path: TFDS\'s '
            'decoding (OpenCV, BGR -> RGB) per example, grain\'s stacking, 1 thread', True,
            bound, threads=1),
        row(f'learn_features input, {workers} threads vs DataLoader {workers} workers: {what}',
            'patches/s', result[f'pathjax, {workers} threads'],
            result[f'DataLoader, {workers} workers'], f'torch DataLoader, {workers} worker '
            'processes, PIL decode per item, shuffled, started per epoch', True, bound,
            threads=workers),
    ]


def run(quick: bool) -> list[dict]:
    """Rows (see the module docstring); quick: 128 patches of 256 px, 2 rounds."""
    return rows_of(measure(128 if quick else 1024, 256 if quick else 512,
                           min(2, os.cpu_count() or 1), 2 if quick else 5))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true')
    parser.add_argument('--patches', type=int, default=1024)
    parser.add_argument('--workers', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--rounds', type=int, default=5)
    args = parser.parse_args()
    print(cpu_line())
    if args.quick:
        print_table(run(True))
    else:
        print_table(rows_of(measure(args.patches, 512, args.workers, args.rounds)))


if __name__ == '__main__':
    main()
