"""The method's own settings at real size, stage by stage: wall time, throughput, peak memory.

Four real-size synthetic slides (`synthetic_mosaic.MosaicSlide`, Aperio SVS written by
`write_streamed_slide`: level 0 WIDTH x HEIGHT px at 0.5 um/px, about 60% tissue, so about 20,000
patches kept at the default 512 px / 0.5 um/px) go through every stage of configs/default.py,
each stage its own `launch.py` subprocess whose process tree's peak RSS `memory.run_measured`
samples. Four slides, not three: one training slide per class, one validation slide (so the
validation passes of learn_features and train_slide run as users run them) and one test slide.
Defaults everywhere except counts: `learn.epochs=1`, `train.max_steps=--steps`, and, where given,
`learn.patches_per_slide` (a shorter epoch) and the batch sizes (`--learn-batch`,
`--extract-batch`; their memory at the default batch sizes is still reported, from XLA's
compile-time analysis).

Extraction is time-boxed: a copy of the workdir whose tiles files keep only each slide's first
--prefix patches is extracted for real (patches/s, peak RSS). The full workdir then gets
SURROGATE features for all patches of every slide (prefix features resampled per patch plus 5%
noise, float32 [N, 512], coords and grid from the tiles file), used only so that train_slide and
evaluate run at real shapes (8,192-node graphs after the graph.max_patches cap, D = 512).

Each stage has a peak-memory bound (`bounds`; stated with its reason in the output); a stage above
its bound, or one that fails, is reported as a failure and the run goes on. Results:
benchmarks/results/full_size-<machine>-<date>.json and .md (a rerun of some stages updates their
rows), printed at the end; exit status 1 if any stage failed.

  python benchmarks/full_size.py [--slides-dir D] [--workdir W] [--stages tile,extract,...]
                                 [--prefix 300] [--steps 4] [--learn-batch B] [--extract-batch B]
                                 [--patches-per-slide N]
"""

import argparse
import csv
import datetime
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import numpy as np

import machine_info
from memory import run_measured
from pathjax import artifacts
from pathjax.slides import slide_writer, synthetic, synthetic_mosaic

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = pathlib.Path('/tmp/pathjax_full')  # default home of the slides and workdirs
GIB = 2**30
STAGES = ('generate', 'tile', 'patches', 'learn_features', 'extract', 'train_slide', 'evaluate')
WIDTH, HEIGHT, MPP = 100_352, 86_016, 0.5  # level 0: 196 x 168 grid patches of 512 px
TISSUE_FRACTION, JPEG_QUALITY = 0.6, 80
# (slide_id, label, split): the default config's classes, one case per slide.
SLIDES = (('full_0', 'wild_type', 'train'), ('full_1', 'mutant', 'train'),
          ('full_2', 'mutant', 'val'), ('full_3', 'wild_type', 'test'))
RUNTIME = 1 * GIB  # a launch.py process: Python, JAX, TFDS, compiled programs, thread pools
NOISE = 0.05  # surrogate features: noise std relative to each feature's std over the prefix
ABSL_LINE = re.compile(r'^[IWEF](\d{4}) (\d\d:\d\d:\d\d\.\d+) ')


def spec(index: int) -> synthetic.SyntheticSlideSpec:
    slide_id, label, _ = SLIDES[index]
    return synthetic.SyntheticSlideSpec(slide_id, f'case_{slide_id}', label, label == 'mutant',
                                        MPP, 'svs', WIDTH, HEIGHT, seed=1000 + index)


def write_one_slide(slides_dir: pathlib.Path, index: int) -> None:
    """Renders the blocks of slide `index` and streams it to disk; prints its timings as JSON."""
    start = time.perf_counter()
    mosaic = synthetic_mosaic.MosaicSlide(spec(index), tissue_fraction=TISSUE_FRACTION)
    rendered = time.perf_counter()
    path = slides_dir / f'{SLIDES[index][0]}.svs'
    slide_writer.write_streamed_slide(path, mosaic.rows, (WIDTH, HEIGHT), MPP, 'svs',
                                      jpeg_quality=JPEG_QUALITY)
    print(json.dumps({'render_blocks_s': rendered - start,
                      'stream_s': time.perf_counter() - rendered,
                      'tissue_fraction': mosaic.tissue_fraction}))


