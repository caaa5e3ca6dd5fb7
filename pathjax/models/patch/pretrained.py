"""ImageNet VGG-16 weights for the trunk in torchvision's state_dict layout, the check of a weights
file against a backbone, and the converter to .npz (reading files: `weight_files`; ViT presets:
`vit_weights`).

Nothing is downloaded. The file is torchvision's `vgg16` state_dict: `features.{i}.weight`
[out, in, 3, 3] and `features.{i}.bias` [out] for the 13 convolutions (i = 0, 2, 5, ..., 28; the
ReLUs and max-pools in between have no parameters); `classifier.*` keys are ignored (not read).
It is read from a `.pth`/`.pt` file with torch (the optional `torch` extra), a `.safetensors` or
an `.npz` file; shapes and dtypes are checked from the file's headers before any data is read.
Convert once where torch is installed (a ViT file: name its preset; checked strictly first):

  python -m pathjax.models.patch.pretrained vgg16-397923af.pth vgg16.npz
  python -m pathjax.models.patch.pretrained pytorch_model.bin uni.npz vit_large_patch16_224
"""

import os
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from absl import app, logging

from pathjax import artifacts
from pathjax.models.patch import vit_presets, vit_weights
from pathjax.models.patch.feature_net import VGG16_BACKBONE
from pathjax.models.patch.vgg import BLOCKS, conv_names
from pathjax.models.patch.weight_files import PretrainedWeightsError, open_weights


def torchvision_conv_indices() -> list[int]:
    """Index in torchvision's `vgg16().features` of each conv, in trunk order: 0, 2, 5, ..., 28."""
    indices, index = [], 0
    for block in BLOCKS:
        for _ in block:
            indices.append(index)
            index += 2  # Conv2d, ReLU
        index += 1  # MaxPool2d
    return indices


def _expected_shapes() -> dict[str, tuple[str, tuple[int, ...], tuple[int, ...]]]:
    """torchvision key prefix -> (layer name, weight shape [out, in, 3, 3], bias shape [out])."""
    channels = [c for block in BLOCKS for c in block]
    inputs = [3, *channels[:-1]]
    layers = zip(torchvision_conv_indices(), conv_names(), inputs, channels, strict=True)
    return {f'features.{i}': (name, (c_out, c_in, 3, 3), (c_out,))
            for i, name, c_in, c_out in layers}


def vgg16_keys() -> list[str]:
    """The 26 torchvision keys of the trunk's convolutions (weights and biases)."""
    return [f'{prefix}.{kind}' for prefix in _expected_shapes() for kind in ('weight', 'bias')]


def _check_entry(state_dict: Mapping[str, Any], key: str, layer: str, shape: tuple[int, ...],
                 source: str) -> None:
    """Checks that state_dict[key] (an array, or a file's TensorHeader) has `shape`, floating."""
    if key not in state_dict:
        hint = ''
        if any(k.endswith('running_mean') for k in state_dict):
            hint = ' (it looks like vgg16_bn, with batch norm; pathjax uses plain vgg16)'
        elif not any(k.startswith('features.') for k in state_dict):
            hint = f' (it has no features.* keys; first keys: {", ".join(list(state_dict)[:5])})'
        raise PretrainedWeightsError(
            f"{source}: missing key '{key}' (layer {layer}) of torchvision's vgg16{hint}")
    entry = state_dict[key]
    if tuple(entry.shape) != shape:
        raise PretrainedWeightsError(f"{source}: key '{key}' (layer {layer}) has shape "
                                     f"{tuple(entry.shape)}, expected {shape}")
    if not np.issubdtype(entry.dtype, np.floating):
        raise PretrainedWeightsError(
            f"{source}: key '{key}' (layer {layer}) has dtype {entry.dtype}, expected floating")


def check_vgg16(state_dict: Mapping[str, Any], source: str) -> None:
    """Checks that `state_dict` (key -> array, or an open `WeightsFile`: its headers) has the
    trunk's 26 tensors, each of its shape and floating; other keys are ignored.

    Raises:
        PretrainedWeightsError: naming `source`, the key and its layer.
    """
    for prefix, (layer, weight_shape, bias_shape) in _expected_shapes().items():
        _check_entry(state_dict, f'{prefix}.weight', layer, weight_shape, source)
        _check_entry(state_dict, f'{prefix}.bias', layer, bias_shape, source)


def vgg16_trunk_params(state_dict: Mapping[str, np.ndarray], source: str = 'state_dict') -> dict:
    """torchvision vgg16 state_dict -> params of `VGG16(width=1.0)` (conv layers only), float32.

    Kernels become [kh, kw, in, out] (torch's [out, in, kh, kw] transposed); biases are unchanged.

    Args:
        state_dict: key -> array, as `read_vgg16_state_dict` returns it.
        source: what to name in error messages (the file).

    Raises:
        PretrainedWeightsError: a key is missing or has the wrong shape or values.
    """
    check_vgg16(state_dict, source)
    params = {}
    for prefix, (layer, _, _) in _expected_shapes().items():
        for key in (f'{prefix}.weight', f'{prefix}.bias'):
            if not np.isfinite(state_dict[key]).all():
                raise PretrainedWeightsError(
                    f"{source}: key '{key}' (layer {layer}) has NaN or inf values")
        kernel = state_dict[f'{prefix}.weight'].transpose(2, 3, 1, 0)
        params[layer] = {'kernel': np.ascontiguousarray(kernel, np.float32),
                         'bias': state_dict[f'{prefix}.bias'].astype(np.float32)}
    return params


