"""VGG-16 (torchvision layout) as a patch feature extractor: conv trunk, global average pooling,
optional linear embedding.

The trunk is torchvision's `vgg16().features`: 13 3x3 convolutions with ReLU in five blocks
(64, 64 | 128, 128 | 256 x 3 | 512 x 3 | 512 x 3 channels), each block ending in a 2x2 max-pool;
`width` scales every channel count (CPU configs). Inputs are RGB in [0, 255] (uint8 or float),
normalized inside the model with ImageNet's mean and std, as torchvision's weights expect.
Parameters are float32; `dtype` is the compute dtype. Convolutions are initialized as
torchvision's VGG is (Kaiming normal, fan_out, ReLU gain; zero bias): VGG-16 has no
normalization layers, and trained from scratch under Flax's default LeCun init it stays at the
majority class (DESIGN.md, known pitfalls).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

BLOCKS = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# torchvision's kaiming_normal_(mode='fan_out', nonlinearity='relu'): std = sqrt(2 / (9 * C_out)).
CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def conv_names() -> list[str]:
    """conv1_1 ... conv5_3, in trunk order."""
    return [f'conv{b + 1}_{i + 1}' for b, block in enumerate(BLOCKS) for i in range(len(block))]


def scaled(channels: int, width: float) -> int:
    return max(1, int(round(channels * width)))


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max-pool, stride 2, VALID: [B, H, W, C] -> [B, H // 2, W // 2, C].

    Same values and gradients as `nn.max_pool(x, (2, 2), strides=(2, 2))` (the gradient goes to
    the first maximum of each window in row-major order, as XLA's select-and-scatter does), but
    written as element-wise maxima and selects over a reshape: on CPU XLA lowers the
    reduce-window gradient to an index-carrying reduce-window and a scatter, about 9x slower
    (2-3% of a VGG-16 train step). Reverse mode only (no `jax.jvp` through it).
    """
    return _max_pool_forward(x)[0]


def _windows(x: jax.Array) -> list[jax.Array]:
    """The four [B, H // 2, W // 2, C] corners of the 2x2 windows, in row-major window order."""
    b, h, w, c = x.shape
    x = x[:, :h // 2 * 2, :w // 2 * 2].reshape(b, h // 2, 2, w // 2, 2, c)
    return [x[:, :, i, :, j] for i in (0, 1) for j in (0, 1)]


def _max_pool_forward(x):
    top_left, top_right, bottom_left, bottom_right = _windows(x)
    pooled = jnp.maximum(jnp.maximum(top_left, top_right), jnp.maximum(bottom_left, bottom_right))
    return pooled, (x, pooled)


def _max_pool_backward(residuals, grad):
    x, pooled = residuals
    taken = jnp.zeros(pooled.shape, bool)
    grads = []
    for corner in _windows(x)[:3]:
        chosen = (corner == pooled) & ~taken
        grads.append(jnp.where(chosen, grad, 0))
        taken |= chosen
    grads.append(jnp.where(taken, 0, grad))  # the last corner: the maximum when no other is
    b, h, w, c = x.shape
    windows = jnp.stack(grads, axis=3).reshape(b, h // 2, w // 2, 2, 2, c)
    dx = windows.transpose(0, 1, 3, 2, 4, 5).reshape(b, h // 2 * 2, w // 2 * 2, c)
    return (jnp.pad(dx, ((0, 0), (0, h % 2), (0, w % 2), (0, 0))),)


max_pool_2x2.defvjp(_max_pool_forward, _max_pool_backward)


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
                            param_dtype=jnp.float32, kernel_init=CONV_INIT,
                            name=next(names))(x)
                x = nn.relu(x)
            x = max_pool_2x2(x)
        features = x.astype(jnp.float32).mean(axis=(1, 2))  # [B, C]
        if self.embed_dim:
            features = nn.Dense(self.embed_dim, dtype=jnp.float32, name='embedding')(features)
        return features