def xla_memory(learn_batch: int, extract_batch: int) -> None:
    """Prints XLA's compile-time memory analysis (bytes, summed over this process's devices:
    the CPU devices a stage gets from config.cpu_devices, each with its share of the batch) as
    JSON of: the feature network's train step and extraction at these batch sizes at 512 px,
    and the slide model's train step on a batch of train.batch_slides graphs of
    graph.max_patches nodes (D = 512, 2k edges a node). Compiles only; runs nothing."""
    sys.path.insert(0, str(REPO))
    from configs import default
    from pathjax import cpu_devices
    from pathjax.models.patch.feature_net import resolve_tile_defaults
    config = default.get_config()
    resolve_tile_defaults(config)
    config.learn.batch_size, config.extract.batch_size = learn_batch, extract_batch
    cpu_devices.expose(config)  # as the stage's process does, before JAX starts
    import jax
    import jax.numpy as jnp
    import jraph
    from pathjax.data import graphs
    from pathjax.models.patch.feature_net import FeatureNet, create_feature_net
    from pathjax.train import feature_learning, slide_training
    from pathjax.runtime import sharding
    from pathjax.train.micro_batches import mapped, micro_batch_count, patch_buffer_bytes
    from pathjax.train.xla_options import patch_network_options
    mesh = sharding.make_mesh()
    devices = mesh.devices.size
    split, whole = sharding.batch_sharded(mesh), sharding.replicated(mesh)
    model, size = create_feature_net(config), config.tile.patch_size
    options = patch_network_options()
    state = feature_learning.abstract_state(
        model, feature_learning.create_optimizer(config.learn, 1), size)
    state = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=whole), state)

    def batched(*shape, dtype):
        return jax.ShapeDtypeStruct(shape, dtype, sharding=split)

    images = lambda batch: batched(batch, size, size, 3, dtype=jnp.uint8)  # noqa: E731
    batch = {'image': images(learn_batch), 'label': batched(learn_batch, dtype=jnp.int32),
             'mask': batched(learn_batch, dtype=jnp.bool_)}
    width = config.feature_net.width
    passes = {name: micro_batch_count(batch_size, devices, config.micro_batch, name,
                                      patch_buffer_bytes(size, width, training))
              for name, batch_size, training in (('learn', learn_batch, True),
                                                 ('extract', extract_batch, False))}
    train = learn_step_memory(model, config, passes['learn'], state, batch, whole, split, options)
    features = jax.jit(mapped(lambda p, x: model.apply({'params': p}, x,
                                                       method=FeatureNet.features),
                              passes['extract']),
                       compiler_options=options).lower(
        state.params, images(extract_batch)).compile().memory_analysis()
    slides, nodes = config.train.batch_slides, graphs.bucket_size(config.graph.max_patches)
    edges = graphs.edge_budget(nodes, config.graph.k)

    def shaped(*shape, dtype=jnp.float32):  # [batch_slides, *shape]
        return batched(slides, *shape, dtype=dtype)

    graph = jraph.GraphsTuple(
        nodes={'features': shaped(nodes, 512), 'grid': shaped(nodes, 2, dtype=jnp.int32),
               'mask': shaped(nodes, dtype=jnp.bool_)},
        edges={'mask': shaped(edges, dtype=jnp.bool_)},
        senders=shaped(edges, dtype=jnp.int32), receivers=shaped(edges, dtype=jnp.int32),
        globals=None, n_node=shaped(1, dtype=jnp.int32), n_edge=shaped(1, dtype=jnp.int32))
    trainer = slide_training.SlideTrainer(config, REPO, 512)
    with jax.set_mesh(mesh):
        slide_step = jax.jit(slide_training.make_train_step(trainer.model, jnp.ones(2)),
                             donate_argnums=0).lower(
            trainer.abstract_state(), {'graph': graph, 'mask': shaped(dtype=jnp.bool_),
                                       'label': shaped(dtype=jnp.int32)},
            jax.random.key(0)).compile().memory_analysis()
    analysis = {name: {'temp': a.temp_size_in_bytes * devices,
                       'arguments': a.argument_size_in_bytes * devices,
                       'outputs': a.output_size_in_bytes * devices, 'devices': devices}
                for name, a in (('learn', train), ('extract', features),
                                ('train_slide', slide_step))}
    for name, training in (('learn', True), ('extract', False)):
        batch_size = learn_batch if training else extract_batch
        analysis[name].update(passes=passes[name], patch_buffer=patch_buffer_bytes(size, width, training)
                              * batch_size // passes[name])
    print(json.dumps(analysis))


def learn_step_memory(model, config, passes, state, batch, replicated, batched, options):
    """The memory analysis of the train step's largest compiled call (its only one when the batch
    runs in one pass; else the largest of `AccumulatedStep`'s calls)."""
    import jax
    from pathjax.train import feature_learning
    step = feature_learning.compile_train_step(model, config.am_softmax.s, config.am_softmax.m,
                                               config.learn.augment, config.learn.hed_sigma,
                                               passes, replicated, batched, options)
    key = jax.random.key(0)
    if passes == 1:
        return step.lower(state, batch, key).compile().memory_analysis()
    train = {'image': batch['image'], 'label': batch['label']}
    chunks = jax.eval_shape(step.split_inputs, train, key)
    total, metrics = jax.eval_shape(step.first, state.params, chunks[0])
    analyses = [step.split_inputs.lower(train, key), step.first.lower(state.params, chunks[0]),
                step.add.lower(total, state.params, chunks[1]),
                step.update.lower(state, total, [metrics] * passes)]
    return max((lowered.compile().memory_analysis() for lowered in analyses),
               key=lambda analysis: analysis.temp_size_in_bytes)


# ---- running stages ----


def launch(stage: str, workdir: pathlib.Path, overrides: list[str], log: pathlib.Path):
    """Runs one stage of configs/default.py in a measured subprocess, output to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, 'launch.py', '--config', 'configs/default.py', '--verbosity=0',
               f'--workdir={workdir}', f'--stages={stage}', *overrides]  # timed records in log
    with open(log, 'w') as out:
        out.write(' '.join(command) + '\n')
        out.flush()
        return run_measured(command, stdout=out, stderr=subprocess.STDOUT, cwd=REPO)


def log_tail(log: pathlib.Path, lines: int = 30) -> str:
    """The log's error lines (a crash's first words come before its thread dump), then its end."""
    text = log.read_text(errors='replace').splitlines()
    errors = [line for line in text if re.search(r'error|bad_alloc|terminate|Killed|^[EF]\d{4}',
                                                 line, re.IGNORECASE)]
    return '\n'.join(errors[:10] + ['...'] + text[-lines:])


def mem_available() -> int:
    with open('/proc/meminfo') as info:
        for line in info:
            if line.startswith('MemAvailable:'):
                return int(line.split()[1]) * 1024
    return 0



# ---- artifacts the stages leave ----


def read_json(path: pathlib.Path):
    return json.loads(path.read_text()) if path.exists() else None


def report_patches(workdir: pathlib.Path, stage: str) -> int:
    """Patches of the slides a per-slide stage finished (its report)."""
    report = read_json(workdir / 'reports' / f'{stage}.json') or {'slides': []}
    return sum(entry['patches'] for entry in report['slides'] if entry['status'] == 'ok')


def write_manifest(slides_dir: pathlib.Path) -> pathlib.Path:
    path = slides_dir / 'manifest.csv'
    with open(path, 'w', newline='') as f:
        writer = csv.writer(f, lineterminator='\n')
        writer.writerow(('slide_id', 'path', 'label', 'case_id', 'split'))
        for i, (slide_id, label, split) in enumerate(SLIDES):
            writer.writerow((slide_id, slides_dir / f'{slide_id}.svs', label, spec(i).case_id,
                             split))
    return path


def clear_stage(workdir: pathlib.Path, stage: str) -> None:
    """Deletes what `stage` made in `workdir` (the pipeline's list) and its report, so that a
    rerun measures the work instead of skipping it."""
    from pathjax import pipeline
    made = next(s.artifacts for s in pipeline.STAGES if s.name == stage)
    recorded = f'settings/{stage}.json'  # its provenance: a rerun may use other settings
    for name in [part.strip() for part in made.split(',')] + [f'reports/{stage}.json', recorded]:
        path = workdir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


def make_prefix_workdir(workdir: pathlib.Path, prefix: pathlib.Path, keep: int) -> None:
    """A workdir for extraction whose tiles files hold each slide's first `keep` patches (every
    per-patch array sliced), with the full run's feature network, stain reference and settings."""
    for name in ('tiles', 'features'):
        (prefix / name).mkdir(parents=True, exist_ok=True)
    for source in (workdir / 'tiles').glob('*.npz'):
        target = prefix / 'tiles' / source.name
        if target.exists():
            continue
        tiles = artifacts.load_npz(source)
        count = len(tiles['coords'])
        artifacts.save_npz(target, **{key: value[:keep] if value.ndim and len(value) == count
                                      else value for key, value in tiles.items()})
    for name in ('settings', 'stain'):  # the full run's, as they are now
        shutil.rmtree(prefix / name, ignore_errors=True)
        shutil.copytree(workdir / name, prefix / name)
    network = prefix / 'feature_net'
    if not network.is_symlink():
        network.symlink_to(workdir / 'feature_net')


