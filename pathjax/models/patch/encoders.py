"""Patch encoders from named presets and local weight files: the public entry point.

  encoder = load_encoder('vit_large_patch16_224', 'uni.safetensors')
  features = encoder(images)  # uint8 [B, 224, 224, 3] -> float32 [B, 1024]

The call normalizes with the preset's mean and std (or the `mean` and `std` given: the
normalization the weights were trained with, where it is not the preset's; see `vit_presets`),
runs the ViT (compiled once per batch shape) and applies the preset's output recipe. `identity`
names the encoder, its weights (a hash of the file) and its normalization, so features made by
another encoder are recognised.
"""

import dataclasses
import hashlib
import os
import pathlib
from typing import Any

import jax
import jax.numpy as jnp

from pathjax.models.patch.vit import VisionTransformer
from pathjax.models.patch.vit_presets import ViTPreset, get_preset
from pathjax.models.patch.vit_weights import load_params


def file_digest(path: str | os.PathLike, chunk: int = 1 << 24) -> str:
    """sha256 of a file's bytes (first 16 hex digits)."""
    digest = hashlib.sha256()
    with open(path, 'rb') as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()[:16]


def normalize(images: jax.Array, mean, std) -> jax.Array:
    """uint8 (or float in [0, 255]) RGB [B, H, W, 3] -> float32 (x / 255 - mean) / std."""
    return (images.astype(jnp.float32) / 255.0 - jnp.asarray(mean)) / jnp.asarray(std)


def normalization_label(mean, std) -> str:
    """'mean (a, b, c) std (d, e, f)': the normalization, for identities."""
    return (f'mean ({", ".join(f"{v:g}" for v in mean)}) '
            f'std ({", ".join(f"{v:g}" for v in std)})')


@dataclasses.dataclass
class Encoder:
    """A loaded encoder: `encoder(images)` maps uint8 RGB [B, S, S, 3] (S: the preset's input
    size) to float32 features [B, D]. `mean` and `std` (RGB in [0, 1]) are the input's
    normalization; None: the preset's."""

    preset: ViTPreset
    params: Any
    identity: str
    dtype: Any = jnp.float32
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None

    def __post_init__(self):
        self.mean = tuple(float(v) for v in (self.preset.mean if self.mean is None else self.mean))
        self.std = tuple(float(v) for v in (self.preset.std if self.std is None else self.std))
        if len(self.mean) != 3 or len(self.std) != 3:
            raise ValueError(f'mean and std take 3 values (RGB), got {self.mean} and {self.std}')
        model = VisionTransformer(self.preset.arch, dtype=self.dtype)
        mean, std = self.mean, self.std
        self._apply = jax.jit(lambda params, images: model.apply(
            {'params': params}, normalize(images, mean, std)))

    @property
    def feature_dim(self) -> int:
        return self.preset.arch.feature_dim

    def __call__(self, images) -> jax.Array:
        size = self.preset.input_size
        if tuple(images.shape[1:]) != (size, size, 3):
            raise ValueError(f'{self.preset.name} takes [B, {size}, {size}, 3] images, got '
                             f'{tuple(images.shape)}')
        return self._apply(self.params, jnp.asarray(images))


def load_encoder(name: str, weights: str | os.PathLike | None, dtype=jnp.float32, *,
                 mean: tuple[float, float, float] | None = None,
                 std: tuple[float, float, float] | None = None) -> Encoder:
    """The encoder of preset `name` with the weights of a local timm state_dict file
    (.safetensors, .pth/.bin read with weights_only=True, or .npz); `weights` None gives
    random weights (tests). `mean` and `std` (RGB in [0, 1]): the normalization the weights
    were trained with where it is not the preset's (None: the preset's)."""
    preset = get_preset(name)
    mean = tuple(preset.mean if mean is None else mean)
    std = tuple(preset.std if std is None else std)
    norm = normalization_label(mean, std)
    if weights is None:
        model = VisionTransformer(preset.arch)
        size = preset.input_size
        params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, size, size, 3)))['params']
        return Encoder(preset, params, f'{name}:random:{norm}', dtype, mean, std)
    path = pathlib.Path(weights)
    params = jax.tree.map(jnp.asarray, load_params(preset, path))
    return Encoder(preset, params, f'{name}:{path.name}:{file_digest(path)}:{norm}', dtype,
                   mean, std)
