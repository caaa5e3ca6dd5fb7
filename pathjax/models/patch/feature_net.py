"""The feature network of the first learning stage: a trunk (`feature_net.backbone`: the
method's VGG-16, or a ViT preset of `vit_presets`) and the AM-softmax head.

The input's normalization (mean and std of RGB in [0, 1]) is the backbone's: VGG-16's is
ImageNet's (fixed: torchvision's weights), a ViT preset's is the preset's unless
`feature_net.mean` / `feature_net.std` give another (the one its weights were trained with;
`normalization`, checked by `normalization_problem`).
"""

import math
import numbers
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pathjax.models.patch.am_softmax import AMSoftmaxHead
from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.patch.encoders import normalize
from pathjax.models.patch.vgg import IMAGENET_MEAN as VGG16_MEAN, IMAGENET_STD as VGG16_STD, VGG16
from pathjax.models.patch.vit import VisionTransformer
from pathjax.models.patch.vit_presets import PRESETS, get_preset

VGG16_BACKBONE = 'vgg16'
VGG16_PATCH_SIZE, VGG16_MPP = 512, 0.5  # the method's patches


def backbones() -> tuple[str, ...]:
    return (VGG16_BACKBONE, *PRESETS)


Normalization = tuple[float, float, float] | None  # RGB in [0, 1]; None: the backbone's


class ViTTrunk(nn.Module):
    """uint8 RGB [B, S, S, 3] -> the preset's features [B, D], the normalization inside (`mean`,
    `std`; None: the preset's)."""

    preset_name: str
    dtype: Any = jnp.float32
    mean: Normalization = None
    std: Normalization = None

    @nn.compact
    def __call__(self, images):
        preset = get_preset(self.preset_name)
        mean = preset.mean if self.mean is None else self.mean
        std = preset.std if self.std is None else self.std
        return VisionTransformer(preset.arch, dtype=self.dtype, name='vit')(
            normalize(images, mean, std))


class FeatureNet(nn.Module):
    """images [B, H, W, 3] in [0, 255] -> (features [B, D], cosines [B, C]). `mean` and `std`:
    a ViT preset's input normalization (None: the preset's); VGG-16 takes only its own."""

    num_classes: int
    width: float = 1.0
    embed_dim: int = 0
    dtype: Any = jnp.float32
    backbone: str = VGG16_BACKBONE
    mean: Normalization = None
    std: Normalization = None

    def setup(self):
        if self.backbone == VGG16_BACKBONE:
            for given, fixed in ((self.mean, VGG16_MEAN), (self.std, VGG16_STD)):
                if given is not None and tuple(given) != tuple(fixed):
                    raise ValueError(f'VGG-16 normalizes with ImageNet\'s mean {VGG16_MEAN} and '
                                     f'std {VGG16_STD} only, not {self.mean}, {self.std}')
            self.trunk = VGG16(width=self.width, embed_dim=self.embed_dim, dtype=self.dtype)
        else:
            self.trunk = ViTTrunk(self.backbone, dtype=self.dtype, mean=self.mean, std=self.std)
        self.head = AMSoftmaxHead(self.num_classes)

    def __call__(self, images):
        features = self.trunk(images)
        return features, self.head(features)

    def features(self, images):
        """The extractor alone (no head): [B, H, W, 3] -> [B, D]."""
        return self.trunk(images)


def create_feature_net(config) -> FeatureNet:
    """The feature network described by `config.feature_net`, `config.data` and `config.dtype`
    (with a ViT preset, its normalization: `normalization(config)`)."""
    net = config.feature_net
    mean, std = normalization(config)  # checks feature_net.mean/std
    if net.backbone == VGG16_BACKBONE:
        mean = std = None  # VGG-16's own
    return FeatureNet(num_classes=len(config.data.classes), width=net.width,
                      embed_dim=net.embed_dim, dtype=compute_dtype(config),
                      backbone=net.backbone, mean=mean, std=std)


def _override(config) -> tuple[tuple, tuple]:
    """(feature_net.mean, feature_net.std) as given; () where unset (or absent)."""
    def values(field):
        value = config.feature_net.get(field, None)
        if value is None:
            return ()
        return tuple(value) if isinstance(value, (tuple, list)) else (value,)
    return values('mean'), values('std')


def normalization_problem(config) -> str:
    """What is wrong with `feature_net.mean` / `feature_net.std` ('' when nothing): both empty
    (the backbone's), or, with a ViT preset, both 3 finite numbers (RGB, for x in [0, 1]) with
    the mean in [0, 1] and the std > 0. VGG-16 takes them empty only (ImageNet's normalization
    is part of torchvision's weights)."""
    mean, std = _override(config)
    if not mean and not std:
        return ''
    if config.feature_net.backbone == VGG16_BACKBONE:
        return (f'feature_net.mean/std ({mean}, {std}) are for ViT presets; VGG-16 normalizes '
                f'with ImageNet\'s mean {VGG16_MEAN} and std {VGG16_STD}: leave them empty ()')
    for field, values in (('mean', mean), ('std', std)):
        if len(values) != 3:
            return (f'feature_net.{field} must be 3 numbers (RGB, for x in [0, 1]) or empty (the '
                    f'preset\'s), got {values} (both set, or both empty)')
        if not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in values):
            return f'feature_net.{field} must be numbers, got {values}'
        if not all(math.isfinite(v) for v in values):
            return f'feature_net.{field} must be finite, got {values}'
    if not all(0.0 <= v <= 1.0 for v in mean):
        return f'feature_net.mean must lie in [0, 1] (RGB in [0, 1]), got {mean}'
    if not all(v > 0.0 for v in std):
        return f'feature_net.std must be > 0, got {std}'
    return ''


def normalization(config) -> tuple[tuple[float, float, float], tuple[float, float, float]]:
    """(mean, std) of the feature network's input (RGB in [0, 1]): `feature_net.mean` and
    `feature_net.std` when given, else the backbone's (VGG-16: ImageNet's; a ViT preset: its
    `mean` and `std`). Raises ValueError for values `normalization_problem` refuses, or an
    unknown backbone."""
    problem = normalization_problem(config)
    if problem:
        raise ValueError(problem)
    backbone = config.feature_net.backbone
    if backbone == VGG16_BACKBONE:
        return tuple(VGG16_MEAN), tuple(VGG16_STD)
    preset = get_preset(backbone)
    mean, std = _override(config)
    if mean:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return tuple(preset.mean), tuple(preset.std)



def resolve_tile_defaults(config) -> None:
    """tile.patch_size and tile.mpp given as 0 become the backbone's: the method's 512 px at
    0.5 um/px for VGG-16, a ViT preset's input size and microns per pixel (an unknown backbone
    is left to the config check)."""
    preset = PRESETS.get(config.feature_net.backbone)
    if config.tile.patch_size == 0:
        config.tile.patch_size = preset.input_size if preset else VGG16_PATCH_SIZE
    if config.tile.mpp == 0:
        config.tile.mpp = preset.mpp if preset else VGG16_MPP