def write_surrogate_features(workdir: pathlib.Path, prefix: pathlib.Path) -> dict:
    """SURROGATE features/<slide>.npz in the full workdir for every patch of every slide (see the
    module docstring): the extract stage's keys and dtypes. Returns {slide_id: [N, D]}."""
    shapes = {}
    for index, (slide_id, _, _) in enumerate(SLIDES):
        target = workdir / 'features' / f'{slide_id}.npz'
        tiles = artifacts.load_npz(workdir / 'tiles' / f'{slide_id}.npz', ('coords', 'grid'))
        if not target.exists():
            measured = artifacts.load_npz(prefix / 'features' / f'{slide_id}.npz')['features']
            rng = np.random.default_rng(index)
            rows = measured[rng.integers(len(measured), size=len(tiles['coords']))]
            noise = rng.standard_normal(rows.shape, dtype=np.float32)
            noise *= NOISE * measured.std(axis=0)
            artifacts.save_npz(target, features=(rows + noise).astype(np.float32),
                               coords=tiles['coords'], grid=tiles['grid'])
        shapes[slide_id] = [len(tiles['coords']), int(np.load(target)['features'].shape[1])]
    return shapes


def graph_sizes(workdir: pathlib.Path) -> dict:
    sizes = {}
    for path in sorted((workdir / 'graphs').glob('*.npz')):
        with np.load(path) as graph:
            sizes[path.stem] = {'nodes': len(graph['kept']), 'edges': len(graph['senders'])}
    return sizes


