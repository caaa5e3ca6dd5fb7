"""timm ViT state_dicts -> parameters of `vit.VisionTransformer`, strictly.

Every parameter of the Flax model has one timm key (`torch_key`): `blocks_3/attn/qkv/kernel`
is `blocks.3.attn.qkv.weight` transposed, `patch_embed/kernel` [p, p, 3, D] is
`patch_embed.proj.weight` [D, 3, p, p], a LayerNorm's `scale` is its `weight`. Conversion uses
every key of the file and checks every shape and dtype, from the file's headers before any data
is read; position embeddings for another grid (DINOv2's 518 px; a side of at most
MAX_POS_EMBED_GRID) are resampled to the preset's as timm does. Anything else stops with one error
that lists the missing, unexpected, mis-shaped and non-floating keys and names the presets the
file would fit.
"""

import functools
import math
import os
import re
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from pathjax.models.patch.vit import ViTArchitecture, VisionTransformer, resample_pos_embed
from pathjax.models.patch.vit_presets import PRESETS, ViTPreset
from pathjax.models.patch.weight_files import PretrainedWeightsError, open_weights

MAX_LISTED = 8  # keys named per kind of problem
MAX_POS_EMBED_GRID = 128  # patches per side of a file's position embeddings (1792 px at 14 px)


def abstract_params(preset: ViTPreset) -> dict:
    """The preset's parameter tree of ShapeDtypeStructs (nothing allocated)."""
    return _abstract_params(preset.arch)


def _abstract_params(arch: ViTArchitecture) -> dict:
    images = jax.ShapeDtypeStruct((1, arch.img_size, arch.img_size, 3), jnp.float32)
    return jax.eval_shape(VisionTransformer(arch).init, jax.random.key(0), images)['params']


def torch_key(path: tuple[str, ...]) -> str:
    """The timm state_dict key of a Flax parameter path."""
    *modules, leaf = path
    if modules == ['patch_embed']:
        return f'patch_embed.proj.{"weight" if leaf == "kernel" else "bias"}'
    name = {'kernel': 'weight', 'scale': 'weight'}.get(leaf, leaf)
    return '.'.join([re.sub(r'^blocks_(\d+)$', r'blocks.\1', m) for m in modules] + [name])