def read_vgg16_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The trunk's 26 tensors of a torchvision vgg16 weights file, checked from the file's
    headers first (`check_vgg16`); other tensors are not read."""
    with open_weights(path) as weights:
        check_vgg16(weights, str(path))
        return {key: weights.read(key) for key in vgg16_keys()}


def load_pretrained_trunk(path: str | os.PathLike, trunk_params: Mapping[str, Any]) -> dict:
    """Returns `trunk_params` with its 13 conv layers replaced by the weights in `path`.

    Other entries (e.g. the 'embedding' Dense) are kept as initialised. The trunk must have
    width 1 (ImageNet's channel counts).

    Args:
        path: `.pth`/`.pt`, `.safetensors` or `.npz` file in torchvision's vgg16 state_dict
            layout.
        trunk_params: params of an initialised `VGG16` (the 'trunk' entry of a FeatureNet).

    Raises:
        PretrainedWeightsError: bad file, or a layer whose shape differs from the file's.
    """
    pretrained = vgg16_trunk_params(read_vgg16_state_dict(path), source=str(path))
    new_params = dict(trunk_params)
    for layer, weights in pretrained.items():
        if layer not in trunk_params:
            raise PretrainedWeightsError(
                f'{path}: the trunk params have no layer {layer} '
                f'(keys: {", ".join(trunk_params)}); '
                f"pass the VGG16 params (FeatureNet's params['trunk']), not the whole variables")
        new_layer = dict(trunk_params[layer])
        for name, value in weights.items():
            current = trunk_params[layer][name]
            if tuple(current.shape) != value.shape:
                raise PretrainedWeightsError(
                    f'{path}: layer {layer} {name} has shape {value.shape} in the file but '
                    f'{tuple(current.shape)} in the model; ImageNet weights need width 1 '
                    f'(feature_net.width = 1.0)')
            new_layer[name] = jnp.asarray(value, dtype=current.dtype)
        new_params[layer] = new_layer
    logging.info('Loaded ImageNet VGG-16 weights for %d conv layers from %s', len(pretrained), path)
    return new_params


def check_weights_file(path: str | os.PathLike, backbone: str) -> None:
    """Checks a weights file against a backbone from the file's headers, reading no tensor data:
    'vgg16' (torchvision's vgg16 trunk keys; others ignored) or a ViT preset name (every key of
    the preset and no other, each of its shape or, for pos_embed, resamplable to it).

    Raises:
        PretrainedWeightsError: naming the file and what is wrong with it.
        ImportError: a .pth/.pt/.bin file where torch is not installed.
        ValueError: an unknown backbone.
    """
    if backbone != VGG16_BACKBONE and backbone not in vit_presets.PRESETS:
        raise ValueError(f'unknown backbone {backbone!r}; backbones: '
                         f'{", ".join((VGG16_BACKBONE, *vit_presets.PRESETS))}')
    with open_weights(path) as weights:
        if backbone == VGG16_BACKBONE:
            check_vgg16(weights, str(path))
        else:
            vit_weights.check(vit_presets.get_preset(backbone), weights, str(path))


def save_npz(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the trunk's keys (`features.*` of the 13 convs) of `state_dict` to `path` (.npz).

    The keys are checked first; `classifier.*` is left out (ImageNet's classifier is about 90%
    of the file and pathjax never uses it). Written atomically.
    """
    vgg16_trunk_params(state_dict, source=f'state_dict to write to {path}')  # validates first
    artifacts.save_npz(path, **{key: np.asarray(state_dict[key]) for key in vgg16_keys()})


def save_vit_npz(state_dict: Mapping[str, Any], preset_name: str, path) -> None:
    """Writes a ViT preset's timm state_dict to `path` (.npz), after the strict check of
    `vit_weights.convert` (every key used, every shape right)."""
    preset = vit_presets.get_preset(preset_name)
    vit_weights.convert(preset, dict(state_dict), f'state_dict to write to {path}')
    artifacts.save_npz(path, **{key: np.asarray(value) for key, value in state_dict.items()})


def main(argv: list[str]) -> int:
    """python -m pathjax.models.patch.pretrained input output.npz [vit_preset]; a bad input: one line
    naming the file and what is wrong, exit status 2. Without a preset the input is
    torchvision's vgg16, with one a timm ViT."""
    if len(argv) not in (3, 4):
        raise app.UsageError('usage: python -m pathjax.models.patch.pretrained input.(pth|bin|'
                             'safetensors) output.npz [vit_preset]')
    source, target = argv[1:3]
    try:
        if len(argv) == 4:
            preset = vit_presets.get_preset(argv[3])
            save_vit_npz(vit_weights.read_state_dict(preset, source), preset.name, target)
        else:
            save_npz(read_vgg16_state_dict(source), target)
    except (ImportError, ValueError) as error:  # PretrainedWeightsError is a ValueError
        logging.error('%s', ' '.join(str(error).split()))
        return 2
    logging.info('Wrote the weights of %s to %s', source, target)
    return 0


if __name__ == '__main__':
    app.run(main)
