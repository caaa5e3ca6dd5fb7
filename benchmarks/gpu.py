"""pathjax at the method's sizes on one GPU: one table and one JSON (run by benchmarks/gpu.sh).

Sections, each in its own subprocess (a fresh JAX backend: device memory peaks are per section,
and a section that fails or hangs costs only itself), within one overall deadline:
- launch: `python launch.py --config configs/test.py` end to end (exit status, wall time; with
  --cpu the tile stage alone: the suite's end-to-end test runs the rest on CPU).
- vgg: the feature network at 512 px in bfloat16 and float32: pathjax's learn_features train
  step (the config's learn.augment on device, D4 by default; AM-softmax, Adam with clipping,
  state donated) and the extract forward, images/s and the fraction of the device's peak FLOP/s
  (convolution FLOPs counted as feature_net.py does: forward, or forward + weight and input
  gradients).
- vit: the ViT encoders ViT-B/16 and ViT-L/16 (presets vit_base_patch16_224 and
  vit_large_patch16_224), inference at 224 px in bfloat16 and float32, images/s and the fraction
  of the peak (FLOPs counted as vit_encoders.py does).
- knn: `knn_indices` (k = 8) of 50,000 x 512 features, against the float32 peak.
- slide: the slide model's train step (`make_train_step` on `create_slide_model`, the default
  slide_net, 8 slides, D = 512, k = 8) at 1,024, 8,192 and 32,768 nodes with dense and graph
  attention in bfloat16, and dense in float32 at 8,192: steps/s and peak device memory
  (`memory_stats()['peak_bytes_in_use']`, one process per row), against the [8, heads, N, N]
  float32 logits one layer of materialised attention would hold.
- reading: PatchReader's scaling with the host's cores, threads in one process against the same
  number of processes of one reader thread each (process start-up included), 1, 2, 4, 8, 16
  (up to the cores), on a 16,384 x 12,288 slide at 0.5 um/px (768 patches of 512 px): whether
  the cohort-time model's near-linear scaling holds, and whether threads or processes should
  read.
- input: the learn_features input (patch_input.py: `train_batches` over the patches stage's
  TFDS dataset of 512-px JPEG patches) on 1, 2, 4, 8 and 16 threads (up to the cores) against
  linear scaling of its one-thread rate: whether the cohort-time model's decoding on 16 threads
  holds.
- extraction: slide file -> features file (extraction.py's passes) on a 16,384 x 12,288 slide
  at 0.5 um/px read as 8 slides: patches/s against the network alone on preloaded batches, the
  network against the peak, and a naive read_region loop on one slide.
- trident: slides to features, pathjax's `--stages tile,extract` with a frozen ViT-S/16 against
  a TRIDENT-style pipeline (trident_pipeline.py: read_region in DataLoader workers, one per core,
  feeding timm's model on the GPU), both in bfloat16, each its own way, on 2 slides of
  8192 x 6144 and 16 biopsy-sized ones of 2048 x 1536.
Peaks (datasheet, dense): H100 SXM / H200 989 TFLOP/s bfloat16, 67 TFLOP/s float32 without
tensor cores; XLA's default precision lets float32 convolutions use TF32 tensor cores (494), so a
float32 fraction of the 67 can exceed 1. Elsewhere the peak is a matrix product measured here.

--cpu: the same sections at tiny sizes on CPU (width-reduced network, 64-px images, 64-node graphs
of a 1 + 1-layer model, a small slide), every slide-model row in one process (memory from XLA's
memory_analysis): a check that this script runs, in the test suite; its figures mean nothing.

  python benchmarks/gpu.py [--cpu] [--out DIR]
"""

import argparse
import dataclasses
import datetime
import json
import os
import pathlib
import signal
import statistics
import subprocess
import sys
import tempfile
import time

HERE = pathlib.Path(__file__).resolve().parent
REPO = HERE.parent

import machine_info  # noqa: E402  (no JAX: the orchestrator must not hold the GPU)

DEADLINE = 560  # seconds for all sections (gpu.sh, wheels installed, must end within 10 min)
PEAKS = (('H100 PCIe', 756e12, 51e12), ('H100 NVL', 835e12, 60e12), ('H100', 989e12, 67e12),
         ('H200', 989e12, 67e12))  # (device kind contains, dense bfloat16, float32 FLOP/s)


