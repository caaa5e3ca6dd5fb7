"""A Vision Transformer in timm's layout (`timm.models.vision_transformer.VisionTransformer`), the
architecture of the pathology foundation models, for patch feature extraction.

Covered: patch size 14 or 16 (a strided convolution); a class token; register tokens;
absolute position embeddings over the patch grid, with the prefix tokens (`no_embed_class`
False: timm's original layout) or without them (True: DINOv2, DeiT-3); pre-norm blocks
(LayerNorm eps 1e-6, multi-head attention with one packed qkv projection, bias on or off,
LayerScale, and a GELU MLP or timm's packed SwiGLU, `SwiGLUPacked`: silu(first half) x second
half); a final LayerNorm. Output recipes: 'class' (the class token), 'class+mean' (class token
and the mean of the patch tokens, concatenated: Virchow2), 'mean' (mean of the patch tokens),
all taken after the final norm. Inputs are float images already normalized [B, H, W, 3], H and
W multiples of the patch size; position embeddings trained for another grid are resampled when
loaded (`resample_pos_embed`). Parameters and the residual stream are float32; `dtype` is the
compute dtype of the attention and MLP (bfloat16 on GPU and TPU); softmaxes and norms run in
float32.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from pathjax.models.slide.attention import fused_kernel_fits

OUTPUTS = ('class', 'class+mean', 'mean')
MLPS = ('gelu', 'swiglu_packed')
LAYER_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class ViTArchitecture:
    """The shape of a timm ViT. `img_size` is the input side its position embeddings are for."""

    patch_size: int
    embed_dim: int
    depth: int
    num_heads: int
    mlp_ratio: float = 4.0
    mlp: str = 'gelu'  # 'gelu' or 'swiglu_packed'
    qkv_bias: bool = True
    class_token: bool = True
    reg_tokens: int = 0
    no_embed_class: bool = False
    layer_scale: bool = False  # LayerScale (timm's init_values not None)
    img_size: int = 224
    output: str = 'class'

    def __post_init__(self):
        if self.mlp not in MLPS or self.output not in OUTPUTS:
            raise ValueError(f'mlp must be one of {MLPS} and output one of {OUTPUTS}: {self}')
        if self.embed_dim % self.num_heads:
            raise ValueError(f'embed_dim {self.embed_dim} is not divisible by {self.num_heads} '
                             'heads')
        if 'class' in self.output and not self.class_token:
            raise ValueError(f"output {self.output!r} needs a class token")

    @property
    def grid(self) -> int:
        """Side of the patch grid the position embeddings are for."""
        return self.img_size // self.patch_size

    @property
    def prefix_tokens(self) -> int:
        return int(self.class_token) + self.reg_tokens

    @property
    def mlp_hidden(self) -> int:
        """fc1's output size (timm: int(embed_dim * mlp_ratio); SwiGLUPacked halves it after)."""
        return int(self.embed_dim * self.mlp_ratio)

    @property
    def feature_dim(self) -> int:
        return 2 * self.embed_dim if self.output == 'class+mean' else self.embed_dim


CUDNN_TOKEN_MULTIPLE = 64  # cuDNN's flash attention wants sequence lengths in multiples of 64


