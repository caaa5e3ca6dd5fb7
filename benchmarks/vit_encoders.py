"""ViT patch encoders: pathjax's Flax ViT vs timm's, inference at 224 px.

Both networks are the preset's (ViT-B/16: `vit_base_patch16_224`, ViT-L/16:
`vit_large_patch16_224`, UNI's shape) with the same random weights (timm's, converted by
`vit_weights.convert`), run in this one process on the same float32 batch on the same cores:
timm in eval mode under `torch.inference_mode()`, pathjax's `VisionTransformer` jitted with the
options the extract stage compiles it with (`xla_options.patch_network_options`). Runners
alternate call by call (machine load hits both alike); the figure is the median images/s over
the timed calls. Outputs are checked equal (max abs difference) before timing.

The batch is the extract stage's (extract.batch_size, 64), where a small batch would flatter
the side with less per-call overhead. Each side's thread scaling is reported: the rows at every
usable core and at 1 thread (a subprocess pinned to one core: XLA sizes its pool when it
starts), each side's 1 -> N speed-up beside.

`run(quick)` gives the rows of `python -m benchmarks`.

  python benchmarks/vit_encoders.py [--threads 2] [--batch 64] [--steps 3] [--json FILE]
"""

import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

import jax
import numpy as np

from feature_net import interleaved, pin_threads, rate
from pathjax.models.patch import vit_presets, vit_weights
from pathjax.models.patch.vit import VisionTransformer
from pathjax.train.xla_options import patch_network_options
from rows import print_table, row

PRESETS = ('vit_base_patch16_224', 'vit_large_patch16_224')


def vit_flops(arch, image_size: int) -> float:
    """Forward FLOPs of one image (2 per multiply-add): patch embedding, and per block the qkv,
    output and MLP projections and the two attention products."""
    tokens = (image_size // arch.patch_size) ** 2 + arch.prefix_tokens
    d = arch.embed_dim
    mlp_out = arch.mlp_hidden // 2 if arch.mlp == 'swiglu_packed' else arch.mlp_hidden
    per_block = 2 * tokens * (3 * d * d + d * d + d * arch.mlp_hidden + mlp_out * d)
    per_block += 2 * 2 * tokens * tokens * d
    return 2 * tokens * 3 * arch.patch_size ** 2 * d + arch.depth * per_block


def models(name: str, depth: int | None = None):
    """(timm model, Flax model, its params) of a preset with the same random weights."""
    import timm
    import torch
    preset = vit_presets.get_preset(name)
    overrides = {'depth': depth} if depth else {}
    if depth:
        import dataclasses
        preset = dataclasses.replace(preset, arch=dataclasses.replace(preset.arch, depth=depth))
    torch.manual_seed(0)
    reference = timm.create_model(preset.timm_name, pretrained=False,
                                  **vit_presets.timm_kwargs(preset, **overrides)).eval()
    state = {k: v.numpy() for k, v in reference.state_dict().items()}
    params = jax.device_put(vit_weights.convert(preset, state, 'timm'))
    return preset, reference, VisionTransformer(preset.arch), params


def measure(name: str, batch: int, warmup: int, steps: int, depth: int | None = None) -> dict:
    import torch
    preset, reference, model, params = models(name, depth)
    images = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    forward = jax.jit(model.apply, compiler_options=patch_network_options())  # extraction's
    on_device = jax.device_put(images)
    nchw = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()

    def timm_features():
        with torch.inference_mode():
            return reference.forward_features(nchw)[:, 0]

    difference = float(np.abs(np.asarray(forward({'params': params}, on_device))
                              - timm_features().numpy()).max())
    times = interleaved({'flax': lambda: jax.block_until_ready(forward({'params': params},
                                                                       on_device)),
                         'timm': timm_features}, warmup, steps)
    return {'preset': preset, 'rates': {k: rate(batch, v) for k, v in times.items()},
            'max_abs_difference': difference}


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--batch', type=int, default=64, help='the extract stage\'s batch')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--steps', type=int, default=3)
    parser.add_argument('--presets', nargs='+', default=list(PRESETS))
    parser.add_argument('--depth', type=int, help='blocks (default: the preset\'s)')
    parser.add_argument('--json', help='write the rows to this file (the 1-thread subprocess)')
    return parser.parse_args(argv)


def rows_of(args) -> list[dict]:
    pin_threads(args.threads)
    out = []
    for name in args.presets:
        result = measure(name, args.batch, args.warmup, args.steps, args.depth)
        flops = vit_flops(result['preset'].arch, 224)
        flax_rate = result['rates']['flax']
        threads = f'{args.threads} thread{"s" * (args.threads > 1)}'
        blocks = f', {args.depth} blocks' if args.depth else ''
        out.append(row(f'{name}{blocks} inference, 224 px, float32, batch {args.batch}, {threads}',
                       'images/s', flax_rate, result['rates']['timm'],
                       f'the same network in timm (PyTorch, eager, inference_mode, {threads})',
                       True, f'{flax_rate * flops / 1e9:.3g} GFLOP/s',
                       max_abs_difference=result['max_abs_difference'], threads=args.threads,
                       flops_per_s=flax_rate * flops, timm_images_per_s=result['rates']['timm']))
    return out


def with_one_thread(argv: list[str], rows: list[dict]) -> list[dict]:
    """`rows` (every usable core) plus the same measurement pinned to 1 thread in a subprocess,
    each N-thread row given both sides' 1 -> N speed-up."""
    if len(os.sched_getaffinity(0)) == 1:
        return rows
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, 'rows.json')
        subprocess.run([sys.executable, __file__, *argv, '--threads', '1', '--json', path],
                       check=True, cwd=os.path.dirname(os.path.abspath(__file__)))
        single = json.loads(pathlib.Path(path).read_text())
    for many, one in zip(rows, single):
        many['scaling_from_1_thread'] = {
            'pathjax': many['pathjax'] / one['pathjax'],
            'timm': many['timm_images_per_s'] / one['timm_images_per_s']}
    return rows + single


def run(quick: bool) -> list[dict]:
    """Rows: ViT-B/16 and ViT-L/16 images/s, Flax vs timm, at every usable core and at 1 thread.
    quick: ViT-B/16 with 2 blocks, batch 2, 2 timed calls; else batch 64 (the extraction's), 3 timed
    calls after 1 warm-up."""
    argv = (['--batch', '2', '--steps', '2', '--presets', PRESETS[0], '--depth', '2'] if quick
            else ['--batch', '64', '--steps', '3'])
    return with_one_thread(argv, rows_of(parse(argv)))


if __name__ == '__main__':
    arguments = parse()
    found = rows_of(arguments)
    if arguments.json:
        with open(arguments.json, 'w') as f:
            json.dump(found, f)
    else:
        print_table(with_one_thread(sys.argv[1:], found))