@dataclasses.dataclass(frozen=True)
class Sizes:
    """What the sections measure: the method's sizes on a GPU, or tiny ones (--cpu)."""

    image: int
    net_width: float
    train_batch: int
    infer_batch: int
    warmup: int
    steps: int
    nodes: tuple[int, ...]  # slide-model node budgets; float32 dense at the middle one
    slide_net: dict  # config overrides of the slide model
    knn: tuple[int, int]  # points, dimensions
    slide: tuple[int, int]  # extraction slide, level-0 pixels
    copies: int
    patch_mpp: tuple[int, float]  # extraction patch size, um/px
    extract_batch: int
    launch_overrides: tuple[str, ...]
    vit: tuple[str, ...]  # ViT presets measured (inference, 224 px)
    vit_depth: int  # 0: the preset's
    vit_batch: int
    reading_slide: tuple[int, int]  # level-0 pixels of the reading-scaling slide
    trident: dict  # trident_pipeline.run_all's cohorts, with the batch and precision
    input_patches: tuple[int, int]  # the learn_features input's dataset: patches, pixels
    limits: dict  # seconds per section


GPU = Sizes(image=512, net_width=1.0, train_batch=64, infer_batch=128, warmup=3, steps=10,
            nodes=(1024, 8192, 32768), slide_net={}, knn=(50_000, 512), slide=(16384, 12288),
            copies=8, patch_mpp=(512, 0.5), extract_batch=64, launch_overrides=(),
            vit=('vit_base_patch16_224', 'vit_large_patch16_224'), vit_depth=0, vit_batch=256,
            reading_slide=(16384, 12288),
            trident={'slides': 2, 'size': (8192, 6144), 'biopsies': 16,
                     'biopsy_size': (2048, 1536), 'batch': 64, 'precision': 'bfloat16'},
            input_patches=(2048, 512),
            limits={'launch': 240, 'vgg': 180, 'knn': 60, 'slide': 90, 'extraction': 180,
                    'vit': 120, 'reading': 90, 'trident': 150, 'input': 60})
CPU = Sizes(image=64, net_width=0.125, train_batch=4, infer_batch=8, warmup=1, steps=2,
            nodes=(64,), slide_net={'slide_net.d_model': 32, 'slide_net.transformer_layers': 1,
                                    'slide_net.gcn_layers': 1},
            knn=(2000, 64), slide=(4096, 3072), copies=1, patch_mpp=(64, 2.0), extract_batch=8,
            launch_overrides=('--stages=tile', '--config.data.synthetic.num_slides=4'),
            vit=('vit_small_patch16_224',), vit_depth=1, vit_batch=2, reading_slide=(2048, 2048),
            trident={'slides': 1, 'size': (1024, 1024), 'biopsies': 0, 'biopsy_size': (0, 0),
                     'batch': 8, 'precision': 'float32'},
            input_patches=(64, 128),
            limits={'launch': 240, 'vgg': 120, 'knn': 60, 'slide': 180, 'extraction': 120,
                    'vit': 120, 'reading': 60, 'trident': 120, 'input': 60})