def padded_attention(query, key, value, implementation: str = 'cudnn'):
    """`jax.nn.dot_product_attention` [B, N, H, d] x 3 -> [B, N, H, d] on tokens padded to a
    multiple of CUDNN_TOKEN_MULTIPLE (cuDNN refuses a ViT's 197 or 261 tokens as they are); the
    padding is masked as keys through the sequence lengths and cut from the output."""
    batch, tokens = query.shape[:2]
    padded = -(-tokens // CUDNN_TOKEN_MULTIPLE) * CUDNN_TOKEN_MULTIPLE
    pad = [(0, 0), (0, padded - tokens), (0, 0), (0, 0)]
    lengths = jnp.full((batch,), tokens, jnp.int32)
    out = jax.nn.dot_product_attention(
        *(jnp.pad(x, pad) for x in (query, key, value)), query_seq_lengths=lengths,
        key_value_seq_lengths=lengths, implementation=implementation)
    return out[:, :tokens]


def heads_first_attention(query, key, value):
    """Softmax attention [B, N, H, d] x 3 -> [B, N, H, d] as batched matrix products over
    [B, H] with the heads moved first, logits and softmax in float32. On CPU this layout lets
    XLA hand both products to its matrix library as they are: `jax.nn.dot_product_attention`'s
    einsums over [B, N, H, d] ran ViT-S/16 at batch 64 25% slower (BENCHMARKS.md)."""
    query, key, value = (jnp.swapaxes(x, 1, 2) for x in (query, key, value))  # [B, H, N, d]
    scaled = query * jnp.asarray(query.shape[-1] ** -0.5, query.dtype)
    logits = jnp.matmul(scaled, jnp.swapaxes(key, -1, -2), preferred_element_type=jnp.float32)
    weights = jax.nn.softmax(logits, axis=-1).astype(value.dtype)  # [B, H, N, N]
    return jnp.swapaxes(jnp.matmul(weights, value), 1, 2)


def attention(query, key, value):
    """Softmax attention [B, N, H, d] x 3 -> [B, N, H, d]: cuDNN's fused kernel on a GPU in
    16-bit, else `heads_first_attention` (logits and softmax in float32 either way)."""
    if fused_kernel_fits(query.dtype):
        try:
            return padded_attention(query, key, value)
        except (NotImplementedError, RuntimeError, TypeError, ValueError) as refusal:
            logging.log_first_n(logging.WARNING, 'cuDNN attention unavailable (%s: %s); using '
                                'XLA attention', 1, type(refusal).__name__, refusal)
    return heads_first_attention(query, key, value)


class Attention(nn.Module):
    """[B, N, D] -> [B, N, D]; `qkv` packs (3, heads, head_dim) on its output axis, as timm's."""

    num_heads: int
    qkv_bias: bool
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        batch, tokens, dim = x.shape
        qkv = nn.Dense(3 * dim, use_bias=self.qkv_bias, dtype=self.dtype, name='qkv')(x)
        query, key, value = jnp.moveaxis(
            qkv.reshape(batch, tokens, 3, self.num_heads, dim // self.num_heads), 2, 0)
        attended = attention(query, key, value).reshape(batch, tokens, dim)
        return nn.Dense(dim, dtype=self.dtype, name='proj')(attended)


class Mlp(nn.Module):
    """GELU (exact erf, torch's default) or packed SwiGLU: [B, N, D] -> [B, N, D]."""

    hidden: int
    kind: str
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        h = nn.Dense(self.hidden, dtype=self.dtype, name='fc1')(x)
        if self.kind == 'gelu':
            h = nn.gelu(h, approximate=False)
        else:
            gate, value = jnp.split(h, 2, axis=-1)
            h = nn.silu(gate) * value
        return nn.Dense(x.shape[-1], dtype=self.dtype, name='fc2')(h)


class LayerScale(nn.Module):
    @nn.compact
    def __call__(self, x):
        gamma = self.param('gamma', nn.initializers.constant(1e-5), (x.shape[-1],))
        return x * gamma.astype(x.dtype)


def layer_norm(name: str):
    return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=jnp.float32, name=name)


class Block(nn.Module):
    """Pre-norm block on the float32 residual stream [B, N, D]; attention and MLP in `dtype`."""

    arch: ViTArchitecture
    dtype: jnp.dtype

    @nn.compact
    def __call__(self, x):
        arch = self.arch

        def scale(y, name):
            return LayerScale(name=name)(y) if arch.layer_scale else y

        y = layer_norm('norm1')(x).astype(self.dtype)
        x = x + scale(Attention(arch.num_heads, arch.qkv_bias, self.dtype, name='attn')(y), 'ls1')
        y = layer_norm('norm2')(x).astype(self.dtype)
        return x + scale(Mlp(arch.mlp_hidden, arch.mlp, self.dtype, name='mlp')(y), 'ls2')


class VisionTransformer(nn.Module):
    """Normalized images [B, H, W, 3] -> features [B, arch.feature_dim] (float32)."""

    arch: ViTArchitecture
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, images):
        arch = self.arch
        p = arch.patch_size
        if images.shape[1] % p or images.shape[2] % p:
            raise ValueError(f'image size {images.shape[1:3]} is not a multiple of the patch '
                             f'size {p}')
        x = nn.Conv(arch.embed_dim, (p, p), strides=(p, p), padding='VALID', dtype=self.dtype,
                    name='patch_embed')(images.astype(self.dtype))
        batch, rows, cols, dim = x.shape
        x = x.reshape(batch, rows * cols, dim).astype(jnp.float32)  # row-major, as timm's
        if (rows, cols) != (arch.grid, arch.grid):
            raise ValueError(f'a {rows}x{cols} patch grid, but the position embeddings are for '
                             f'{arch.grid}x{arch.grid}: resample them (resample_pos_embed)')
        init = nn.initializers.normal(0.02)
        embed_len = rows * cols + (0 if arch.no_embed_class else arch.prefix_tokens)
        pos_embed = self.param('pos_embed', init, (1, embed_len, dim))
        prefix = []
        if arch.class_token:
            prefix.append(self.param('cls_token', init, (1, 1, dim)))
        if arch.reg_tokens:
            prefix.append(self.param('reg_token', init, (1, arch.reg_tokens, dim)))
        prefix = [jnp.broadcast_to(t, (batch, t.shape[1], dim)) for t in prefix]
        if arch.no_embed_class:
            x = jnp.concatenate([*prefix, x + pos_embed], axis=1)
        else:
            x = jnp.concatenate([*prefix, x], axis=1) + pos_embed
        for i in range(arch.depth):
            x = Block(arch, self.dtype, name=f'blocks_{i}')(x)
        x = layer_norm('norm')(x)  # float32
        patches = x[:, arch.prefix_tokens:].mean(axis=1)
        if arch.output == 'class':
            return x[:, 0]
        if arch.output == 'mean':
            return patches
        return jnp.concatenate([x[:, 0], patches], axis=-1)


# Position embeddings ------------------------------------------------------------------------------


def _cubic(x: np.ndarray, a: float = -0.5) -> np.ndarray:
    """Keys' cubic convolution kernel (a = -0.5, as PIL's and torch's antialiased bicubic)."""
    x = np.abs(x)
    return np.where(x < 1, ((a + 2) * x - (a + 3)) * x * x + 1,
                    np.where(x < 2, (((x - 5) * x + 8) * x - 4) * a, 0.0))


def _resample_matrix(old: int, new: int) -> np.ndarray:
    """[new, old] weights of torch's `interpolate(mode='bicubic', antialias=True)` along one axis
    (PIL's separable filter: support widened by the downscale factor, weights normalized, taps
    past the edges dropped)."""
    scale = old / new
    support = 2.0 * max(scale, 1.0)
    inverse = 1.0 / max(scale, 1.0)
    weights = np.zeros((new, old))
    for i in range(new):
        centre = scale * (i + 0.5)
        low = max(int(centre - support + 0.5), 0)
        high = min(int(centre + support + 0.5), old)
        taps = _cubic((np.arange(low, high) - centre + 0.5) * inverse)
        weights[i, low:high] = taps / taps.sum()
    return weights


def resample_pos_embed(pos_embed: np.ndarray, new_grid: tuple[int, int], prefix_tokens: int
                       ) -> np.ndarray:
    """timm's `resample_abs_pos_embed` (bicubic, antialiased) in numpy: position embeddings
    [1, prefix + gh * gw, D] of a square grid -> [1, prefix + new_grid[0] * new_grid[1], D]; the
    `prefix_tokens` leading entries (class, registers) are kept as they are."""
    prefix, grid = pos_embed[:, :prefix_tokens], pos_embed[:, prefix_tokens:]
    side = math.isqrt(grid.shape[1])
    if side * side != grid.shape[1]:
        raise ValueError(f'{grid.shape[1]} position embeddings are not a square grid')
    if (side, side) == tuple(new_grid):
        return pos_embed
    grid = grid.reshape(side, side, -1).astype(np.float64)
    rows, cols = (_resample_matrix(side, n) for n in new_grid)
    resampled = np.einsum('ih,jw,hwd->ijd', rows, cols, grid)
    return np.concatenate([prefix, resampled.reshape(1, -1, grid.shape[-1]).astype(
        pos_embed.dtype)], axis=1)