def to_torch_shape(path: tuple[str, ...], shape: tuple[int, ...]) -> tuple[int, ...]:
    if path[-1] == 'kernel':
        return (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape[::-1]
    return shape


def to_flax(path: tuple[str, ...], value: np.ndarray) -> np.ndarray:
    if path[-1] == 'kernel':
        value = value.transpose(2, 3, 1, 0) if value.ndim == 4 else value.T
    return np.ascontiguousarray(value, dtype=np.float32)


def expected_keys(preset: ViTPreset) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """timm key -> (Flax path, timm shape) of every parameter of the preset."""
    return dict(_expected_keys(preset.arch))


@functools.cache
def _expected_keys(arch: ViTArchitecture) -> dict[str, tuple[tuple[str, ...], tuple[int, ...]]]:
    """`expected_keys` of an architecture (its parameters depend on nothing else), computed once:
    tracing a large ViT takes a second, and a refused file is compared with every preset."""
    out = {}
    for key_path, leaf in jax.tree_util.tree_flatten_with_path(_abstract_params(arch))[0]:
        path = tuple(k.key for k in key_path)
        out[torch_key(path)] = (path, to_torch_shape(path, tuple(leaf.shape)))
    return out


def _pos_embed_fits(preset: ViTPreset, shape: tuple[int, ...]) -> bool:
    """Whether position embeddings of `shape` can be resampled to the preset's grid."""
    arch = preset.arch
    prefix = 0 if arch.no_embed_class else arch.prefix_tokens
    grid = shape[1] - prefix if len(shape) == 3 else -1
    return (len(shape) == 3 and shape[0] == 1 and shape[2] == arch.embed_dim
            and 0 < grid <= MAX_POS_EMBED_GRID ** 2 and math.isqrt(grid) ** 2 == grid)


def problems(preset: ViTPreset, state_dict: Mapping, expected=None) -> dict[str, list[str]]:
    """{'missing', 'unexpected', 'mis-shaped', 'not floating-point'}: the keys that keep
    `state_dict` (key -> array, or an open `WeightsFile`: its headers) from being the preset's
    (empty lists: it fits); `expected`: its `expected_keys`, if already made."""
    expected = expected or expected_keys(preset)
    wrong, not_float = [], []
    for key, (_, shape) in expected.items():
        if key not in state_dict:
            continue
        entry = state_dict[key]
        actual = tuple(np.shape(entry))
        fits = _pos_embed_fits(preset, actual) if key == 'pos_embed' else actual == shape
        if not fits:
            wrong.append(f'{key} {actual} (expected {shape})')
        if not np.issubdtype(entry.dtype, np.floating):
            not_float.append(f'{key} ({entry.dtype})')
    return {'missing': [k for k in expected if k not in state_dict],
            'unexpected': [k for k in state_dict if k not in expected],
            'mis-shaped': wrong, 'not floating-point': not_float}


def fitting_presets(state_dict: Mapping) -> list[str]:
    """The presets that `state_dict` fits."""
    return [name for name, preset in PRESETS.items()
            if not any(problems(preset, state_dict).values())]


def check(preset: ViTPreset, state_dict: Mapping, source: str, expected=None) -> None:
    """Checks that `state_dict` (key -> array, or an open `WeightsFile`: its headers) is the
    preset's: every key, no other, each of its shape and floating.

    Raises:
        PretrainedWeightsError: listing missing, unexpected, mis-shaped and non-floating keys and
            the presets that would fit.
    """
    found = problems(preset, state_dict, expected)
    if any(found.values()):
        lines = [f'{kind} ({len(keys)}): {", ".join(keys[:MAX_LISTED])}'
                 + (', ...' if len(keys) > MAX_LISTED else '')
                 for kind, keys in found.items() if keys]
        others = fitting_presets(state_dict)
        hint = (f'it fits preset(s) {", ".join(others)}' if others else
                'it fits no preset (presets: ' + ', '.join(PRESETS) + ')')
        raise PretrainedWeightsError(f'{source} is not a {preset.name} state_dict in timm\'s '
                                     f'layout: ' + '; '.join(lines) + f'; {hint}')


def convert(preset: ViTPreset, state_dict: dict[str, np.ndarray], source: str) -> dict:
    """The Flax parameters of `preset` from a timm state_dict (float32 numpy arrays).

    Raises:
        PretrainedWeightsError: as `check`, or NaN or inf values.
    """
    state_dict = {k.removeprefix('module.'): v for k, v in state_dict.items()}
    expected = expected_keys(preset)
    check(preset, state_dict, source, expected)
    params = {}
    for key, (path, _) in expected.items():
        value = np.asarray(state_dict[key], np.float32)
        if key == 'pos_embed':
            arch = preset.arch
            value = resample_pos_embed(value, (arch.grid, arch.grid),
                                       0 if arch.no_embed_class else arch.prefix_tokens)
        if not np.isfinite(value).all():
            raise PretrainedWeightsError(f'{source}: {key} has NaN or inf values')
        holder = params
        for part in path[:-1]:
            holder = holder.setdefault(part, {})
        holder[path[-1]] = to_flax(path, value)
    return params


def read_state_dict(preset: ViTPreset, path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The preset's tensors from a weights file (.safetensors, .pth/.bin, .npz), checked from the
    file's headers (`check`) before any data is read."""
    with open_weights(path) as weights:  # a malformed file fails here, before any tracing
        expected = expected_keys(preset)
        check(preset, weights, str(path), expected)
        return {key: weights.read(key) for key in expected}


def load_params(preset: ViTPreset, path: str | os.PathLike) -> dict:
    """The preset's parameters from a local weights file (.safetensors, .pth/.bin, .npz)."""
    return convert(preset, read_state_dict(preset, path), str(path))
