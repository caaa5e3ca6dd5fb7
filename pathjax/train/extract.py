"""The `extract` stage: every kept patch of every slide through the feature network.

Patches are streamed from the slides by coordinates (nothing is stored as images): the patch
reader's threads decode the next batches while the device computes the current one (JAX dispatch
is asynchronous), with at most a few batches on the device at once. Batches run on from one
slide into the next (`PatchReader.stream`), so only the cohort's last batch is padded, however
small the slides (a biopsy's few dozen patches would otherwise fill part of a batch each), and
neither the reader nor the device waits at a slide's end. A histogram-normalized slide's lookup
table is applied on the device, image by image, fused into the network's input (`device_lut`),
so the reader threads only decode and copy. Batches have one size, and one program is compiled
for it; on CPU the cohort's last, short batch may run at a size of its own (`short_batches`).
Each slide's features are written atomically to `features/<slide_id>.npz` with the identity of the
network that made them (`network_identity`); on rerun, slides made by the current network are
skipped and the others (made before the feature network was retrained or trained on) redone.
With `features.export='h5'` each slide's features also go to `features_h5/<slide_id>.h5` in
TRIDENT's layout (`export_features`), for the tools that read it.
With several hosts, each extracts its own share of the slides on its own devices.
"""

import collections
import hashlib
import json
import pathlib
import time
import zipfile
from typing import Iterable, Iterator, NamedTuple

import jax
import numpy as np
from absl import logging

from pathjax import artifacts
from pathjax.cohort import Cohort, SlideRecord
from pathjax.data.device_lut import lut_pixels
from pathjax.data.features import features_network, features_path
from pathjax.errors import StageError
from pathjax.progress import Progress
from pathjax.interop import h5_features
from pathjax.models.patch.feature_net import FeatureNet, create_feature_net
from pathjax.slide_paths import slide_file
from pathjax.slides.patch_stream import PatchReader, SlidePatches, StreamBatch
from pathjax.slides.tile_stage import tiles_path
from pathjax.stage_report import ERROR, NO_TISSUE, OK, SlideEntry
from pathjax.runtime import sharding
from pathjax.train.micro_batches import image_bytes, mapped, micro_batch_count
from pathjax.train.short_batches import own_size_step, padding_seconds, run_size
from pathjax.runtime.checkpoint import Checkpoints
from pathjax.train.xla_options import patch_network_options
from pathjax.train.feature_learning import (abstract_state, create_optimizer, initial_params,
                                             run_dir)

IN_FLIGHT = 2  # batches dispatched to the device and not yet read back


def extractor_params(config, workdir, model: FeatureNet) -> tuple[dict, str]:
    """(parameters, identity) of the network extraction uses: the trained one (the
    `extract.checkpoint` checkpoint: latest, or best validation patch accuracy), or with
    feature_net.learn False the initial (ImageNet or random) one: the method's baseline."""
    if not config.feature_net.learn:
        params = initial_params(model, config, config.tile.patch_size)
        return params, network_identity(config, params, {'checkpoint': 'initial'})
    abstract = abstract_state(model, create_optimizer(config.learn, 1), config.tile.patch_size)
    with Checkpoints(run_dir(workdir), best_metric='val_accuracy') as checkpoints:
        if checkpoints.latest_step() is None:
            raise StageError(f'extract: no trained feature network in {run_dir(workdir)}; run '
                             'learn_features first (or set feature_net.learn=False)')
        params, metadata = checkpoints.restore_params(abstract.params, config.extract.checkpoint)
    logging.info('extract: the %s checkpoint of the feature network (epoch %d)',
                 metadata['checkpoint'], metadata['epoch'])
    return params, network_identity(
        config, params, {'checkpoint': metadata['checkpoint'], 'epoch': metadata['epoch']})


def network_identity(config, params, source: dict) -> str:
    """JSON naming the network that makes features: the encoder (with a ViT preset, the mean
    and std its input is normalized with), where its parameters came from (`source`), and a
    BLAKE2 hash of the parameters. Stored in every features file; a slide whose file holds
    another identity is extracted again."""
    digest = hashlib.blake2b(digest_size=16)
    for leaf in jax.tree.leaves(jax.device_get(params)):  # a fixed order: sorted module names
        digest.update(np.ascontiguousarray(leaf).tobytes())
    net = config.feature_net
    encoder = (f'vgg16 (width {net.width:g}, embed_dim {net.embed_dim})'
               if net.backbone == 'vgg16' else net.backbone)
    if net.weights:
        encoder += f', weights {pathlib.Path(net.weights).name}'
    described = {'encoder': encoder}
    if net.backbone != 'vgg16':  # VGG-16's normalization is fixed (ImageNet's)
        from pathjax.models.patch import feature_net  # pylint: disable=import-outside-toplevel
        mean, std = feature_net.normalization(config)
        described['normalization'] = {'mean': list(mean), 'std': list(std)}
    return json.dumps({**described, **source, 'parameters_blake2b': digest.hexdigest()},
                      sort_keys=True)


