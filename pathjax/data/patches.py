"""The feature stage's training data: sampled patches as a TFDS dataset, and its input pipeline.

The `patches` stage samples up to `learn.patches_per_slide` kept patches of every training and
validation slide (seeded), reads them stain-normalized with the patch reader, and writes them with
their slide's label to `<workdir>/patches/` as a TFDS dataset in array_record format (JPEG-encoded
images; no TensorFlow needed). Each slide's encoded patches are first staged in a file of their
own as soon as it is read, so a killed stage resumes at the first slide not staged; the dataset
is then built from the staged files (the same dataset as an uninterrupted build) and they are
removed. `train_batches` / `eval_batches` read it back with grain over
`as_data_source` (`encoded_source`): seeded shuffling per epoch, batching with each image decoded
straight into its batch, background threads, and each process's share of every global batch.
"""

import dataclasses
import io
import json
import pathlib
import shutil
from typing import Iterator, Sequence

import grain
import imagecodecs
import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from PIL import Image

from pathjax import artifacts
from pathjax.cohort import Cohort, SlideRecord
from pathjax.console import quiet_stdout
from pathjax.errors import StageError
from pathjax.progress import Progress
from pathjax.sampling import seeded_subset
from pathjax.slide_paths import slide_file
from pathjax.slides.patch_stream import PatchReader, SlidePatches
from pathjax.slides.reader import SlideError
from pathjax.slides.tile_stage import tiles_path
from pathjax.stage_report import ERROR, NO_TISSUE, OK, SlideEntry

SPLITS = ('train', 'val')
JPEG_QUALITY = 95


@dataclasses.dataclass(frozen=True)
class Sampling:
    """What the dataset's content depends on; a built dataset records it in its metadata."""

    patches_per_slide: int
    patch_size: int
    seed: int
    classes: tuple[str, ...]

    @classmethod
    def from_config(cls, config) -> 'Sampling':
        return cls(config.learn.patches_per_slide, config.tile.patch_size, config.seed,
                   tuple(config.data.classes))

    def as_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)


class SlidePatchesBuilder(tfds.core.GeneratorBasedBuilder):
    """TFDS builder of the sampled patches of a cohort's train and val slides."""

    name = 'slide_patches'
    VERSION = tfds.core.Version('1.0.0')

    def __init__(self, *, data_dir: str, sampling: Sampling,
                 slides: dict[str, list[SlideRecord]] | None = None, workdir: str = ''):
        self.sampling = sampling
        self._slides, self._workdir = slides or {}, workdir  # the staged slides of each split
        super().__init__(data_dir=data_dir, file_format='array_record')

    def _info(self) -> tfds.core.DatasetInfo:
        size = self.sampling.patch_size
        return tfds.core.DatasetInfo(
            builder=self,
            description='Stain-normalized tissue patches sampled from whole-slide images.',
            features=tfds.features.FeaturesDict({
                'image': tfds.features.Image(shape=(size, size, 3), encoding_format='jpeg'),
                'label': tfds.features.ClassLabel(names=list(self.sampling.classes)),
                'slide_id': tfds.features.Text(),
                'coords': tfds.features.Tensor(shape=(2,), dtype=np.int64),
            }),
            metadata=tfds.core.MetadataDict(sampling=self.sampling.as_json()))

    def _split_generators(self, dl_manager):
        return {split: self._generate_examples(self._slides.get(split, []))
                for split in SPLITS if self._slides.get(split)}

    def _generate_examples(self, slides: list[SlideRecord]):
        label_of = {name: i for i, name in enumerate(self.sampling.classes)}
        for record in slides:
            staged = artifacts.load_npz(staged_path(self._workdir, record.slide_id))
            ends = np.cumsum(staged['sizes'])
            for coords, start, end in zip(staged['coords'], ends - staged['sizes'], ends):
                yield f'{record.slide_id}/{coords[0]}_{coords[1]}', {
                    'image': staged['jpeg'][start:end].tobytes(),
                    'label': label_of[record.label], 'slide_id': record.slide_id,
                    'coords': coords}


def staged_path(workdir, slide_id: str) -> pathlib.Path:
    """One slide's sampled patches, JPEG-encoded, until the dataset is built from them."""
    return slide_file(dataset_dir(workdir), 'staged', slide_id, '.npz')