def slide_rows(sizes: Sizes) -> list[dict]:
    """The slide-model rows: {nodes, attention, dtype}."""
    return ([{'nodes': n, 'attention': a, 'dtype': 'bfloat16'}
             for n in sizes.nodes for a in ('dense', 'graph')]
            + [{'nodes': sizes.nodes[len(sizes.nodes) // 2], 'attention': 'dense',
                'dtype': 'float32'}])


def row(section: str, name: str, unit: str, value: float, reference: float | None = None,
        reference_name: str = '', higher_is_better: bool = True, bound: str = '',
        **extra) -> dict:
    """A measured figure, and where one exists its reference and oriented ratio (> 1: better)."""
    result = {'section': section, 'name': name, 'unit': unit, 'value': float(value), **extra}
    if reference is not None:
        ratio = value / reference if higher_is_better else reference / value
        result |= {'reference': float(reference), 'reference_name': reference_name,
                   'ratio': ratio, 'higher_is_better': higher_is_better, 'bound': bound}
    return result


# ---- inside a section's process (imports JAX) ----

def peak_flops(dtype: str) -> tuple[float, str]:
    """(FLOP/s, what it is) of this device for `dtype` matrix work."""
    import jax
    import jax.numpy as jnp
    device = jax.devices()[0]
    for name, bf16, fp32 in PEAKS:
        if device.platform == 'gpu' and name in device.device_kind:
            peak = bf16 if dtype == 'bfloat16' else fp32
            kind = 'dense bfloat16' if dtype == 'bfloat16' else 'float32 (no tensor cores)'
            return peak, f'{device.device_kind} datasheet peak, {peak / 1e12:.0f} TFLOP/s {kind}'
    n = 4096 if device.platform == 'gpu' else 1024
    a = jnp.ones((n, n), dtype)
    product = jax.jit(lambda x: x @ x)
    product(a).block_until_ready()
    start = time.perf_counter()
    for _ in range(5):
        product(a).block_until_ready()
    rate = 5 * 2 * n ** 3 / (time.perf_counter() - start)
    return rate, f'{dtype} {n}x{n} matrix product measured on {device.device_kind}'


def throughput(call, warmup: int, steps: int) -> float:
    """Calls per second of `call` (which returns arrays), steps back to back."""
    import jax
    for _ in range(warmup):
        jax.block_until_ready(call())
    start = time.perf_counter()
    for _ in range(steps - 1):
        call()
    jax.block_until_ready(call())
    return steps / (time.perf_counter() - start)


def section_vgg(sizes: Sizes, _) -> list[dict]:
    import jax
    import numpy as np

    import slide_files
    from feature_net import model_flops, random_params
    from pathjax.models.patch.feature_net import FeatureNet, create_feature_net
    from pathjax.train import feature_learning
    from pathjax.runtime import train_state
    from pathjax.train.xla_options import patch_network_options
    rows, rng = [], np.random.default_rng(0)
    size, options = sizes.image, patch_network_options()
    images = rng.integers(0, 256, (sizes.infer_batch, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, 2, sizes.train_batch).astype(np.int32)
    for dtype in ('bfloat16', 'float32'):
        config = slide_files.config(**{'dtype': dtype, 'feature_net.width': sizes.net_width})
        model = create_feature_net(config)
        peak, peak_name = peak_flops(dtype)
        state = train_state.TrainState.create(
            apply_fn=model.apply, params=random_params(model.init, images[:1]),
            tx=feature_learning.create_optimizer(config.learn, 1000))
        step = feature_learning.make_train_step(model, config.am_softmax.s, config.am_softmax.m,
                                                config.learn.augment, config.learn.hed_sigma)
        batch = jax.device_put({'image': images[:sizes.train_batch], 'label': labels})
        key = jax.random.key(0)
        start = time.perf_counter()
        train = jax.jit(step, donate_argnums=0).lower(state, batch, key).compile(options)
        compile_train = time.perf_counter() - start
        carry = [state]

        def train_call():
            carry[0], metrics = train(carry[0], batch, key)
            return metrics

        infer_images = jax.device_put(images)
        start = time.perf_counter()
        infer = jax.jit(lambda p, x: model.apply({'params': p}, x, method=FeatureNet.features)
                        ).lower(carry[0].params, infer_images).compile(options)
        compile_infer = time.perf_counter() - start
        for mode, call, batch_size, compile_seconds in (
                ('train', train_call, sizes.train_batch, compile_train),
                ('inference', lambda: infer(carry[0].params, infer_images), sizes.infer_batch,
                 compile_infer)):
            images_per_s = batch_size * throughput(call, sizes.warmup, sizes.steps)
            flops = model_flops(size, sizes.net_width, mode == 'train')
            rows.append(row('vgg', f'VGG-16 (width {sizes.net_width:g}) {mode}, {size} px, '
                            f'{dtype}, batch {batch_size}', 'images/s', images_per_s,
                            peak / flops, f'images/s at the {peak_name}', True,
                            f'{images_per_s * flops / 1e12:.3g} TFLOP/s of convolutions',
                            compile_seconds=round(compile_seconds, 2)))
    return rows


def section_vit(sizes: Sizes, _) -> list[dict]:
    """ViT encoders' inference at 224 px in bfloat16 and float32: images/s against the peak."""
    import dataclasses as dc

    import jax
    import jax.numpy as jnp

    from pathjax.models.patch.vit import VisionTransformer
    from pathjax.models.patch.vit_presets import get_preset
    from vit_encoders import vit_flops
    rows = []
    images = jax.random.normal(jax.random.key(0), (sizes.vit_batch, 224, 224, 3))
    for name in sizes.vit:
        arch = get_preset(name).arch
        if sizes.vit_depth:
            arch = dc.replace(arch, depth=sizes.vit_depth)
        for dtype in ('bfloat16', 'float32'):
            model = VisionTransformer(arch, dtype=jnp.dtype(dtype))
            params = jax.jit(model.init)(jax.random.key(1), images[:1])
            forward = jax.jit(model.apply)
            peak, peak_name = peak_flops(dtype)
            images_per_s = sizes.vit_batch * throughput(lambda: forward(params, images),
                                                        sizes.warmup, sizes.steps)
            flops = vit_flops(arch, 224)
            rows.append(row('vit', f'{name}{f" (depth {arch.depth})" if sizes.vit_depth else ""}'
                            f' inference, 224 px, {dtype}, batch {sizes.vit_batch}', 'images/s',
                            images_per_s, peak / flops, f'images/s at the {peak_name}', True,
                            f'{images_per_s * flops / 1e12:.3g} TFLOP/s'))
    return rows


def section_knn(sizes: Sizes, _) -> list[dict]:
    import numpy as np

    from pathjax.data import graphs
    count, dim = sizes.knn
    features = np.random.default_rng(0).standard_normal((count, dim), dtype=np.float32)
    start = time.perf_counter()
    graphs.knn_indices(features, 8)
    first = time.perf_counter() - start
    seconds = []
    for _ in range(3):
        start = time.perf_counter()
        graphs.knn_indices(features, 8)
        seconds.append(time.perf_counter() - start)
    median = statistics.median(seconds)
    peak, peak_name = peak_flops('float32')
    flops = 2 * count * count * dim
    return [row('knn', f'knn_indices, {count:,} x {dim} float32, k = 8', 's', median,
                flops / peak, f'the distances\' 2 N^2 D FLOPs at the {peak_name}', False,
                f'{flops / median / 1e12:.3g} TFLOP/s (HIGHEST-precision distances, top-k); '
                f'first call {first:.1f} s with compilation')]


def slide_batch(slides: int, nodes: int, dim: int, k: int, seed: int = 0) -> dict:
    """`slides` random slide graphs of 7/8 of `nodes` patches (random symmetric k-neighbour
    edges), padded to `nodes` and their edge budget: the train step's batch."""
    import numpy as np

    from pathjax.data import graphs
    rng, count, padded = np.random.default_rng(seed), nodes - nodes // 8, []
    for _ in range(slides):
        senders, receivers = graphs.symmetric_edges(rng.integers(0, count, (count, k)))
        graph = graphs.slide_graph(rng.standard_normal((count, dim), dtype=np.float32),
                                   rng.integers(0, 256, (count, 2)), senders, receivers)
        padded.append(graphs.pad_graph(graph, nodes, graphs.edge_budget(nodes, k)))
    return {'graph': graphs.stack_graphs(padded),
            'label': rng.integers(0, 2, slides).astype(np.int32), 'mask': np.ones(slides, bool)}


def slide_row(sizes: Sizes, spec: dict) -> dict:
    """Steps/s and peak device memory of one slide-model configuration."""
    import jax
    import numpy as np

    import slide_files
    from feature_net import random_params
    from pathjax.models.slide.factory import create_slide_model
    from pathjax.train import slide_training
    from pathjax.runtime import train_state
    nodes, attention, dtype = spec['nodes'], spec['attention'], spec['dtype']
    config = slide_files.config(**{'dtype': dtype, 'slide_net.attention': attention,
                                   **sizes.slide_net})
    model = create_slide_model(config, num_classes=2)
    slides, k = config.train.batch_slides, config.graph.k
    batch = jax.device_put(slide_batch(slides, nodes, 512, k))
    params = random_params(lambda key, graph: model.init(key, graph, True, None), batch['graph'])
    state = train_state.TrainState.create(apply_fn=model.apply, params=params,
                                          tx=slide_training.create_optimizer(config.train))
    step = slide_training.make_train_step(model, np.ones(2, np.float32))
    key = jax.random.key(0)
    start = time.perf_counter()
    compiled = jax.jit(step, donate_argnums=0).lower(state, batch, key).compile()
    compile_seconds = time.perf_counter() - start
    carry = [state]

    def call():
        carry[0], metrics = compiled(carry[0], batch, key)
        return metrics

    steps_per_s = throughput(call, sizes.warmup, sizes.steps)
    stats = jax.devices()[0].memory_stats()
    if stats and 'peak_bytes_in_use' in stats:
        peak, source = stats['peak_bytes_in_use'], 'memory_stats peak_bytes_in_use'
    else:
        analysis = compiled.memory_analysis()
        peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
                + analysis.temp_size_in_bytes - analysis.alias_size_in_bytes)
        source = 'XLA memory_analysis (arguments + outputs + temporaries - aliased)'
    heads = config.slide_net.heads
    logits = slides * heads * nodes * nodes * 4
    name = (f'slide model train step, {slides} slides x {nodes:,} nodes, {attention} attention, '
            f'{dtype}')
    return [row('slide', name, 'steps/s', steps_per_s, compile_seconds=round(compile_seconds, 2)),
            row('slide', f'{name}: peak device memory', 'MiB', peak / 2**20, logits / 2**20,
                f'one layer\'s [{slides}, {heads}, N, N] float32 attention logits', False,
                source)]


def section_slide(sizes: Sizes, specs: list[dict]) -> list[dict]:
    return [r for spec in specs for r in slide_row(sizes, spec)]


def section_extraction(sizes: Sizes, _) -> list[dict]:
    import jax

    import extraction
    from feature_net import model_flops
    patch_size, mpp = sizes.patch_mpp
    setup = extraction.Setup(*sizes.slide, copies=sizes.copies, mpp=mpp, patch_size=patch_size,
                             net_width=sizes.net_width, batch_size=sizes.extract_batch,
                             workers=os.cpu_count())
    with tempfile.TemporaryDirectory() as folder:
        folder = pathlib.Path(folder)
        cohort = extraction.prepare(setup, folder)
        rates = extraction.measure(setup, cohort, folder, rounds=2, naive_slides=1)
    peak, peak_name = peak_flops('float32' if jax.default_backend() == 'cpu' else 'bfloat16')
    flops = model_flops(patch_size, sizes.net_width, train=False)
    what = (f'{rates["patches"]:,} patches of {patch_size} px at {mpp:g} um/px, {sizes.copies} '
            f'slide(s) of {sizes.slide[0]} x {sizes.slide[1]}, batch {sizes.extract_batch}')
    return [
        row('extraction', f'extract, slide file -> features file: {what}', 'patches/s',
            rates['pathjax'], rates['network'], 'the network alone on the same batches '
            'preloaded in memory', True, f'1.0 = the device never waits; reading: JPEG decode '
            f'on {os.cpu_count()} threads'),
        row('extraction', f'network alone: {what}', 'patches/s', rates['network'],
            peak / flops, f'patches/s at the {peak_name}', True,
            f'{rates["network"] * flops / 1e12:.3g} TFLOP/s of convolutions, host-device copies'),
        row('extraction', f'extract vs naive read_region loop (one slide): {what}', 'patches/s',
            rates['pathjax'], rates['naive'], 'read_region per patch, then the network, '
            'sequentially', True, 'the naive loop decodes on one core'),
    ]


def read_share(patches) -> int:
    """(In a reading process) its share of the patches with one reader thread, the stain's
    lookup left to the device as the extract stage reads."""
    import patch_reading
    return patch_reading.reader_read(patches, 1, defer_lut=True)


def read_in_processes(patches, count: int) -> float:
    """patches/s of `count` forked processes, each reading a contiguous share with one thread
    (pool start-up included)."""
    import concurrent.futures
    import multiprocessing

    import numpy as np
    shares = [dataclasses.replace(patches, coords=part)
              for part in np.array_split(patches.coords, count)]
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(
            count, mp_context=multiprocessing.get_context('fork')) as pool:
        done = sum(pool.map(read_share, shares))
    return done / (time.perf_counter() - start)


def section_reading(sizes: Sizes, _) -> list[dict]:
    import patch_reading
    import slide_files
    counts = [n for n in (1, 2, 4, 8, 16) if n <= (os.cpu_count() or 1)]
    with tempfile.TemporaryDirectory() as folder:
        path = slide_files.write_slide(pathlib.Path(folder) / 'reading.svs', *sizes.reading_slide,
                                       mpp=0.5)
        patches = patch_reading.slide_patches(path)
        threads = {n: patch_reading.timed(  # as the extract stage reads: lookup on the device
            lambda: patch_reading.reader_read(patches, n, defer_lut=True)) for n in counts}
        processes = {n: read_in_processes(patches, n) for n in counts}
    what = f'{len(patches.coords)} patches of 512 px at 0.5 um/px, stain lookup on the device'
    return [row('reading', f'PatchReader, {n} thread(s) vs {n} process(es): {what}',
                'patches/s', threads[n], processes[n], f'{n} forked process(es) of one reader '
                'thread each, start-up included', True, 'JPEG decode on the cores used',
                thread_scaling=threads[n] / threads[1],
                process_scaling=processes[n] / processes[1]) for n in counts]


def section_input(sizes: Sizes, _) -> list[dict]:
    import patch_input
    from pathjax.data import patches as patch_data
    counts = [n for n in (1, 2, 4, 8, 16) if n <= (os.cpu_count() or 1)]
    count, size = sizes.input_patches
    with tempfile.TemporaryDirectory() as folder:
        builder = patch_input.write_dataset(pathlib.Path(folder),
                                            patch_input.patch_images(count, size))
        source = patch_data.encoded_source(builder, 'train')
        patch_input.pathjax_pass(source, 1, 0)  # the page cache and the first allocations
        rates = {n: statistics.median(patch_input.timed(
            lambda: patch_input.pathjax_pass(source, n, epoch)) for epoch in range(2))
            for n in counts}
    what = f'{count} patches of {size} px, JPEG quality {patch_data.JPEG_QUALITY}'
    return [row('input', f'learn_features input, {n} thread(s) vs linear scaling: {what}',
                'patches/s', rates[n], n * rates[1], f'{n} x its 1-thread rate', True,
                'JPEG decode on the cores used') for n in counts]


def section_trident(sizes: Sizes, _) -> list[dict]:
    """trident_pipeline's rows on this host: every core, one round, no real slide (it is not
    on the GPU host), no rerun row (the device time is short)."""
    import torch

    import trident_pipeline
    cores = len(os.sched_getaffinity(0))
    setting = sizes.trident
    sides = trident_pipeline.Sides(setting['batch'], cores, (cores,),
                                   device='cuda' if torch.cuda.is_available() else 'cpu',
                                   precision=setting['precision'], rerun=False)
    found = trident_pipeline.run_all(setting['slides'], setting['size'], setting['biopsies'],
                                     setting['biopsy_size'], '', sides)
    return [row('trident', r['name'], r['unit'], r['pathjax'], r['reference'], r['reference_name'],
                True, r['bound'], max_abs_difference=r['max_abs_difference'],
                trident_patches_per_s=r['trident_patches_per_s'],
                pathjax_seconds=r['pathjax_seconds']) for r in found]


def section_launch(sizes: Sizes, _) -> list[dict]:
    """launch.py in a subprocess; its last stage's report must be written."""
    stages = [a.split('=', 1)[1] for a in sizes.launch_overrides if a.startswith('--stages=')]
    last = stages[0].split(',')[-1] if stages else 'evaluate'
    with tempfile.TemporaryDirectory() as workdir:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, 'launch.py', '--config', 'configs/test.py',
                               '--workdir', workdir, *sizes.launch_overrides], cwd=REPO,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        reported = (pathlib.Path(workdir) / 'reports' / f'{last}.json').exists()
    if done.returncode or not reported:
        raise RuntimeError(f'launch.py exited with {done.returncode} ({last} report written: '
                           f'{reported}):\n{done.stderr[-3000:]}')
    return [row('launch', ' '.join(['python launch.py --config configs/test.py',
                                    *sizes.launch_overrides]), 's', seconds,
                returncode=done.returncode)]