def log_times(log: pathlib.Path, text: str) -> list[float]:
    """POSIX times of the absl log lines (`I1129 16:47:10.123456 ...] message`) holding `text`."""
    times = []
    for line in log.read_text(errors='replace').splitlines():
        match = ABSL_LINE.match(line)
        if match and text in line:
            stamp = datetime.datetime.strptime(
                f'{datetime.date.today().year}{match[1]} {match[2]}', '%Y%m%d %H:%M:%S.%f')
            times.append(stamp.timestamp())
    return times


# ---- bounds ----


def bounds(workers: int, xla: dict, learn_batch: int, extract_batch: int) -> dict:
    """{stage: (bytes, why)}: what each stage's whole process tree may hold at its peak."""
    slide = WIDTH * HEIGHT * 3
    learn, extract, slide_step = xla['learn'], xla['extract'], xla['train_slide']
    return {
        'generate': (2 * GIB, f'4 texture blocks and their transposes (0.4 GiB), one 4096^2 block '
                     f'render (about 1.2 GiB) and a few 256-row bands; not the slide '
                     f'({slide / GIB:.0f} GiB of level-0 pixels)'),
        'tile': (RUNTIME + workers * GIB // 2,
                 f'the main process (1 GiB) + {workers} workers x 0.5 GiB: an overview at 1/25 '
                 f'(about 40 MB), its mask temporaries and strips; not the slide '
                 f'({slide / GIB:.0f} GiB of level-0 pixels)'),
        'patches': (RUNTIME + GIB, '1 GiB runtime + 1 GiB: reader batches and the TFDS writer; '
                    'not all sampled patches (600 x 0.75 MiB)'),
        'learn_features': (RUNTIME + learn['temp'] + learn['patch_buffer']
                           + 3 * learn['arguments'] + GIB // 2,
                           f'1 GiB runtime + XLA temp of the largest compiled call of a batch of '
                           f'{learn_batch} over {learn["devices"]} CPU device(s) in '
                           f'{learn["passes"]} micro-batch calls ({learn["temp"] / GIB:.1f} GiB) + '
                           f'Eigen\'s patch buffer of one pass ({learn["patch_buffer"] / GIB:.1f} '
                           'GiB) + 3 x that call\'s arguments on each device (the train state, '
                           'gradient sum and new gradients) + 0.5 GiB of input batches'),
        'extract': (RUNTIME + extract['temp'] + extract['patch_buffer'] + extract['arguments']
                    + GIB // 2,
                    f'1 GiB runtime + XLA temp of one batch of {extract_batch} over '
                    f'{extract["devices"]} CPU device(s) in {extract["passes"]} micro-batches ({extract["temp"] / GIB:.1f} GiB) + '
                    f'Eigen\'s patch buffer of one pass ({extract["patch_buffer"] / GIB:.1f} GiB) '
                    f'+ parameters on each device + 0.5 GiB: a few batches in flight ({extract_batch} x 0.75 MiB '
                    'each); not a slide\'s patches'),
        'train_slide': (RUNTIME + slide_step['temp'] + 4 * slide_step['arguments'] + GIB // 4,
                        f'1 GiB runtime + XLA temp of one step on 8 graphs of 8192 nodes over '
                        f'{slide_step["devices"]} CPU device(s) '
                        f'({slide_step["temp"] / GIB:.1f} GiB: saved activations, blocked '
                        f'attention without the [8, 4, 8192, 8192] buffer (8 GiB a layer), GCN '
                        f'messages [8, 131072, 128]) + 4 x arguments (the batch: prefetch 2 + 2; '
                        f'the state on each device) of {slide_step["arguments"] / GIB:.2f} GiB + 0.25 GiB for one slide\'s kNN '
                        f'search; not the cohort\'s features'),
        'evaluate': (RUNTIME + GIB, '1 GiB runtime + 1 GiB: a batch of graphs and heatmaps'),
    }


