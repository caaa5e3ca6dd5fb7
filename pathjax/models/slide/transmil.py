"""TransMIL (Shao et al., "TransMIL: Transformer based Correlated Multiple Instance Learning for
Whole Slide Image Classification", NeurIPS 2021) for one padded slide graph.

Reproduces the authors' code, github.com/szc19990412/TransMIL models/TransMIL.py (commit
9d6aee57c7c72375fb9132dc58cd8c9b0f0a949c), and the Nystrom attention it imports,
github.com/lucidrains/nystrom-attention nystrom_attention/nystrom_attention.py (commit
fbe9ebad6bae24143d7930d6c2b82d6a12d68f76): fc1 + ReLU; the n tokens squared to H * H, H =
ceil(sqrt(n)), by repeating the first ones; a class token in front; TransLayer (x + Nystrom
attention of LayerNorm(x)); PPEG (7x7, 5x5, 3x3 depthwise convolutions on the H x H grid, plus the
identity); TransLayer; LayerNorm; fc2 on the class token.

n is dynamic inside static shapes. Nystrom attention pads its T = H * H + 1 tokens at the front
with p zeros to P = m * l, l = ceil(T / m) (m landmarks, each the mean of a segment of l
positions). The whole model keeps the sequence in that layout: a buffer of static length (P for
n = N) whose positions [p, P) hold the class token then the squared patch tokens; everything else
is zero at each attention's input and never read. PPEG gathers the H x H grid into the top-left
corner of a static ceil(sqrt(N))^2 grid of zeros, where zero-padded convolutions give the same
values. Memory is O(N m): no N x N array.

The depthwise convolutions (PPEG's and the attention's residual) have nn.Conv's parameter names
and shapes but their own gradient: XLA on CPU lowers the kernel gradient of a grouped convolution
as a dense one (D times the work, gigabytes at 8,192 nodes); here it is one fused
multiply-reduce per kernel tap.
"""

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

HIGHEST = jax.lax.Precision.HIGHEST


def moore_penrose_pinv(x: jax.Array, iterations: int) -> jax.Array:
    """Iterative pseudo-inverse of x [h, m, m] in float32, as nystrom-attention: z0 = x^T / (max
    column sum * max row sum of |x|, maxima over all heads), then Newton-Schulz-like steps."""
    x = x.astype(jnp.float32)
    z = jnp.swapaxes(x, -1, -2) / (jnp.abs(x).sum(-1).max() * jnp.abs(x).sum(-2).max())
    eye = jnp.eye(x.shape[-1], dtype=jnp.float32)
    for _ in range(iterations):
        xz = jnp.matmul(x, z, precision=HIGHEST)
        inner = 15 * eye - jnp.matmul(xz, 7 * eye - xz, precision=HIGHEST)
        z = jnp.matmul(0.25 * z, 13 * eye - jnp.matmul(xz, inner, precision=HIGHEST),
                       precision=HIGHEST)
    return z