SECTIONS = {'launch': section_launch, 'vgg': section_vgg, 'vit': section_vit,
            'knn': section_knn, 'slide': section_slide, 'reading': section_reading,
            'extraction': section_extraction, 'trident': section_trident,
            'input': section_input}


# ---- the orchestrator (no JAX) ----

def plan(sizes: Sizes, cpu: bool) -> list[tuple[str, list[dict]]]:
    """(section, its slide-model rows) in order; on GPU one process per slide-model row."""
    specs = slide_rows(sizes)
    slide = [('slide', specs)] if cpu else [('slide', [spec]) for spec in specs]
    return ([('launch', []), ('reading', []), ('input', []), ('trident', []), ('vgg', []),
             ('vit', []), ('knn', [])] + slide + [('extraction', [])])


def run_section(name: str, specs: list[dict], cpu: bool, limit: float) -> tuple[list, dict]:
    """A section in its own process group: (its rows or one failed row, what it took). On
    timeout the whole group is killed (launch.py and tile workers included)."""
    with tempfile.TemporaryDirectory() as folder:
        rows_file, log_file = pathlib.Path(folder) / 'rows.json', pathlib.Path(folder) / 'log'
        command = [sys.executable, __file__, '--section', name, '--specs', json.dumps(specs),
                   '--rows-file', str(rows_file)] + ['--cpu'] * cpu
        start = time.perf_counter()
        with open(log_file, 'w') as log:
            process = subprocess.Popen(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
                                       start_new_session=True)
            try:
                returncode = process.wait(limit)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
                returncode = 'timeout'
        took = {'section': name, 'specs': specs, 'seconds': round(time.perf_counter() - start, 1),
                'returncode': returncode}
        if returncode == 0:
            return json.loads(rows_file.read_text()), took
        output = log_file.read_text(errors='replace')[-3000:]
    label = name + (f' {specs}' if name == 'slide' else '')
    why = f'ran past its {limit:.0f} s' if returncode == 'timeout' else f'exit status {returncode}'
    print(f'{label} FAILED ({why}):\n{output}', file=sys.stderr, flush=True)
    return [{'section': name, 'name': f'{label}: FAILED ({why})', 'failed': True,
             'error': output}], took


