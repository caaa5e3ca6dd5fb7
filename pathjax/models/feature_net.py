"""The feature network of the first learning stage: a trunk (`feature_net.backbone`: the
method's VGG-16, or a ViT preset of `vit_presets`) and the AM-softmax head."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pathjax.models.am_softmax import AMSoftmaxHead
from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.encoders import normalize
from pathjax.models.vgg import VGG16
from pathjax.models.vit import VisionTransformer
from pathjax.models.vit_presets import PRESETS, get_preset

VGG16_BACKBONE = 'vgg16'
VGG16_PATCH_SIZE, VGG16_MPP = 512, 0.5  # the method's patches


def backbones() -> tuple[str, ...]:
    return (VGG16_BACKBONE, *PRESETS)


class ViTTrunk(nn.Module):
    """uint8 RGB [B, S, S, 3] -> the preset's features [B, D], its normalization inside."""

    preset_name: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        preset = get_preset(self.preset_name)
        return VisionTransformer(preset.arch, dtype=self.dtype, name='vit')(
            normalize(images, preset.mean, preset.std))


class FeatureNet(nn.Module):
    """images [B, H, W, 3] in [0, 255] -> (features [B, D], cosines [B, C])."""

    num_classes: int
    width: float = 1.0
    embed_dim: int = 0
    dtype: Any = jnp.float32
    backbone: str = VGG16_BACKBONE

    def setup(self):
        if self.backbone == VGG16_BACKBONE:
            self.trunk = VGG16(width=self.width, embed_dim=self.embed_dim, dtype=self.dtype)
        else:
            self.trunk = ViTTrunk(self.backbone, dtype=self.dtype)
        self.head = AMSoftmaxHead(self.num_classes)

    def __call__(self, images):
        features = self.trunk(images)
        return features, self.head(features)

    def features(self, images):
        """The extractor alone (no head): [B, H, W, 3] -> [B, D]."""
        return self.trunk(images)


def create_feature_net(config) -> FeatureNet:
    """The feature network described by `config.feature_net`, `config.data` and `config.dtype`."""
    return FeatureNet(num_classes=len(config.data.classes), width=config.feature_net.width,
                      embed_dim=config.feature_net.embed_dim, dtype=compute_dtype(config),
                      backbone=config.feature_net.backbone)



def resolve_tile_defaults(config) -> None:
    """tile.patch_size and tile.mpp given as 0 become the backbone's: the method's 512 px at
    0.5 um/px for VGG-16, a ViT preset's input size and microns per pixel (an unknown backbone
    is left to the config check)."""
    preset = PRESETS.get(config.feature_net.backbone)
    if config.tile.patch_size == 0:
        config.tile.patch_size = preset.input_size if preset else VGG16_PATCH_SIZE
    if config.tile.mpp == 0:
        config.tile.mpp = preset.mpp if preset else VGG16_MPP