def stage_slide(reader: PatchReader, record: SlideRecord, workdir, sampling: Sampling
                ) -> SlideEntry:
    """Reads one slide's sampled patches, encodes them and writes them (atomically) to its
    staged file: uint8 `jpeg` (the images' bytes, concatenated), `sizes` [n], `coords` [n, 2] and
    the `sampling` they were made with. An ERROR entry (and no file) if reading fails."""
    patches = SlidePatches.from_tiles(
        record.slide_id, record.path, artifacts.load_npz(tiles_path(workdir, record.slide_id)))
    chosen = seeded_subset(record.slide_id, len(patches.coords), sampling.patches_per_slide,
                           sampling.seed)
    patches = dataclasses.replace(patches, coords=patches.coords[chosen])
    images = [b''] * len(patches.coords)
    try:
        for batch in reader.batches(patches):
            for index, image in zip(batch.indices, batch.images):
                encoded = io.BytesIO()
                Image.fromarray(image).save(encoded, format='JPEG', quality=JPEG_QUALITY)
                images[index] = encoded.getvalue()
    except SlideError as error:
        return SlideEntry(record.slide_id, ERROR, message=str(error))
    artifacts.save_npz(staged_path(workdir, record.slide_id),
                       jpeg=np.frombuffer(b''.join(images), np.uint8),
                       sizes=np.asarray([len(i) for i in images], np.int64),
                       coords=patches.coords.astype(np.int64),
                       sampling=np.asarray(sampling.as_json()))
    return staged_entry(record, len(images))


def staged_entry(record: SlideRecord, count: int) -> SlideEntry:
    return SlideEntry(record.slide_id, OK, patches=count, details={'split': record.split})


def already_staged(workdir, record: SlideRecord, sampling: Sampling) -> SlideEntry | None:
    """The entry of a slide staged by an earlier (killed) run with the same sampling, else None."""
    path = staged_path(workdir, record.slide_id)
    if not path.exists():
        return None
    staged = artifacts.load_npz(path, ('sizes', 'sampling'))
    if str(staged['sampling']) != sampling.as_json():
        return None
    return staged_entry(record, len(staged['sizes']))


def dataset_dir(workdir) -> pathlib.Path:
    return pathlib.Path(workdir) / 'patches'


def load_builder(workdir, sampling: Sampling) -> SlidePatchesBuilder:
    """The built dataset of a run; a StageError if it is missing or built with other settings."""
    builder = SlidePatchesBuilder(data_dir=str(dataset_dir(workdir)), sampling=sampling)
    if not builder.is_prepared():
        raise StageError(f'no patch dataset in {dataset_dir(workdir)}: run the patches stage first')
    built = builder.info.metadata.get('sampling')
    if built != sampling.as_json():
        raise StageError(f'the patch dataset in {dataset_dir(workdir)} was built with other '
                         f'settings ({built}, now {sampling.as_json()}); delete it to rebuild')
    return builder


