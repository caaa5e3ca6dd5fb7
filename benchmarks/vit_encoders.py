"""ViT patch encoders: pathjax's Flax ViT vs timm's, inference at 224 px.

Both networks are the preset's (ViT-B/16: `vit_base_patch16_224`, ViT-L/16:
`vit_large_patch16_224`, UNI's shape) with the same random weights (timm's, converted by
`vit_weights.convert`), run in this one process on the same float32 batch on the same cores:
timm in eval mode under `torch.inference_mode()`, pathjax's `VisionTransformer` jitted. Runners
alternate call by call (machine load hits both alike); the figure is the median images/s over
the timed calls. Outputs are checked equal (max abs difference) before timing.

`run(quick)` gives the rows of `python -m benchmarks`.

  python benchmarks/vit_encoders.py [--threads 2] [--batch 8] [--steps 5]
"""

import argparse
import os

import jax
import numpy as np

from feature_net import interleaved, pin_threads, rate
from pathjax.models.patch import vit_presets, vit_weights
from pathjax.models.patch.vit import VisionTransformer
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


def measure(name: str, batch: int, warmup: int, steps: int) -> dict:
    import torch
    preset, reference, model, params = models(name)
    images = np.random.default_rng(0).normal(size=(batch, 224, 224, 3)).astype(np.float32)
    forward = jax.jit(model.apply)
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
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--presets', nargs='+', default=list(PRESETS))
    return parser.parse_args(argv)


def rows_of(args) -> list[dict]:
    pin_threads(args.threads)
    out = []
    for name in args.presets:
        result = measure(name, args.batch, args.warmup, args.steps)
        flops = vit_flops(result['preset'].arch, 224)
        flax_rate = result['rates']['flax']
        out.append(row(f'{name} inference, 224 px, float32, batch {args.batch}', 'images/s',
                       flax_rate, result['rates']['timm'],
                       f'the same network in timm (PyTorch, eager, {args.threads} threads)', True,
                       f'{flax_rate * flops / 1e9:.3g} GFLOP/s',
                       max_abs_difference=result['max_abs_difference'],
                       flops_per_s=flax_rate * flops))
    return out


def run(quick: bool) -> list[dict]:
    """Rows: ViT-B/16 and ViT-L/16 images/s, Flax vs timm, on every usable core. quick: batch 2,
    2 timed calls; else batch 8, 5."""
    return rows_of(parse(['--batch', '2', '--steps', '2'] if quick else []))


if __name__ == '__main__':
    print_table(rows_of(parse()))