def _pad(x: jax.Array, kernel: jax.Array) -> jax.Array:
    ka, kb = kernel.shape[:2]
    return jnp.pad(x, ((ka // 2, ka // 2), (kb // 2, kb // 2), (0, 0)))


def _correlate(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """Depthwise cross-correlation, zero padding to the same size: x [A, B, C], kernel
    [ka, kb, 1, C] (odd sizes) -> [A, B, C], as a sum of shifted copies (one fused loop)."""
    padded, (rows, cols) = _pad(x, kernel), x.shape[:2]
    out = jnp.zeros_like(x)
    for i in range(kernel.shape[0]):
        for j in range(kernel.shape[1]):
            out = out + padded[i:i + rows, j:j + cols] * kernel[i, j, 0]
    return out


@jax.custom_vjp
def depthwise_conv(x: jax.Array, kernel: jax.Array) -> jax.Array:
    """As nn.Conv(C, (ka, kb), padding='SAME', feature_group_count=C) without bias: x [A, B, C],
    kernel [ka, kb, 1, C] -> [A, B, C]."""
    return _correlate(x, kernel)


def _depthwise_forward(x, kernel):
    return _correlate(x, kernel), (x, kernel)


def _depthwise_backward(saved, grad):
    """d/dx: the correlation of grad with the flipped kernel; d/dkernel[i, j, 0, c]: the sum of
    padded x shifted by (i, j) times grad, one reduction per tap (no dense convolution)."""
    x, kernel = saved
    ka, kb, _, channels = kernel.shape
    padded = _pad(x, kernel)

    def tap(t, sums):  # one tap at a time: no shifted copy outlives its reduction
        shifted = jax.lax.dynamic_slice(padded, (t // kb, t % kb, 0), x.shape)
        return sums.at[t].set(jnp.sum(shifted * grad, axis=(0, 1), dtype=jnp.float32))

    sums = jax.lax.fori_loop(0, ka * kb, tap, jnp.zeros((ka * kb, channels), jnp.float32))
    return _correlate(grad, kernel[::-1, ::-1]), sums.reshape(kernel.shape).astype(kernel.dtype)


depthwise_conv.defvjp(_depthwise_forward, _depthwise_backward)


class DepthwiseConv(nn.Module):
    """Depthwise 2-D convolution with zero padding ('same' size), `depthwise_conv`.
    x [A, B, C] -> [A, B, C]; parameters as nn.Conv(C, (ka, kb), feature_group_count=C):
    kernel [ka, kb, 1, C], bias [C]."""

    kernel_size: tuple[int, int]
    use_bias: bool = True
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        ka, kb = self.kernel_size
        channels = x.shape[-1]
        kernel = self.param('kernel', nn.initializers.lecun_normal(), (ka, kb, 1, channels),
                            jnp.float32).astype(self.dtype)
        out = depthwise_conv(x.astype(self.dtype), kernel)
        if self.use_bias:
            out = out + self.param('bias', nn.initializers.zeros, (channels,),
                                   jnp.float32).astype(self.dtype)
        return out


class NystromAttention(nn.Module):
    """lucidrains' NystromAttention (residual depthwise convolution of the values, no mask) over a
    front-padded sequence x [L, D] whose positions outside [p, P) are zero; P = length =
    num_landmarks * segment. -> [L, D] (meaningful on [p, P))."""

    heads: int
    dim_head: int
    num_landmarks: int
    pinv_iterations: int = 6
    residual_kernel: int = 33
    dropout: float = 0.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, length: jax.Array, segment: jax.Array,
                 deterministic: bool) -> jax.Array:
        size, inner = x.shape[0], self.heads * self.dim_head
        qkv = nn.Dense(3 * inner, use_bias=False, dtype=self.dtype, param_dtype=jnp.float32,
                       name='to_qkv')(x)
        q, k, v = jnp.moveaxis(qkv.reshape(size, 3, self.heads, self.dim_head), 0, -2)
        q = q * self.dim_head ** -0.5  # each [h, L, d]
        position = jnp.arange(size)
        inside = position < length
        # Landmarks: means of the m segments of `segment` positions of [0, P) (front zeros
        # included); positions past P get segment id m and are dropped.
        ids = jnp.where(inside, position // segment, self.num_landmarks)

        def landmarks(t):
            sums = jax.ops.segment_sum(jnp.moveaxis(t, 1, 0).astype(jnp.float32), ids,
                                       self.num_landmarks, indices_are_sorted=True)
            return (jnp.moveaxis(sums, 0, 1) / segment).astype(self.dtype)  # [h, m, d]

        q_landmarks, k_landmarks = landmarks(q), landmarks(k)
        sim1 = jnp.einsum('hid,hjd->hij', q, k_landmarks).astype(jnp.float32)
        sim2 = jnp.einsum('hid,hjd->hij', q_landmarks, k_landmarks).astype(jnp.float32)
        sim3 = jnp.einsum('hid,hjd->hij', q_landmarks, k).astype(jnp.float32)
        attn1, attn2 = jax.nn.softmax(sim1), jax.nn.softmax(sim2)
        attn3 = jax.nn.softmax(jnp.where(inside, sim3, -1e30))  # keys [0, P) only
        attn2_inv = moore_penrose_pinv(attn2, self.pinv_iterations)
        left = jnp.matmul(attn1, attn2_inv, precision=HIGHEST).astype(self.dtype)
        out = left @ (attn3.astype(self.dtype) @ v)
        # Depthwise convolution of v along the sequence (kernel 33 x 1 over [L, d], one per head).
        residual = DepthwiseConv((self.residual_kernel, 1), use_bias=False, dtype=self.dtype,
                                 name='res_conv')(jnp.moveaxis(v, 0, -1))
        out = out + jnp.moveaxis(residual, -1, 0)
        out = jnp.moveaxis(out, 0, 1).reshape(size, inner)
        out = nn.Dense(x.shape[-1], dtype=self.dtype, param_dtype=jnp.float32, name='to_out')(out)
        return nn.Dropout(self.dropout)(out, deterministic=deterministic)


class TransLayer(nn.Module):
    """x + NystromAttention(LayerNorm(x)), the normalized input zeroed outside `valid`.
    x [L, D] float32, valid [L] -> [L, D] float32."""

    heads: int
    dropout: float
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x: jax.Array, valid: jax.Array, length: jax.Array, segment: jax.Array,
                 deterministic: bool) -> jax.Array:
        dim = x.shape[-1]
        normed = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name='norm')(x)
        normed = jnp.where(valid[:, None], normed, 0.0)
        attended = NystromAttention(self.heads, dim // self.heads, dim // 2,
                                    dropout=self.dropout, dtype=self.dtype, name='attn')(
            normed, length, segment, deterministic)
        return x + attended


class PPEG(nn.Module):
    """Pyramid position encoding: identity + depthwise 7x7, 5x5 and 3x3 convolutions (zero
    padding). grid [S, S, D] -> [S, S, D]."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, grid: jax.Array) -> jax.Array:
        def conv(size, name):
            return DepthwiseConv((size, size), dtype=self.dtype, name=name)(grid)

        return conv(7, 'proj') + grid + conv(5, 'proj1') + conv(3, 'proj2')


class TransMIL(nn.Module):
    """One slide graph -> (logits [C] float32, scores [N] float32: zeros, TransMIL has no
    per-patch attention; heatmaps use per-patch contributions)."""

    num_classes: int
    d_model: int = 512
    heads: int = 8
    dropout: float = 0.1
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True, labels=None):
        """-> (logits [C] float32, scores [N] float32); `labels` unused (no auxiliary loss)."""
        del labels
        mask = graph.nodes['mask']
        count = mask.shape[0]
        h = nn.Dense(self.d_model, dtype=self.dtype, param_dtype=jnp.float32, name='fc1')(
            graph.nodes['features'].astype(self.dtype))
        h = nn.relu(h) * mask[:, None].astype(h.dtype)
        self.sow('intermediates', 'pooling_input', h)  # per-patch contributions
        h = self.perturb('pooling_input', h).astype(jnp.float32)

        # Static sizes for n = N, and the dynamic ones of this slide (n valid nodes, first).
        landmarks = self.d_model // 2
        side_max = math.isqrt(count - 1) + 1  # ceil(sqrt(N))
        size = landmarks * -(-(side_max ** 2 + 1) // landmarks)
        n = mask.sum(dtype=jnp.int32)
        side = (jnp.arange(side_max) ** 2 < n).sum(dtype=jnp.int32)  # H = ceil(sqrt(n))
        squared = side * side
        segment = (squared + landmarks) // landmarks  # l = ceil((H * H + 1) / m)
        length = segment * landmarks  # P
        front = length - squared - 1  # p

        # Buffer position i holds the class token at p, squared patch token i - p - 1 after it.
        position = jnp.arange(size)
        valid = (position >= front) & (position < length)
        token = position - front - 1
        is_patch = (token >= 0) & (token < squared)
        source = jnp.clip(jnp.where(token < n, token, token - n), 0, count - 1)
        cls_token = self.param('cls_token', nn.initializers.normal(1.0), (self.d_model,))
        x = jnp.where(is_patch[:, None], h[source], 0.0)
        x = jnp.where((token == -1)[:, None], cls_token, x)

        def layer(name, x):
            return TransLayer(self.heads, self.dropout, self.dtype, name=name)(
                x, valid, length, segment, deterministic)

        x = layer('layer1', x)
        rows, cols = jnp.arange(side_max)[:, None], jnp.arange(side_max)[None, :]
        on_grid = (rows < side) & (cols < side)
        start = jnp.clip(front + 1 + rows * side + cols, 0, size - 1)
        grid = jnp.where(on_grid[..., None], x[start], 0.0)
        grid = PPEG(self.dtype, name='pos_layer')(grid)
        width = jnp.maximum(side, 1)
        placed = grid[jnp.clip(token // width, 0, side_max - 1),
                      jnp.clip(token % width, 0, side_max - 1)]
        x = jnp.where(is_patch[:, None], placed, x)
        x = layer('layer2', x)

        pooled = nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name='norm')(x[front])
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, param_dtype=jnp.float32,
                          name='fc2')(pooled)
        return logits, jnp.zeros(count, jnp.float32)
