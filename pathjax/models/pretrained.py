"""Weight files: state_dicts from .safetensors, .pth/.pt/.bin (torch, weights_only) or .npz, and
ImageNet VGG-16 weights for the trunk in torchvision's state_dict layout (ViT presets:
`vit_weights`).

Nothing is downloaded. The file is torchvision's `vgg16` state_dict: `features.{i}.weight`
[out, in, 3, 3] and `features.{i}.bias` [out] for the 13 convolutions (i = 0, 2, 5, ..., 28; the
ReLUs and max-pools in between have no parameters); `classifier.*` keys are ignored. It is read
from a `.pth`/`.pt` file with torch (the optional `torch` extra) or from an `.npz` with numpy.
Convert once where torch is installed (a ViT file: name its preset; checked strictly first):

  python -m pathjax.models.pretrained vgg16-397923af.pth vgg16.npz
  python -m pathjax.models.pretrained pytorch_model.bin uni.npz vit_large_patch16_224
"""

import json
import mmap
import os
import pathlib
from collections.abc import Mapping
from typing import Any

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from absl import app, logging

from pathjax import artifacts
from pathjax.models.vgg import BLOCKS, conv_names

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
NPZ_SUFFIX = '.npz'
SAFETENSORS_SUFFIX = '.safetensors'


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file that is missing, unreadable or not VGG-16 in torchvision layout."""


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


def _strip_prefix(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """Drops the 'module.' prefix that (Distributed)DataParallel adds to every key."""
    return {key.removeprefix('module.'): value for key, value in state_dict.items()}


def _load_torch(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError(
            f'{path}: reading a {path.suffix} file needs PyTorch; install the torch extra '
            f"(pip install -e '.[torch]') or convert the file to .npz where torch is installed "
            f'(python -m pathjax.models.pretrained {path.name} {path.stem}.npz)') from error
    try:
        loaded = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as error:  # torch raises unpickling, zip and EOF errors of several types
        raise PretrainedWeightsError(
            f'{path}: cannot read as a PyTorch state_dict (torch.load, weights_only=True): '
            f'{type(error).__name__}: {error}') from error
    if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'), Mapping):
        loaded = loaded['state_dict']
    if not isinstance(loaded, Mapping):
        raise PretrainedWeightsError(
            f'{path}: holds a {type(loaded).__name__}, not a state_dict (a dict of tensors)')
    return {key: value.detach().cpu().float().numpy() if value.is_floating_point()
            else value.detach().cpu().numpy()
            for key, value in loaded.items() if isinstance(value, torch.Tensor)}


SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                      'BF16': ml_dtypes.bfloat16,
                      'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
                      'U8': np.uint8, 'BOOL': np.bool_}


def _load_safetensors(path: pathlib.Path) -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file (an 8-byte header size, a JSON header of dtype, shape
    and byte offsets, then the raw little-endian data; no code is ever run), memory-mapped and
    copied out one tensor at a time; bfloat16 and float16 become float32."""
    try:
        with open(path, 'rb') as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as data:
            size = int.from_bytes(data[:8], 'little')
            header = json.loads(bytes(data[8:8 + size]))
            out = {}
            for key, info in header.items():
                if key == '__metadata__':
                    continue
                dtype = np.dtype(SAFETENSORS_DTYPES[info['dtype']])
                start, end = (8 + size + offset for offset in info['data_offsets'])
                count = int(np.prod(info['shape'], dtype=np.int64))
                if end > len(data) or end - start != count * dtype.itemsize:
                    raise ValueError(f'tensor {key!r}: bytes {start}-{end} do not hold '
                                     f'{info["shape"]} {info["dtype"]}')
                array = np.frombuffer(data[start:end], dtype).reshape(info['shape'])
                widen = info['dtype'] in ('BF16', 'F16')
                out[key] = array.astype(np.float32) if widen else array
            return out
    except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError) as error:
        raise PretrainedWeightsError(f'{path}: cannot read as .safetensors: '
                                     f'{type(error).__name__}: {error}') from error


def _load_npz(path: pathlib.Path) -> dict[str, np.ndarray]:
    try:
        return artifacts.load_npz(path)  # allow_pickle=False
    except (OSError, ValueError, EOFError) as error:
        raise PretrainedWeightsError(f'{path}: cannot read as .npz: {error}') from error


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a state_dict from a `.safetensors`, `.pth`/`.pt`/`.bin` (needs torch; read with
    `weights_only=True`, never arbitrary pickle) or `.npz` file.

    A dict wrapped under 'state_dict' and a 'module.' key prefix are accepted.

    Returns:
        Key -> array (floating torch tensors become float32; non-tensor entries are dropped).

    Raises:
        PretrainedWeightsError: missing or unreadable file, or an unknown suffix.
        ImportError: a torch file where torch is not installed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f'pretrained weights file not found: {path}')
    suffix = path.suffix.lower()
    if suffix in TORCH_SUFFIXES:
        state_dict = _load_torch(path)
    elif suffix == NPZ_SUFFIX:
        state_dict = _load_npz(path)
    elif suffix == SAFETENSORS_SUFFIX:
        state_dict = _load_safetensors(path)
    else:
        raise PretrainedWeightsError(
            f'{path}: unknown pretrained weights format {suffix!r}; expected one of '
            f'{", ".join((SAFETENSORS_SUFFIX, *TORCH_SUFFIXES, NPZ_SUFFIX))}')
    return _strip_prefix(state_dict)


