"""VGG-16 (torchvision layout) as a patch feature extractor: conv trunk, global average pooling,
optional linear embedding.

The trunk is torchvision's `vgg16().features`: 13 3x3 convolutions with ReLU in five blocks
(64, 64 | 128, 128 | 256 x 3 | 512 x 3 | 512 x 3 channels), each block ending in a 2x2 max-pool;
`width` scales every channel count (CPU configs). Inputs are RGB in [0, 255] (uint8 or float),
normalized inside the model with ImageNet's mean and std, as torchvision's weights expect.
Parameters are float32; `dtype` is the compute dtype.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def conv_names() -> list[str]:
    """conv1_1 ... conv5_3, in trunk order."""
    return [f'conv{b + 1}_{i + 1}' for b, block in enumerate(BLOCKS) for i in range(len(block))]


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


class VGG16(nn.Module):
    """images [B, H, W, 3] in [0, 255] -> features [B, D] (float32).

    D is the last block's channel count (512 * width), or `embed_dim` when it is > 0.
    """

    width: float = 1.0
    embed_dim: int = 0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, images):
        x = (images.astype(jnp.float32) / 255.0 - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        x = x.astype(self.dtype)
        names = iter(conv_names())
        for block in BLOCKS:
            for channels in block:
                x = nn.Conv(scaled(channels, self.width), (3, 3), padding=1, dtype=self.dtype,
                            param_dtype=jnp.float32, name=next(names))(x)
                x = nn.relu(x)
            x = nn.max_pool(x, (2, 2), strides=(2, 2))
        features = x.astype(jnp.float32).mean(axis=(1, 2))  # [B, C]
        if self.embed_dim:
            features = nn.Dense(self.embed_dim, dtype=jnp.float32, name='embedding')(features)
        return features