class SlideFeatures(NamedTuple):
    """One slide's result: features float32 [N, D], or the `error` that stopped its reading."""

    slide: SlidePatches
    features: np.ndarray | None
    error: str | None


class _Collected:
    """Rows of features read back batch by batch, gathered per slide until each is whole."""

    def __init__(self):
        self.parts = {}  # slide id -> float32 [n, D] pieces so far, in order
        self.finished = set()  # slide ids already given out

    def add(self, batch: StreamBatch, features: jax.Array) -> Iterator[SlideFeatures]:
        """Takes a batch's device result [B, D]; yields the slides it finishes or fails."""
        rows = np.asarray(features)[:len(batch.images)].astype(np.float32)
        for piece in batch.pieces:
            slide_id = piece.slide.slide_id
            if slide_id in self.finished:  # failed in an earlier batch
                continue
            if slide_id in batch.failed:
                self.finished.add(slide_id)
                self.parts.pop(slide_id, None)
                yield SlideFeatures(piece.slide, None, batch.failed[slide_id])
                continue
            self.parts.setdefault(slide_id, []).append(
                rows[piece.row:piece.row + piece.stop - piece.start])
            if piece.stop == len(piece.slide.coords):
                self.finished.add(slide_id)
                yield SlideFeatures(piece.slide, np.concatenate(self.parts.pop(slide_id)), None)


class Extractor:
    """A compiled feature function over this host's devices, fed by a patch reader."""

    def __init__(self, config, params, model: FeatureNet):
        self.mesh = sharding.make_local_mesh()
        self.batch_size = config.extract.batch_size
        self.patch_size = config.tile.patch_size
        # The batch must split over the devices:
        sharding.local_batch_size(self.batch_size, self.mesh, 'extract.batch_size')
        self.params = sharding.replicate(params, self.mesh)
        self.micro_batches = micro_batch_count(
            self.batch_size, self.mesh.devices.size, config.micro_batch, 'extract.batch_size',
            image_bytes(config, training=False))

        def network(params, images_and_luts):  # a micro-batch: uint8 [b, P, P, 3] -> [b, D]
            images, luts = images_and_luts
            return model.apply({'params': params}, lut_pixels(images, luts),
                               method=FeatureNet.features)

        # features(params, (images uint8 [B, P, P, 3], luts uint8 [B, 3, 256])) -> float [B, D]
        self.own_size_step = own_size_step(self.batch_size,
                                           self.mesh.devices.size * self.micro_batches,
                                           self.mesh.devices.flat[0].platform)
        self.compiled = {}  # batch size -> seconds its first call took (trace and compile)
        self.features = jax.jit(mapped(network, self.micro_batches),
                                in_shardings=(sharding.replicated(self.mesh),
                                              sharding.batch_sharded(self.mesh)),
                                out_shardings=sharding.batch_sharded(self.mesh),
                                compiler_options=patch_network_options())

    def dispatch(self, images: np.ndarray, luts: np.ndarray) -> jax.Array:
        """Starts the features of a batch, uint8 [n <= batch_size, P, P, 3] whose stain lookup
        tables are `luts` [n, 3, 256], padded to the size it runs at, m (`short_batches`):
        float [m, D] on the devices (asynchronous)."""
        size = run_size(len(images), self.batch_size, self.own_size_step, set(self.compiled),
                        self.padding_costs_more)
        if len(images) < size:
            images, luts = (np.concatenate([a, np.zeros((size - len(a),) + a.shape[1:],
                                                        np.uint8)]) for a in (images, luts))
        start = time.perf_counter()
        result = self.features(self.params, jax.device_put((images, luts),
                                                           sharding.batch_sharded(self.mesh)))
        self.compiled.setdefault(size, time.perf_counter() - start)
        return result

    def padding_costs_more(self, own: int) -> bool:
        """Whether the batch_size - `own` rows of padding a short batch saves at its own size
        would take longer than compiling that size: than the first size's first call took
        (trace and compile). Rows are costed from the full-size program's FLOPs (XLA's cost
        analysis of its cached lowering)."""
        inputs = [jax.ShapeDtypeStruct((self.batch_size,) + shape, np.uint8,
                                       sharding=sharding.batch_sharded(self.mesh))
                  for shape in ((self.patch_size, self.patch_size, 3), (3, 256))]
        cost = self.features.lower(self.params, tuple(inputs)).cost_analysis() or {}
        padding = padding_seconds(self.batch_size - own, cost.get('flops', 0), self.batch_size,
                                  self.mesh.devices.size)
        return padding > max(self.compiled.values())

    def cohort_features(self, reader: PatchReader, slides: Iterable[SlidePatches], progress
                        ) -> Iterator[SlideFeatures]:
        """Each slide's features (float32 [N, D], coordinate order) or why its reading failed,
        as soon as its last batch is read back, in the order the slides finish.

        Once more than IN_FLIGHT batches are on the device, the oldest result is read back before
        the next batch is read: device memory stays at a few batches however fast the reader,
        and the device always has the next batch queued while the host waits.
        """
        pending, collected = collections.deque(), _Collected()  # (batch, device result)
        for batch in reader.stream(slides):
            pending.append((batch, self.dispatch(batch.images, batch.luts)))
            if len(pending) > IN_FLIGHT:
                yield from collected.add(*pending.popleft())
            progress.update(len(batch.images))
        for batch, features in pending:
            yield from collected.add(batch, features)