def _checked(state_dict: Mapping[str, Any], key: str, layer: str, shape: tuple[int, ...],
             source: str) -> np.ndarray:
    if key not in state_dict:
        hint = ''
        if any(k.endswith('running_mean') for k in state_dict):
            hint = ' (it looks like vgg16_bn, with batch norm; pathjax uses plain vgg16)'
        elif not any(k.startswith('features.') for k in state_dict):
            hint = f' (it has no features.* keys; first keys: {", ".join(list(state_dict)[:5])})'
        raise PretrainedWeightsError(
            f"{source}: missing key '{key}' (layer {layer}) of torchvision's vgg16{hint}")
    value = np.asarray(state_dict[key])
    if value.shape != shape:
        raise PretrainedWeightsError(
            f"{source}: key '{key}' (layer {layer}) has shape {value.shape}, expected {shape}")
    if not np.issubdtype(value.dtype, np.floating):
        raise PretrainedWeightsError(
            f"{source}: key '{key}' (layer {layer}) has dtype {value.dtype}, expected floating")
    if not np.isfinite(value).all():
        raise PretrainedWeightsError(f"{source}: key '{key}' (layer {layer}) has NaN or inf values")
    return value.astype(np.float32)


def vgg16_trunk_params(state_dict: Mapping[str, Any], source: str = 'state_dict') -> dict:
    """torchvision vgg16 state_dict -> params of `VGG16(width=1.0)` (conv layers only), float32.

    Kernels become [kh, kw, in, out] (torch's [out, in, kh, kw] transposed); biases are unchanged.

    Args:
        state_dict: key -> array, as `load_state_dict` returns it.
        source: what to name in error messages (the file).

    Raises:
        PretrainedWeightsError: a key is missing or has the wrong shape or values.
    """
    params = {}
    for prefix, (layer, weight_shape, bias_shape) in _expected_shapes().items():
        weight = _checked(state_dict, f'{prefix}.weight', layer, weight_shape, source)
        bias = _checked(state_dict, f'{prefix}.bias', layer, bias_shape, source)
        params[layer] = {'kernel': np.ascontiguousarray(weight.transpose(2, 3, 1, 0)), 'bias': bias}
    return params


def load_pretrained_trunk(path: str | os.PathLike, trunk_params: Mapping[str, Any]) -> dict:
    """Returns `trunk_params` with its 13 conv layers replaced by the weights in `path`.

    Other entries (e.g. the 'embedding' Dense) are kept as initialised. The trunk must have
    width 1 (ImageNet's channel counts).

    Args:
        path: `.pth`/`.pt` or `.npz` file in torchvision's vgg16 state_dict layout.
        trunk_params: params of an initialised `VGG16` (the 'trunk' entry of a FeatureNet).

    Raises:
        PretrainedWeightsError: bad file, or a layer whose shape differs from the file's.
    """
    pretrained = vgg16_trunk_params(load_state_dict(path), source=str(path))
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


def save_npz(state_dict: Mapping[str, Any], path: str | os.PathLike) -> None:
    """Writes the trunk's keys (`features.*` of the 13 convs) of `state_dict` to `path` (.npz).

    The keys are checked first; `classifier.*` is left out (ImageNet's classifier is about 90%
    of the file and pathjax never uses it). Written atomically.
    """
    vgg16_trunk_params(state_dict, source=f'state_dict to write to {path}')  # validates first
    keys = [f'{prefix}.{kind}' for prefix in _expected_shapes() for kind in ('weight', 'bias')]
    artifacts.save_npz(path, **{key: np.asarray(state_dict[key]) for key in keys})


def save_vit_npz(state_dict: Mapping[str, Any], preset_name: str, path) -> None:
    """Writes a ViT preset's timm state_dict to `path` (.npz), after the strict check of
    `vit_weights.convert` (every key used, every shape right)."""
    from pathjax.models import vit_presets, vit_weights  # pylint: disable=import-outside-toplevel
    preset = vit_presets.get_preset(preset_name)
    vit_weights.convert(preset, dict(state_dict), f'state_dict to write to {path}')
    artifacts.save_npz(path, **{key: np.asarray(value) for key, value in state_dict.items()})


def main(argv: list[str]) -> int:
    """python -m pathjax.models.pretrained input output.npz [vit_preset]; exit status 1 for a
    bad input. Without a preset the input is torchvision's vgg16, with one a timm ViT."""
    if len(argv) not in (3, 4):
        raise app.UsageError('usage: python -m pathjax.models.pretrained input.(pth|bin|'
                             'safetensors) output.npz [vit_preset]')
    source, target = argv[1:3]
    try:
        if len(argv) == 4:
            save_vit_npz(load_state_dict(source), argv[3], target)
        else:
            save_npz(load_state_dict(source), target)
    except (PretrainedWeightsError, ImportError, ValueError) as error:
        logging.error('%s', error)
        return 1
    logging.info('Wrote the weights of %s to %s', source, target)
    return 0


if __name__ == '__main__':
    app.run(main)
