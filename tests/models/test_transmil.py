"""TransMIL: parity with the authors' PyTorch code, padding invariance, batching, bfloat16, and
no N x N array at N = 8192."""

import math
import re

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
import torch.nn.functional as F

from pathjax.data import graphs
from pathjax.models.slide.transmil import TransMIL

FEATURES = 24
SETTINGS = dict(num_classes=3, d_model=64, heads=4)  # 32 landmarks

# As factory.batched: slides on a leading axis, the label batched (or None).
Batched = nn.vmap(TransMIL, in_axes=(0, None, 0), out_axes=0,
                  variable_axes={'params': None, 'intermediates': 0, 'perturbations': 0,
                                 'losses': 0},
                  split_rngs={'params': False, 'dropout': True})


# The reference: szc19990412/TransMIL models/TransMIL.py @ 9d6aee57 and lucidrains/nystrom-attention
# nystrom_attention/nystrom_attention.py @ fbe9ebad (einops spelled in torch, the unused mask
# branch left out), with dim, heads and the input size as arguments, on the CPU.

def moore_penrose_iter_pinv(x, iters=6):
    abs_x = torch.abs(x)
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (torch.max(col) * torch.max(row))
    I = torch.eye(x.shape[-1])[None]
    for _ in range(iters):
        xz = x @ z
        z = 0.25 * z @ (13 * I - (xz @ (15 * I - (xz @ (7 * I - xz)))))
    return z