def extract_slides(extractor: Extractor, reader: PatchReader, records: list[SlideRecord],
                   workdir, progress, network: str) -> dict[str, SlideEntry]:
    """Extracts the records' slides in one stream and writes each one's features as soon as
    they are whole, recording the `network` identity that made them: {slide id: its entry}.
    Never raises for a bad slide."""
    entries, grids = {}, {}  # grids: slide id -> its patch grid, until its features are written
    slides = streamed_slides(workdir, records, extractor.patch_size, entries, grids)
    for result in extractor.cohort_features(reader, slides, progress):
        entries[result.slide.slide_id] = write_features(
            workdir, result, grids.pop(result.slide.slide_id), network)
    return entries


def streamed_slides(workdir, records: Iterable[SlideRecord], patch_size: int,
                    entries: dict[str, SlideEntry], grids: dict[str, np.ndarray]
                    ) -> Iterator[SlidePatches]:
    """The records' patches, tiles file by tiles file as the stream takes them (each slide's
    patch grid goes to `grids`); a slide with none to read gets its entry in `entries` instead:
    not tiled, an unreadable tiles file, tiled at another patch size, or no tissue."""
    for record in records:
        tiles_file = tiles_path(workdir, record.slide_id)
        if not tiles_file.exists():
            entries[record.slide_id] = SlideEntry(record.slide_id, ERROR,
                                                  message='not tiled (see the tile report)')
            continue
        try:
            tiles = artifacts.load_npz(tiles_file)
            patches = SlidePatches.from_tiles(record.slide_id, record.path, tiles)
            grid = tiles['grid']
        except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
            entries[record.slide_id] = SlideEntry(
                record.slide_id, ERROR, message=f'cannot read its tiles file {tiles_file} '
                f'({error}): run the tile stage again')
            continue
        if patches.patch_size != patch_size:
            entries[record.slide_id] = SlideEntry(
                record.slide_id, ERROR, message=f'its tiles file {tiles_file} has '
                f'{patches.patch_size}-px patches, tile.patch_size is {patch_size}: run the tile '
                'stage again')
        elif not len(patches.coords):
            entries[record.slide_id] = SlideEntry(record.slide_id, NO_TISSUE,
                                                  message='no tissue patches')
        else:
            grids[record.slide_id] = grid
            yield patches


def write_features(workdir, result: SlideFeatures, grid: np.ndarray, network: str) -> SlideEntry:
    """Writes a slide's features with its coordinates, patch grid and the `network` identity
    that made them; the entry of a slide whose reading failed."""
    slide_id = result.slide.slide_id
    if result.error is not None:
        return SlideEntry(slide_id, ERROR, message=result.error)
    artifacts.save_npz(features_path(workdir, slide_id), features=result.features,
                       coords=result.slide.coords, grid=grid, network=np.asarray(network))
    return SlideEntry(slide_id, OK, patches=len(result.features),
                      details={'feature_dim': int(result.features.shape[1])})