def run(config, workdir, cohort: Cohort) -> list[SlideEntry] | None:
    """The `patches` stage: builds the dataset unless it exists with the same settings (nothing
    when feature_net.learn is False: a frozen encoder learns nothing from patches)."""
    if not config.feature_net.learn:
        logging.info('patches: feature_net.learn is False; no patch dataset is needed')
        return None
    sampling = Sampling.from_config(config)
    data_dir = str(dataset_dir(workdir))
    report_file = dataset_dir(workdir) / 'slides.json'
    if SlidePatchesBuilder(data_dir=data_dir, sampling=sampling).is_prepared():
        load_builder(workdir, sampling)  # raises if the settings changed
        shutil.rmtree(dataset_dir(workdir) / 'staged', ignore_errors=True)  # killed just before
        logging.info('patches: dataset already built in %s', data_dir)
        return [SlideEntry(**entry) for entry in json.loads(report_file.read_text())]
    entries, slides = [], {split: [] for split in SPLITS}
    for record in cohort.slides:
        tiles_file = tiles_path(workdir, record.slide_id)
        if record.split not in SPLITS:
            continue
        if not tiles_file.exists():
            entries.append(SlideEntry(record.slide_id, ERROR, message='not tiled (see the tile report)'))
        elif not len(artifacts.load_npz(tiles_file, ('coords',))['coords']):
            entries.append(SlideEntry(record.slide_id, NO_TISSUE, message='no tissue patches'))
        else:
            slides[record.split].append(record)
    if not slides['train']:
        raise StageError('patches: no training slide has tissue patches; see the tile report')
    progress = Progress('patches', sum(map(len, slides.values())), 'slides')
    with PatchReader(batch_size=32, workers=config.workers) as reader:
        for split in SPLITS:  # each slide read once and staged; a rerun skips staged slides
            for record in list(slides[split]):
                entry = already_staged(workdir, record, sampling) or stage_slide(
                    reader, record, workdir, sampling)
                entries.append(entry)
                progress.update()
                if entry.status != OK:
                    slides[split].remove(record)
    progress.close()
    if not slides['train']:
        raise StageError('patches: no training slide could be read: '
                         + '; '.join(e.message for e in entries if e.status == ERROR))
    builder = SlidePatchesBuilder(data_dir=data_dir, sampling=sampling, slides=slides,
                                  workdir=str(workdir))
    try:
        with quiet_stdout():  # TFDS prints "Downloading and preparing dataset" (nothing is)
            builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 (TFDS's own errors: a full disk, say)
        raise StageError(f'patches: building the dataset failed: {error}') from None
    artifacts.save_json(report_file, [dataclasses.asdict(e) for e in entries])
    shutil.rmtree(dataset_dir(workdir) / 'staged')
    for split, info in builder.info.splits.items():
        logging.info('patches: %s split has %d patches', split, info.num_examples)
    return entries


def encoded_source(builder: SlidePatchesBuilder, split: str):
    """The split's examples (random access), each image left JPEG-encoded (bytes): the batches
    decode them straight into place (`decode_batch`)."""
    return builder.as_data_source(split, decoders={'image': tfds.decode.SkipDecoding()})


def decode_batch(examples: Sequence[dict]) -> dict[str, np.ndarray]:
    """Examples with JPEG-encoded images -> {'image': uint8 [b, P, P, 3], 'label': int32 [b],
    and 'mask' bool [b] where the examples have one}. Each image is decoded by libjpeg-turbo
    straight into its row of the batch: no decoded copy per image, no BGR -> RGB reordering
    (TFDS decodes with OpenCV) and no stacking: 11-15% faster (BENCHMARKS.md)."""
    first = imagecodecs.jpeg8_decode(examples[0]['image'])
    images = np.empty((len(examples),) + first.shape, np.uint8)
    images[0] = first
    for row, example in enumerate(examples[1:], 1):
        imagecodecs.jpeg8_decode(example['image'], out=images[row])
    batch = {'image': images, 'label': np.asarray([e['label'] for e in examples], np.int32)}
    if 'mask' in examples[0]:
        batch['mask'] = np.asarray([e['mask'] for e in examples], bool)
    return batch


def read_options(workers: int) -> grain.ReadOptions:
    """`workers` threads, each decoding a whole batch; as many batches in flight (grain reads
    no more elements at once than its prefetch buffer holds)."""
    return grain.ReadOptions(num_threads=max(1, workers), prefetch_buffer_size=max(2, workers))


def epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_batches(source, batch_size: int, *, seed: int, epoch: int, process_index: int = 0,
                  process_count: int = 1, workers: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """One epoch of this process's shares of shuffled global batches of `source`
    (`encoded_source`): 'image' uint8 [b, P, P, 3], 'label' int32 [b], b = batch_size per
    process. The shuffled order depends only on (seed, epoch), and process p holds rows
    p*b..(p+1)*b-1 of every global batch, so a global batch is the same, in the same order,
    whatever the number of processes. Incomplete global batches are dropped."""
    dataset = grain.MapDataset.source(source).shuffle(seed=epoch_seed(seed, epoch))
    dataset = dataset.batch(batch_size, drop_remainder=True, batch_fn=decode_batch)
    dataset = dataset[:len(dataset) - len(dataset) % process_count][process_index::process_count]
    return iter(dataset.to_iter_dataset(read_options(workers)))


def eval_batches(source, batch_size: int, *, process_index: int = 0, process_count: int = 1,
                 workers: int = 2) -> Iterator[dict[str, np.ndarray]]:
    """All examples of `source` (`encoded_source`) in order, in this process's shares of global
    batches padded to full size, with 'mask' bool [b] false on padding."""
    dataset = grain.MapDataset.source(source)
    global_size = batch_size * process_count
    count = len(dataset)
    padded = -(-count // global_size) * global_size
    indices = np.arange(padded) % max(count, 1)
    mask = np.arange(padded) < count
    mine = grain.MapDataset.source(list(range(process_index, padded, process_count)))
    mine = mine.map(lambda i: {**source[int(indices[i])], 'mask': mask[i]})
    mine = mine.batch(batch_size, batch_fn=decode_batch)
    return iter(mine.to_iter_dataset(read_options(workers)))