def table(rows: list[dict]) -> str:
    lines = ['| section | row | unit | value | reference | ratio | bound |',
             '|---|---|---|---|---|---|---|']
    for r in rows:
        if r.get('failed'):
            lines.append(f'| {r["section"]} | **{r["name"]}** | | | | | |')
            continue
        reference = (f'{r["reference"]:.4g} ({r["reference_name"]})' if 'reference' in r
                     else '')
        ratio = f'{r["ratio"]:.3g}x' if 'ratio' in r else ''
        lines.append(f'| {r["section"]} | {r["name"]} | {r["unit"]} | {r["value"]:.4g} | '
                     f'{reference} | {ratio} | {r.get("bound", "")} |')
    return '\n'.join(lines)


def orchestrate(cpu: bool, out: str) -> int:
    sizes = CPU if cpu else GPU
    started, load_before = time.perf_counter(), os.getloadavg()
    machine = machine_info.describe(str(REPO))
    print(f'{machine["accelerator"]["kind"]} ({machine["accelerator"]["platform"]}), '
          f'{machine["cores"]} cores, jax {machine["packages"]["jax"]}', flush=True)
    rows, sections = [], []
    for name, specs in plan(sizes, cpu):
        left = DEADLINE - (time.perf_counter() - started)
        if left < 20:
            rows.append({'section': name, 'name': f'{name}: FAILED (not run: out of time)',
                         'failed': True, 'error': 'deadline'})
            continue
        found, took = run_section(name, specs, cpu, min(sizes.limits[name], left))
        rows += found
        sections.append(took)
        print(f'{name}{" " + json.dumps(specs) if specs else ""}: {took["seconds"]:.0f} s',
              flush=True)
    report = {'command': [sys.executable, *sys.argv], 'cpu_mode': cpu,
              'date': datetime.datetime.now().isoformat(timespec='seconds'),
              'seconds': round(time.perf_counter() - started, 1), 'machine': machine,
              'load_average_before': load_before, 'load_average_after': os.getloadavg(),
              'sections': sections, 'rows': rows}
    folder = pathlib.Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f'gpu-{machine_info.slug(machine)}-{datetime.date.today().isoformat()}.json'
    path.write_text(json.dumps(report, indent=1) + '\n')
    print('\n' + table(rows) + f'\n\n{report["seconds"]:.0f} s; wrote {path}', flush=True)
    return int(any(r.get('failed') for r in rows))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--cpu', action='store_true', help='tiny sizes on CPU (a check)')
    parser.add_argument('--out', default=str(HERE / 'results'), help='folder for the JSON')
    parser.add_argument('--section', choices=tuple(SECTIONS), help=argparse.SUPPRESS)
    parser.add_argument('--specs', default='[]', help=argparse.SUPPRESS)
    parser.add_argument('--rows-file', help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.section:
        found = SECTIONS[args.section](CPU if args.cpu else GPU, json.loads(args.specs))
        pathlib.Path(args.rows_file).write_text(json.dumps(found))
        return 0
    return orchestrate(args.cpu, args.out)


if __name__ == '__main__':
    sys.exit(main())