# ---- the run ----


def run_stage(stage: str, args, paths: dict, overrides: list[str], result: dict) -> dict:
    """Runs one stage and returns its row."""
    workdir, prefix, logs = paths['workdir'], paths['prefix'], paths['logs']
    row = {'stage': stage, 'ran': '', 'wall_s': None, 'throughput': None, 'unit': '',
           'peak_rss_bytes': None, 'details': {}}
    if stage == 'generate':
        todo = [i for i, (slide_id, _, _) in enumerate(SLIDES)
                if not (args.slides_dir / f'{slide_id}.svs').exists()]
        write_manifest(args.slides_dir)
        if not todo and 'generate' in result['rows']:  # keep the run that wrote them
            return result['rows']['generate']
        row['ran'] = f'{len(todo)} slides written ({len(SLIDES) - len(todo)} reused)'
        seconds, peak, failed, timings = 0.0, 0, [], {}
        logs.mkdir(parents=True, exist_ok=True)
        for i in todo:
            log, timing = (logs / f'generate-{SLIDES[i][0]}.{ext}' for ext in ('log', 'json'))
            with open(log, 'w') as err, open(timing, 'w') as out:
                measured = run_measured([sys.executable, __file__, '--write-slide', str(i),
                                         f'--slides-dir={args.slides_dir}'],
                                        stdout=out, stderr=err, cwd=REPO)
            seconds, peak = seconds + measured.seconds, max(peak, measured.peak_rss)
            if measured.returncode:
                failed.append(f'{SLIDES[i][0]}: exit {measured.returncode}: {log_tail(log)}')
            else:
                timings[SLIDES[i][0]] = {**json.loads(timing.read_text()),
                                         'wall_s': measured.seconds,
                                         'peak_rss_bytes': measured.peak_rss}
        row.update(wall_s=seconds, peak_rss_bytes=peak if todo else None,
                   returncode=int(bool(failed)))
        if todo:
            row.update(throughput=len(todo) * WIDTH * HEIGHT / 1e6 / seconds,
                       unit='level-0 Mpx/s')
        row['details'] = {'files': {p.name: p.stat().st_size for p in
                                    sorted(args.slides_dir.glob('*.svs'))},
                          'slides': timings, 'errors': failed}
        return row
    target = workdir
    if stage == 'extract':
        make_prefix_workdir(workdir, prefix, args.prefix)
        target = prefix
    elif stage in ('train_slide', 'evaluate'):
        if not all((prefix / 'features' / f'{s}.npz').exists() for s, _, _ in SLIDES):
            row.update(ran='not run: no extracted prefix features to base surrogates on',
                       returncode=-1)
            return row
        row['details']['surrogate_features'] = write_surrogate_features(workdir, prefix)
    budget = result['bounds'][stage][0]
    if mem_available() < budget:
        row.update(ran=f'not run: MemAvailable {mem_available() / GIB:.1f} GiB < its bound '
                   f'{budget / GIB:.1f} GiB', returncode=-1)
        return row
    log = logs / f'{stage}.log'
    clear_stage(target, stage)
    start = time.time()
    measured = launch(stage, target, overrides, log)
    row.update(wall_s=measured.seconds, peak_rss_bytes=measured.peak_rss,
               returncode=measured.returncode)
    if measured.returncode:
        row['ran'] = f'{stage}: exit {measured.returncode}'
        row['details']['log_tail'] = log_tail(log)
        return row
    seconds = measured.seconds
    if stage == 'tile':
        kept = report_patches(workdir, 'tile')
        report = read_json(workdir / 'reports' / 'tile.json')
        row.update(ran=f'{len(SLIDES)} slides, {kept} patches kept', throughput=kept / seconds,
                   unit='patches kept/s')
        row['details'].update(slides_per_s=len(SLIDES) / seconds, slides={
            e['slide_id']: {k: e.get(k) for k in ('patches', 'seconds', 'slide_tissue_fraction',
                                                  'level', 'read_size')}
            for e in report['slides']})
    elif stage == 'patches':
        count = report_patches(workdir, 'patches')
        row.update(ran=f'{count} patches sampled (train + val)', throughput=count / seconds,
                   unit='patches/s')
    elif stage == 'learn_features':
        lines = [json.loads(line) for line in
                 (workdir / 'feature_net' / 'metrics.jsonl').read_text().splitlines()]
        rates = [line['images_per_second'] for line in lines if 'images_per_second' in line]
        last = next(line for line in reversed(lines) if 'train_loss' in line)
        window = 2 if args.patches_per_slide else 10
        row.update(ran=f'1 epoch ({len(rates)} windows of {window} steps), then validation',
                   throughput=float(np.median(rates)), unit='images/s (training, median window)')
        row['details'].update(metrics=lines, val_accuracy=last.get('val_accuracy'))
    elif stage == 'extract':
        count = report_patches(prefix, 'extract')
        restored = log_times(log, 'checkpoint of the feature network')
        done = log_times(log, 'extract: ')[-1:]  # the stage report's summary line
        row.update(ran=f'first {args.prefix} patches of each slide: {count} patches',
                   throughput=count / seconds, unit='patches/s (stage wall)')
        row['details']['patches_per_s_after_restore'] = (
            count / (done[0] - restored[0]) if restored and done else None)
    elif stage == 'train_slide':
        report = read_json(workdir / 'reports' / 'train_slide.json')
        steps = report['training']['step']
        loaded = log_times(log, 'slides with features')  # after the graphs are built
        epochs = log_times(log, 'train_slide: epoch ')  # train.log_every_epochs=1
        intervals = np.diff(epochs)
        row['details'].update(graphs=graph_sizes(workdir), steps=steps, metrics=report['metrics'],
                              graphs_built_s=loaded[0] - start if loaded else None,
                              first_epoch_s=epochs[0] - loaded[0] if epochs and loaded else None,
                              epoch_s=intervals.tolist())
        row.update(ran=f'{steps} steps of 8 slide graphs; an epoch: 1 step, validation, checkpoint',
                   throughput=1 / float(np.median(intervals)) if len(intervals) else None,
                   unit='epochs/s after the first')
    elif stage == 'evaluate':
        slides = sum(len(p.read_text().splitlines()) - 1
                     for p in (workdir / 'eval').glob('*/predictions.csv'))
        row.update(ran=f'{slides} slides evaluated', throughput=slides / seconds, unit='slides/s')
        row['details']['metrics'] = {p.parent.name: read_json(p)
                                     for p in (workdir / 'eval').glob('*/metrics.json')}
    return row