class TorchNystromAttention(torch.nn.Module):
    def __init__(self, dim, dim_head=64, heads=8, num_landmarks=256, pinv_iterations=6,
                 residual=True, residual_conv_kernel=33, eps=1e-8, dropout=0.):
        super().__init__()
        self.eps = eps
        inner_dim = heads * dim_head
        self.num_landmarks = num_landmarks
        self.pinv_iterations = pinv_iterations
        self.heads = heads
        self.scale = dim_head ** -0.5
        self.to_qkv = torch.nn.Linear(dim, inner_dim * 3, bias=False)
        self.to_out = torch.nn.Sequential(torch.nn.Linear(inner_dim, dim),
                                          torch.nn.Dropout(dropout))
        self.residual = residual
        if residual:
            kernel_size = residual_conv_kernel
            padding = residual_conv_kernel // 2
            self.res_conv = torch.nn.Conv2d(heads, heads, (kernel_size, 1), padding=(padding, 0),
                                            groups=heads, bias=False)

    def forward(self, x):
        b, n, _, h, m, iters = *x.shape, self.heads, self.num_landmarks, self.pinv_iterations
        remainder = n % m
        if remainder > 0:
            padding = m - (n % m)
            x = F.pad(x, (0, 0, padding, 0), value=0)
        q, k, v = self.to_qkv(x).chunk(3, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        q = q * self.scale
        l = math.ceil(n / m)
        q_landmarks = q.reshape(b, h, -1, l, q.shape[-1]).sum(-2)
        k_landmarks = k.reshape(b, h, -1, l, k.shape[-1]).sum(-2)
        divisor = l
        q_landmarks = q_landmarks / divisor
        k_landmarks = k_landmarks / divisor
        sim1 = torch.einsum('... i d, ... j d -> ... i j', q, k_landmarks)
        sim2 = torch.einsum('... i d, ... j d -> ... i j', q_landmarks, k_landmarks)
        sim3 = torch.einsum('... i d, ... j d -> ... i j', q_landmarks, k)
        attn1, attn2, attn3 = map(lambda t: t.softmax(dim=-1), (sim1, sim2, sim3))
        attn2_inv = moore_penrose_iter_pinv(attn2, iters)
        out = (attn1 @ attn2_inv) @ (attn3 @ v)
        if self.residual:
            out = out + self.res_conv(v)
        out = out.transpose(1, 2).reshape(b, out.shape[2], -1)
        out = self.to_out(out)
        return out[:, -n:]


class TorchTransLayer(torch.nn.Module):
    def __init__(self, norm_layer=torch.nn.LayerNorm, dim=512, heads=8):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = TorchNystromAttention(dim=dim, dim_head=dim // heads, heads=heads,
                                          num_landmarks=dim // 2, pinv_iterations=6,
                                          residual=True, dropout=0.1)

    def forward(self, x):
        return x + self.attn(self.norm(x))


class TorchPPEG(torch.nn.Module):
    def __init__(self, dim=512):
        super().__init__()
        self.proj = torch.nn.Conv2d(dim, dim, 7, 1, 7 // 2, groups=dim)
        self.proj1 = torch.nn.Conv2d(dim, dim, 5, 1, 5 // 2, groups=dim)
        self.proj2 = torch.nn.Conv2d(dim, dim, 3, 1, 3 // 2, groups=dim)

    def forward(self, x, H, W):
        B, _, C = x.shape
        cls_token, feat_token = x[:, 0], x[:, 1:]
        cnn_feat = feat_token.transpose(1, 2).view(B, C, H, W)
        x = self.proj(cnn_feat) + cnn_feat + self.proj1(cnn_feat) + self.proj2(cnn_feat)
        x = x.flatten(2).transpose(1, 2)
        return torch.cat((cls_token.unsqueeze(1), x), dim=1)


class TorchTransMIL(torch.nn.Module):
    def __init__(self, n_classes, in_features, dim, heads):
        super().__init__()
        self.pos_layer = TorchPPEG(dim=dim)
        self._fc1 = torch.nn.Sequential(torch.nn.Linear(in_features, dim), torch.nn.ReLU())
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TorchTransLayer(dim=dim, heads=heads)
        self.layer2 = TorchTransLayer(dim=dim, heads=heads)
        self.norm = torch.nn.LayerNorm(dim)
        self._fc2 = torch.nn.Linear(dim, n_classes)

    def forward(self, data):
        h = self._fc1(data.float())
        H = h.shape[1]
        _H, _W = int(np.ceil(np.sqrt(H))), int(np.ceil(np.sqrt(H)))
        add_length = _H * _W - H
        h = torch.cat([h, h[:, :add_length, :]], dim=1)
        h = torch.cat((self.cls_token.expand(h.shape[0], -1, -1), h), dim=1)
        h = self.layer1(h)
        h = self.pos_layer(h, _H, _W)
        h = self.layer2(h)
        return self._fc2(self.norm(h)[:, 0])


def torch_model(params):
    """The reference with the Flax parameters."""
    renamed = {'fc1': '_fc1.0', 'fc2': '_fc2', 'to_out': 'to_out.0'}
    state = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        value = np.array(value)
        *modules, leaf = path
        if leaf == 'kernel':  # Dense [in, out] -> [out, in]; Conv [kh, kw, 1, C] -> [C, 1, kh, kw]
            value, leaf = (value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)), 'weight'
        elif leaf == 'scale':
            leaf = 'weight'
        elif leaf == 'cls_token':
            value = value[None, None]
        state['.'.join([renamed.get(m, m) for m in modules] + [leaf])] = torch.from_numpy(value)
    model = TorchTransMIL(SETTINGS['num_classes'], FEATURES, SETTINGS['d_model'],
                          SETTINGS['heads'])
    model.load_state_dict(state)
    return model.eval()


def slide(count, nodes, seed=0):
    """(features [count, F], one padded slide graph of `nodes` nodes)."""
    features = np.random.default_rng(seed).normal(size=(count, FEATURES)).astype(np.float32)
    grid = np.zeros((count, 2), np.int32)
    empty = np.zeros(0, np.int32)
    graph = graphs.pad_graph(graphs.slide_graph(features, grid, empty, empty), nodes, 1)
    return features, graph


def init(model, graph):
    return jax.jit(model.init, static_argnums=2)(jax.random.key(0), graph, True)['params']


def test_logits_match_the_authors_pytorch_code():
    model = TransMIL(**SETTINGS)
    params = init(model, slide(7, 8)[1])
    reference_model = torch_model(params)
    apply = jax.jit(model.apply)
    # n = 1, a perfect square, T just past a multiple of m (65 = 2 * 32 + 1), several segments.
    for count in (1, 7, 16, 64, 200):
        features, graph = slide(count, 1 << (count - 1).bit_length(), seed=count)
        logits, scores = apply({'params': params}, graph)
        with torch.no_grad():
            reference = reference_model(torch.from_numpy(features)[None])[0].numpy()
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, reference, rtol=0, atol=1e-5)
        np.testing.assert_array_equal(scores, np.zeros(len(scores)))


def test_padding_does_not_change_the_logits():
    model = TransMIL(**SETTINGS)
    params = init(model, slide(37, 64)[1])
    apply = jax.jit(model.apply)
    small = apply({'params': params}, slide(37, 64)[1])[0]
    large = apply({'params': params}, slide(37, 256)[1])[0]
    np.testing.assert_allclose(large, small, rtol=0, atol=1e-5)


def test_batch_of_slides_with_finite_gradients_even_when_empty():
    model = Batched(**SETTINGS)
    batch = graphs.stack_graphs([slide(count, 64, seed=count)[1] for count in (37, 1, 0)])
    variables = jax.jit(model.init, static_argnums=2)(jax.random.key(0), batch, True, None)
    labels = jnp.array([0, 2, 1])
    apply = jax.jit(model.apply, static_argnums=2, static_argnames='mutable')
    (logits, scores), state = apply(variables, batch, True, None, mutable=('intermediates',))
    assert logits.shape == (3, 3) and scores.shape == (3, 64)
    assert state['intermediates']['pooling_input'][0].shape == (3, 64, 64)
    np.testing.assert_array_equal(apply(variables, batch, True, labels)[0], logits)

    def loss(params, perturbations):
        logits, _ = model.apply({'params': params, 'perturbations': perturbations}, batch, False,
                                labels, rngs={'dropout': jax.random.key(1)})
        return jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1).sum()

    grads, contributions = jax.jit(jax.grad(loss, argnums=(0, 1)))(variables['params'],
                                                                   variables['perturbations'])
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
    contributions = contributions['pooling_input']
    assert bool(jnp.isfinite(contributions).all())
    # Padding rows get no gradient; every valid patch does.
    valid = batch.nodes['mask']
    assert not contributions[~valid].any()
    assert bool((jnp.abs(contributions).sum(-1) > 0)[valid].all())


def test_bfloat16_compute_stays_close_to_float32():
    single, half = TransMIL(**SETTINGS), TransMIL(**SETTINGS, dtype=jnp.bfloat16)
    params = init(single, slide(200, 256)[1])
    shapes = jax.eval_shape(half.init, jax.random.key(0), slide(200, 256)[1])
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes['params']))
    single_apply, half_apply = jax.jit(single.apply), jax.jit(half.apply)
    for count in (37, 200):
        graph = slide(count, 256, seed=count)[1]
        reference = single_apply({'params': params}, graph)[0]
        logits = half_apply({'params': params}, graph)[0]
        assert logits.dtype == jnp.float32
        np.testing.assert_allclose(logits, reference, rtol=0, atol=5e-2)


def test_no_n_by_n_array_at_8192_nodes():
    nodes = 8192
    model = TransMIL(num_classes=2)  # d_model 512, 8 heads, 256 landmarks
    graph = jax.eval_shape(lambda: slide(1, nodes)[1])
    graph = graph._replace(nodes={**graph.nodes, 'features': jax.ShapeDtypeStruct((nodes, 1024),
                                                                                  jnp.float32)})
    params = jax.eval_shape(lambda g: init(model, g), graph)
    compiled = jax.jit(model.apply).lower({'params': params}, graph).compile()
    shapes = re.findall(r'\b(?:f32|bf16|s32|pred)\[([\d,]+)\]', compiled.as_text())
    largest = max(math.prod(int(d) for d in shape.split(',')) for shape in shapes)
    assert largest < nodes * nodes
    assert compiled.memory_analysis().temp_size_in_bytes < nodes * nodes * 4