def run(config, workdir, cohort: Cohort, network_workdir=None) -> list[SlideEntry]:
    """The `extract` stage over this host's share of the cohort's slides, with the feature
    network trained in `network_workdir` (default: `workdir`)."""
    mine = [r for i, r in enumerate(cohort.slides) if i % jax.process_count() == jax.process_index()]
    model = create_feature_net(config)
    # On every process, also one with nothing left to do: Orbax's checkpoint manager waits for
    # all of them when it opens, and the identity tells which finished slides are current.
    params, network = extractor_params(config, network_workdir or workdir, model)
    entries = {r.slide_id: _finished(workdir, r.slide_id, network) for r in mine}
    todo = [r for r in mine if entries[r.slide_id] is None]
    logging.info('extract: %d slides, %d already done', len(mine), len(mine) - len(todo))
    if todo:
        extractor = Extractor(config, params, model)
        total = sum(_patch_count(workdir, r) for r in todo)
        progress = Progress('extract', total, 'patches')
        with PatchReader(batch_size=extractor.batch_size, workers=config.workers,
                         defer_lut=True) as reader:
            entries.update(extract_slides(extractor, reader, todo, workdir, progress, network))
        progress.close()
    if config.features.export == 'h5':
        for record in mine:
            if entries[record.slide_id].status == OK:
                export_features(workdir, record.slide_id)
    sharding.barrier('pathjax extract')  # the other hosts' slides are done too
    for record in cohort.slides:
        if record.slide_id not in entries:  # another host's slide: its log has any error
            entries[record.slide_id] = _finished(workdir, record.slide_id, network) or SlideEntry(
                record.slide_id, ERROR, message='not extracted; see the log of its host')
    skipped = [SlideEntry(r.slide_id, ERROR, message=why) for r, why in cohort.skipped]
    return [entries[r.slide_id] for r in cohort.slides] + skipped


def exported_path(workdir, slide_id: str) -> pathlib.Path:
    return slide_file(workdir, 'features_h5', slide_id, '.h5')


def export_features(workdir, slide_id: str) -> None:
    """Writes `features_h5/<slide_id>.h5` (TRIDENT's layout: the features, level-0 coords, the
    encoder's name, patch sizes, magnifications and level-0 mpp) from the slide's features and
    tiles files, unless the one there is newer than the features file."""
    target, source = exported_path(workdir, slide_id), features_path(workdir, slide_id)
    if target.exists() and target.stat().st_mtime_ns >= source.stat().st_mtime_ns:
        return
    features = artifacts.load_npz(source, ('features', 'coords', 'network'))
    tiles = artifacts.load_npz(tiles_path(workdir, slide_id),
                               ('slide_size', 'extent', 'patch_size', 'mpp'))
    patch_mpp, extent = float(tiles['mpp']), float(tiles['extent'])
    level0_mpp = 0.0 if np.isnan(patch_mpp) else patch_mpp * int(tiles['patch_size']) / extent
    width, height = (int(v) for v in tiles['slide_size'])
    h5_features.write_trident(
        target, features['features'], features['coords'],
        encoder=json.loads(str(features['network']))['encoder'],
        patch_size=int(tiles['patch_size']), patch_size_level0=int(round(extent)),
        level0_magnification=10.0 / level0_mpp if level0_mpp else 0.0,
        target_magnification=0.0 if np.isnan(patch_mpp) else 10.0 / patch_mpp,
        level0_width=width, level0_height=height, mpp=level0_mpp)


def _finished(workdir, slide_id: str, network: str) -> SlideEntry | None:
    """The entry of a slide whose features file exists, reads, and was made by `network`, else
    None (the slide is extracted again)."""
    path = features_path(workdir, slide_id)
    if not path.exists():
        return None
    try:
        made_by = features_network(path)
        count = len(artifacts.load_npz(path, ('coords',))['coords'])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as error:
        logging.warning('extract: cannot read %s (%s): extracting again', path, error)
        return None
    if made_by != network:
        logging.info('extract: the features of %s came from another feature network (%s; now '
                     '%s): extracting again', slide_id, made_by or 'not recorded', network)
        return None
    return SlideEntry(slide_id, OK, patches=count)


def _patch_count(workdir, record: SlideRecord) -> int:
    tiles_file = tiles_path(workdir, record.slide_id)
    return len(artifacts.load_npz(tiles_file, ('coords',))['coords']) if tiles_file.exists() else 0