def markdown(result: dict) -> str:
    lines = [f"Full size (configs/default.py), {result['machine']}, {result['date']}: "
             f"{len(SLIDES)} slides of {WIDTH} x {HEIGHT} px at {MPP} um/px (SVS, JPEG q"
             f"{JPEG_QUALITY}).", '',
             '| stage | what ran | wall s | throughput | peak RSS GiB | bound GiB | result |',
             '|---|---|---|---|---|---|---|']
    for stage in STAGES:
        row = result['rows'].get(stage)
        if row is None:
            continue
        bound = row.get('bound_bytes', result['bounds'][stage][0])
        peak = row['peak_rss_bytes']
        rate = '' if row['throughput'] is None else f"{row['throughput']:.3g} {row['unit']}"
        wall = '' if row['wall_s'] is None else f"{row['wall_s']:.0f}"
        ran = row['ran']
        if stage in ('learn_features', 'extract'):
            ran += f"; batch {row['batches'][stage.split('_')[0]]}"
        lines.append(f"| {stage} | {ran} | {wall} | {rate} | "
                     f"{'' if peak is None else f'{peak / GIB:.2f}'} | {bound / GIB:.1f} | "
                     f"{row['result']} |")
    lines += ['', 'Bounds:'] + [f'- {stage}: {why}' for stage, (_, why) in result['bounds'].items()]
    if result.get('earlier_failures'):
        lines += ['', 'Failed runs replaced by a later rerun (details in the JSON):']
        lines += [f"- {row['stage']}: {row['ran']}, {row['result']}; peak RSS "
                  f"{(row['peak_rss_bytes'] or 0) / GIB:.2f} GiB (bound then "
                  f"{row['bound_bytes'] / GIB:.1f} GiB), batch sizes {row.get('batches')}"
                  for row in result['earlier_failures']]
    lines += ['', *result['notes']]
    return '\n'.join(lines) + '\n'


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--slides-dir', type=pathlib.Path, default=OUT / 'slides')
    parser.add_argument('--workdir', type=pathlib.Path, default=OUT / 'work')
    parser.add_argument('--stages', default=','.join(STAGES))
    parser.add_argument('--prefix', type=int, default=300, help='patches per slide extracted')
    parser.add_argument('--steps', type=int, default=4, help='train.max_steps')
    parser.add_argument('--patches-per-slide', type=int,
                        help='learn.patches_per_slide (default: config), logged every 2 steps')
    parser.add_argument('--learn-batch', type=int, help='learn.batch_size (default: config)')
    parser.add_argument('--extract-batch', type=int, help='extract.batch_size (default: config)')
    parser.add_argument('--results', type=pathlib.Path, default=REPO / 'benchmarks' / 'results')
    parser.add_argument('--write-slide', type=int, help=argparse.SUPPRESS)
    parser.add_argument('--xla-memory', nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.slides_dir, args.workdir = args.slides_dir.resolve(), args.workdir.resolve()
    if args.write_slide is not None:
        write_one_slide(args.slides_dir, args.write_slide)
        return 0
    if args.xla_memory:
        xla_memory(*args.xla_memory)
        return 0
    stages = [s for s in args.stages.split(',') if s]
    unknown = set(stages) - set(STAGES)
    if unknown:
        parser.error(f'unknown stages {sorted(unknown)}; choose from {STAGES}')
    args.slides_dir.mkdir(parents=True, exist_ok=True)
    paths = {'workdir': args.workdir, 'logs': args.workdir.parent / 'logs',
             'prefix': args.workdir.parent / f'{args.workdir.name}-prefix{args.prefix}'}

    sys.path.insert(0, str(REPO))
    from configs import default
    config = default.get_config()
    learn_batch = args.learn_batch or config.learn.batch_size
    extract_batch = args.extract_batch or config.extract.batch_size
    workers = os.cpu_count()
    date = datetime.date.today().isoformat()
    name = f'full_size-{machine_info.cpu_slug()}-{date}'
    args.results.mkdir(parents=True, exist_ok=True)
    result = read_json(args.results / f'{name}.json') or {'rows': {}}

    xla = {}
    defaults = config.learn.batch_size, config.extract.batch_size
    for key, (learn, extract) in (('used', (learn_batch, extract_batch)), ('default', defaults)):
        if key == 'default' and (learn, extract) == (learn_batch, extract_batch):
            xla[key] = xla['used']
            continue
        probe = subprocess.run([sys.executable, __file__, '--xla-memory', str(learn), str(extract)],
                               capture_output=True, text=True, cwd=REPO)
        if probe.returncode:
            sys.stderr.write(probe.stderr)
            return 1
        xla[key] = json.loads(probe.stdout.strip().splitlines()[-1])
        xla[key]['batch'] = {'learn': learn, 'extract': extract}
    overrides = [f'--config.data.manifest={args.slides_dir / "manifest.csv"}',
                 '--config.learn.epochs=1', f'--config.train.max_steps={args.steps}',
                 '--config.learn.log_every=10', '--config.train.log_every_epochs=1']
    if args.patches_per_slide:  # a shorter epoch, logged every 2 steps
        overrides += [f'--config.learn.patches_per_slide={args.patches_per_slide}',
                      '--config.learn.log_every=2']
    if args.learn_batch:
        overrides.append(f'--config.learn.batch_size={args.learn_batch}')
    if args.extract_batch:
        overrides.append(f'--config.extract.batch_size={args.extract_batch}')
    result.update(machine=machine_info.cpu_slug(), date=date, overrides=overrides, xla_memory=xla,
                  bounds=bounds(workers, xla['used'], learn_batch, extract_batch),
                  slides={'width': WIDTH, 'height': HEIGHT, 'mpp': MPP, 'format': 'svs',
                          'jpeg_quality': JPEG_QUALITY, 'tissue_fraction': TISSUE_FRACTION,
                          'manifest': [list(s) for s in SLIDES]})
    result['notes'] = [
        f'Extraction ran on the first {args.prefix} patches of each slide (a copy of the workdir); '
        'train_slide and evaluate ran on SURROGATE features for all patches (the prefix features '
        f'resampled per patch plus {NOISE:.0%} noise), only to exercise them at real shapes.',
        f"XLA's compile-time temp memory at the default batch sizes (learn {defaults[0]}, "
        f"extract {defaults[1]}, 512 px, float32 on CPU): learn_features "
        f"{xla['default']['learn']['temp'] / GIB:.1f} GiB, extract "
        f"{xla['default']['extract']['temp'] / GIB:.1f} GiB; this run used learn {learn_batch}, "
        f'extract {extract_batch}.']
    for stage in stages:
        print(f'full_size: {stage} ...', flush=True)
        row = run_stage(stage, args, paths, overrides, result)
        peak, bound = row['peak_rss_bytes'], result['bounds'][stage][0]
        if row.get('returncode'):
            row['result'] = 'FAIL (did not complete)'
        elif peak is not None and peak > bound:
            row['result'] = f'FAIL ({peak / GIB:.2f} > {bound / GIB:.1f} GiB)'
        else:
            row['result'] = 'pass'
        row.update(batches={'learn': learn_batch, 'extract': extract_batch}, bound_bytes=bound)
        replaced = result['rows'].get(stage)
        if replaced is not None and replaced['result'] != 'pass':
            result.setdefault('earlier_failures', []).append(replaced)
        result['rows'][stage] = row
        artifacts.save_json(args.results / f'{name}.json', result)
        print(f"full_size: {stage}: {row['result']}, {row['ran']}", flush=True)
    table = markdown(result)
    artifacts.save_text(args.results / f'{name}.md', table)
    print(table)
    failed = [s for s, row in result['rows'].items() if row['result'] != 'pass']
    if failed:
        print(f'full_size: FAILED: {", ".join(failed)}')
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
