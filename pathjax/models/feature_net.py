"""The feature network of the first learning stage: VGG-16 trunk + AM-softmax head."""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from pathjax.models.am_softmax import AMSoftmaxHead
from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.vgg import VGG16


class FeatureNet(nn.Module):
    """images [B, H, W, 3] in [0, 255] -> (features [B, D], cosines [B, C])."""

    num_classes: int
    width: float = 1.0
    embed_dim: int = 0
    dtype: Any = jnp.float32

    def setup(self):
        self.trunk = VGG16(width=self.width, embed_dim=self.embed_dim, dtype=self.dtype)
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
                      embed_dim=config.feature_net.embed_dim, dtype=compute_dtype(config))
