"""Slide model: the Flax train step vs the same model in plain PyTorch; dense attention alone vs
torch's fused attention; kNN graph construction: pathjax (JAX) vs brute-force numpy vs
scikit-learn.

Part 1, train steps/s. One batch of `--slides` synthetic slide graphs (random features [n, D],
random grid positions, the kNN graph of `knn_indices` + `symmetric_edges`), padded to each
`--nodes` budget as the stage's batches are. pathjax: the batched `SlideTransformer` (dense attention,
and the 'graph' attention mode), the `make_train_step` step with `create_optimizer`'s AdamW,
jitted with the state donated; compile time measured on its own. Reference: the same architecture
written with torch.nn, eager: Linear projection, the same 2-D sinusoidal encoding, post-norm
`TransformerEncoderLayer`s (MHA with a key padding mask, FF 2 d_model, ReLU; LayerNorm eps 1e-6
as Flax's), GCN layers relu(D^-1/2 (A+I) D^-1/2 H W) with `index_add_` over the same padded edge
lists and masks, masked mean pooling, Linear -> ReLU -> Linear, masked cross entropy,
torch.optim.AdamW. Dropout 0 and float32 on both sides. Before timing, the Flax parameters are
copied into the torch model and the logits and losses are checked to agree, before and after one
optimizer step. The train steps run interleaved (median of the timed steps).
Two PyTorch runners: `torch` takes the padded batch with the key padding mask (it computes the
padded rows pathjax's blocked attention skips), `torch unpadded` loops over the slides, each at
its own length with only its own edges (no padding, no mask), each slide's loss / slides
backpropagated, then one AdamW step: the same work as pathjax, the headline reference.

Part 2, dense attention alone, forward + backward (the gradient of sum(out * g) over the valid
rows) on `--slides` slides of `--attention-nodes` padded nodes, d_model / heads per head:
`blocked_attention` (vmapped, jitted) vs `torch.nn.functional.scaled_dot_product_attention` with
the boolean padding mask (PyTorch's fused CPU flash-attention kernel), gradients checked to agree;
and the compiled temporaries of blocked_attention vs the einsum form it replaced.

Part 3, kNN graph (k neighbours, self excluded) of `--knn-sizes` random float32 features [N, D]:
`pathjax.data.graphs.knn_indices` (on device, chunked; compile reported apart), numpy brute force
(chunked float32 |q|^2 + |p|^2 - 2 q.p, argpartition), scikit-learn `NearestNeighbors(k + 1)`
with its default algorithm and with 'brute'. At the smallest N the neighbour sets are checked to
agree (through exact float64 distances). A method whose predicted time exceeds `--max-seconds` is
timed on a slice of the query rows and extrapolated (and labelled so).

Threads: the process is pinned to `--threads` cores before JAX starts its CPU client (XLA sizes
its thread pool from the cores it may run on), torch.set_num_threads(--threads), and
threadpoolctl limits OpenBLAS (numpy) and OpenMP (scikit-learn) to --threads. pathjax runs as
launch.py runs it on CPU: `--devices` XLA CPU devices (0 = `cpu_devices.auto_count` for
--threads cores and --slides slides, as config.cpu_devices = 0 gives), each slide batch split
between them (`sharding.global_batch`) and traced under the mesh (`sharding.under_mesh`); the
kNN part runs on one device, as the graph stage does.

  python benchmarks/slide_model.py [--threads 2] [--nodes 512 2048] [--attention-nodes 2048]
                                   [--steps 5] [--knn-sizes 2000 10000 50000] [--devices 0]
  rows for the runner: run(quick) (python -m benchmarks --only slide_model [--quick])
"""

import argparse
import copy
import os
import platform
import statistics
import time
import types

import jax
import jax.numpy as jnp
import jaxlib.version
import numpy as np
import pathjax
import sklearn
import threadpoolctl
import torch
from sklearn.neighbors import NearestNeighbors

from feature_net import compiled, flax_train_runner, interleaved, pin_threads
from machine_info import cpu_line
from pathjax import cpu_devices
from pathjax.data import graphs
from pathjax.models.slide.blocked_attention import blocked_attention
from pathjax.models.slide.encoding import BASE
from pathjax.models.slide.factory import batched
from pathjax.models.slide.graph_transformer import SlideTransformer
from pathjax.runtime import sharding
from pathjax.train.slide_training import TrainState, create_optimizer, make_train_step
from rows import row

NUM_CLASSES, MLP_HIDDEN, LR, WEIGHT_DECAY = 2, 64, 1e-4, 1e-4
LAYER_NORM_EPS = 1e-6  # flax.linen.LayerNorm's default (torch's is 1e-5)
TOLERANCE = 1e-4


# ---- other processes' CPU use ----

def cpu_seconds() -> tuple[float, float, float]:
    """(busy CPU seconds of the whole machine, of this process, wall time) so far."""
    with open('/proc/stat') as stat:
        fields = [int(x) for x in stat.readline().split()[1:]]
    busy = sum(fields[:3]) + sum(fields[5:8])  # user nice system (idle iowait) irq softirq steal
    own = os.times()
    return busy / os.sysconf('SC_CLK_TCK'), own.user + own.system, time.perf_counter()


def others_since(start: tuple[float, float, float]) -> float:
    """Cores kept busy by other processes since `start` (cpu_seconds()), on average."""
    busy, own, wall = (b - a for a, b in zip(start, cpu_seconds()))
    return max(0.0, busy - own) / wall


# ---- the batch ----

def synthetic_batch(args, nodes: int, seed: int) -> dict:
    """`args.slides` random slide graphs of between nodes/2 + 1 and `nodes` patches, padded to
    the `nodes` bucket as the stage's batches are: {'graph': stacked GraphsTuple [B, ...], 'label'
    int32 [B], 'mask' bool [B]} (numpy)."""
    rng = np.random.default_rng(seed)
    slide_graphs = []
    for _ in range(args.slides):
        count = int(rng.integers(nodes // 2 + 1, nodes + 1))
        features = rng.normal(size=(count, args.feature_dim)).astype(np.float32)
        grid = rng.integers(0, 200, (count, 2))
        senders, receivers = graphs.symmetric_edges(graphs.knn_indices(features, args.k))
        slide_graphs.append(graphs.slide_graph(features, grid, senders, receivers))
    budget = graphs.bucket_size(max(int(g.n_node[0]) for g in slide_graphs))
    padded = [graphs.pad_graph(g, budget, graphs.edge_budget(budget, args.k)) for g in slide_graphs]
    return {'graph': graphs.stack_graphs(padded),
            'label': rng.integers(0, NUM_CLASSES, args.slides).astype(np.int32),
            'mask': np.ones(args.slides, bool)}


# ---- pathjax (Flax) ----

def flax_model(args, attention: str):
    return batched(SlideTransformer)(
        num_classes=NUM_CLASSES, d_model=args.d_model, num_heads=args.heads,
        transformer_layers=args.transformer_layers, gcn_layers=args.gcn_layers,
        attention=attention, mlp_hidden=MLP_HIDDEN, dropout=0.0, dtype=jnp.float32)


def flax_state(model, params) -> TrainState:
    train = types.SimpleNamespace(optimizer='adamw', lr=LR, weight_decay=WEIGHT_DECAY)
    return TrainState.create(apply_fn=model.apply, params=params, tx=create_optimizer(train))


def flax_logits(model, params, batch) -> np.ndarray:
    return np.asarray(model.apply({'params': params}, batch['graph'], True, None)[0])


# ---- reference (PyTorch) ----

def torch_grid_encoding(grid: torch.Tensor, d_model: int) -> torch.Tensor:
    """grid int [B, N, 2] -> [B, N, d_model]: pathjax.models.slide.encoding.grid_encoding's formula."""
    dims = d_model // 2
    i = torch.arange(dims // 2, dtype=torch.float32)
    frequencies = 1.0 / BASE ** (2.0 * i / dims)

    def axis(positions):
        angles = positions.float()[..., None] * frequencies  # [B, N, dims / 2]
        return torch.stack([angles.sin(), angles.cos()], dim=-1).flatten(-2)

    return torch.cat([axis(grid[..., 0]), axis(grid[..., 1])], dim=-1)


def torch_adjacency_apply(values, senders, receivers, edge_mask, node_mask):
    """D^-1/2 (A + I) D^-1/2 values over the flattened batch: values [B, N, F]; senders,
    receivers [B E] (offset by b N), edge_mask [B E] float, node_mask [B, N] float."""
    flat = values.reshape(-1, values.shape[-1])  # [B N, F]
    degree = torch.ones(flat.shape[0]).index_add_(0, receivers, edge_mask)
    scale = (degree.rsqrt() * node_mask.reshape(-1))[:, None]
    scaled = flat * scale
    messages = scaled[senders] * edge_mask[:, None]
    gathered = torch.zeros_like(scaled).index_add_(0, receivers, messages)
    return ((gathered + scaled) * scale).reshape(values.shape)


class TorchSlideTransformer(torch.nn.Module):
    """SlideTransformer (mean pooling, dense attention, no dropout) in torch.nn, batch first."""

    def __init__(self, feature_dim: int, d_model: int, heads: int, transformer_layers: int,
                 gcn_layers: int):
        super().__init__()
        self.d_model = d_model
        self.projection = (torch.nn.Linear(feature_dim, d_model) if feature_dim != d_model
                           else torch.nn.Identity())
        self.blocks = torch.nn.ModuleList(torch.nn.TransformerEncoderLayer(
            d_model, heads, 2 * d_model, dropout=0.0, activation='relu',
            layer_norm_eps=LAYER_NORM_EPS, batch_first=True, norm_first=False)
            for _ in range(transformer_layers))
        self.gcn = torch.nn.ModuleList(torch.nn.Linear(d_model, d_model, bias=False)
                                       for _ in range(gcn_layers))
        self.mlp = torch.nn.Sequential(torch.nn.Linear(d_model, MLP_HIDDEN), torch.nn.ReLU(),
                                       torch.nn.Linear(MLP_HIDDEN, NUM_CLASSES))

    def forward(self, batch: dict) -> torch.Tensor:
        """batch: torch_batch's tensors -> logits [B, C]."""
        mask = batch['node_mask']  # [B, N] float
        nodes = self.projection(batch['features']) + torch_grid_encoding(batch['grid'],
                                                                         self.d_model)
        for block in self.blocks:
            nodes = block(nodes, src_key_padding_mask=mask == 0)
        for layer in self.gcn:
            nodes = torch.relu(torch_adjacency_apply(layer(nodes), batch['senders'],
                                                     batch['receivers'], batch['edge_mask'], mask))
        nodes = nodes * mask[..., None]
        weights = mask / mask.sum(1, keepdim=True).clamp_min(1)
        return self.mlp(torch.einsum('bn,bnd->bd', weights, nodes))


def torch_batch(batch: dict) -> dict:
    """synthetic_batch's numpy batch as torch tensors, edge indices offset into the flattened batch."""
    graph = batch['graph']
    slides, nodes = graph.nodes['mask'].shape
    offsets = (np.arange(slides) * nodes)[:, None]
    return {'features': torch.from_numpy(graph.nodes['features']),
            'grid': torch.from_numpy(graph.nodes['grid']),
            'node_mask': torch.from_numpy(graph.nodes['mask'].astype(np.float32)),
            'senders': torch.from_numpy((graph.senders + offsets).reshape(-1).astype(np.int64)),
            'receivers': torch.from_numpy((graph.receivers + offsets).reshape(-1)
                                          .astype(np.int64)),
            'edge_mask': torch.from_numpy(graph.edges['mask'].reshape(-1).astype(np.float32)),
            'label': torch.from_numpy(batch['label'].astype(np.int64)),
            'slide_mask': torch.from_numpy(batch['mask'].astype(np.float32))}


def torch_loss(model, tbatch) -> torch.Tensor:
    """make_train_step's loss with unit class weights: cross entropy over the valid slides."""
    losses = torch.nn.functional.cross_entropy(model(tbatch), tbatch['label'], reduction='none')
    weights = tbatch['slide_mask']
    return (losses * weights).sum() / weights.sum().clamp_min(1e-12)


def load_flax_params(model: TorchSlideTransformer, params) -> None:
    """Copy the Flax parameters into the torch model (kernels [in, out] -> weights [out, in])."""
    def t(x):
        return torch.from_numpy(np.array(x, np.float32))

    def dense(linear, p):
        linear.weight.copy_(t(p['kernel']).reshape(-1, linear.weight.shape[0]).T)
        if 'bias' in p:
            linear.bias.copy_(t(p['bias']).reshape(-1))

    with torch.no_grad():
        if 'projection' in params:
            dense(model.projection, params['projection'])
        for i, block in enumerate(model.blocks):
            p = params[f'TransformerBlock_{i}']
            attention = p['MultiHeadAttention_0']
            qkv = [attention[name] for name in ('query', 'key', 'value')]
            block.self_attn.in_proj_weight.copy_(torch.cat(
                [t(x['kernel']).reshape(model.d_model, -1).T for x in qkv]))
            block.self_attn.in_proj_bias.copy_(torch.cat([t(x['bias']).reshape(-1) for x in qkv]))
            dense(block.self_attn.out_proj, attention['out'])
            dense(block.linear1, p['Dense_0'])
            dense(block.linear2, p['Dense_1'])
            for norm, name in ((block.norm1, 'LayerNorm_0'), (block.norm2, 'LayerNorm_1')):
                norm.weight.copy_(t(p[name]['scale']))
                norm.bias.copy_(t(p[name]['bias']))
        for i, layer in enumerate(model.gcn):
            dense(layer, params[f'GCNLayer_{i}']['Dense_0'])
        dense(model.mlp[0], params['mlp_hidden'])
        dense(model.mlp[2], params['mlp_out'])


def torch_optimizer(model):
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)


def torch_train_runner(model, opt, tbatch):
    """A zero-argument call running one eager train step."""
    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        loss = torch_loss(model, tbatch)
        loss.backward()
        opt.step()
        return loss
    return run


def torch_slides(host_batch: dict) -> list[dict]:
    """Each slide of synthetic_batch's numpy batch alone, unpadded, as a batch of one: its n
    valid nodes and its valid edges (torch_batch's keys)."""
    graph, found = host_batch['graph'], []
    for b in range(graph.nodes['mask'].shape[0]):
        n = int(graph.nodes['mask'][b].sum())
        valid = graph.edges['mask'][b].astype(bool)
        found.append({'features': torch.from_numpy(graph.nodes['features'][b, :n][None]),
                      'grid': torch.from_numpy(graph.nodes['grid'][b, :n][None]),
                      'node_mask': torch.ones(1, n),
                      'senders': torch.from_numpy(graph.senders[b][valid].astype(np.int64)),
                      'receivers': torch.from_numpy(graph.receivers[b][valid].astype(np.int64)),
                      'edge_mask': torch.ones(int(valid.sum())),
                      'label': torch.from_numpy(host_batch['label'][b:b + 1].astype(np.int64)),
                      'slide_mask': torch.ones(1)})
    return found


def torch_unpadded_loss(model, slides: list[dict]) -> float:
    """The mean loss of the slides, one at a time (no gradient)."""
    with torch.no_grad():
        return sum(torch_loss(model, s).item() for s in slides) / len(slides)


def torch_unpadded_runner(model, opt, slides: list[dict]):
    """A zero-argument call: one slide at a time, loss / slides backpropagated (accumulated
    gradients), then one optimizer step."""
    def run():
        model.train()
        opt.zero_grad(set_to_none=True)
        for one in slides:
            (torch_loss(model, one) / len(slides)).backward()
        opt.step()
    return run


# ---- part 1: train steps ----

def check_agreement(model, params, batch, reference, tbatch) -> dict:
    """Max |logit difference| before and after one optimizer step on each side (and the losses):
    the reference computes the same function from the same parameters."""
    state = flax_state(model, params)
    before = np.abs(flax_logits(model, params, batch) - reference(tbatch).detach().numpy()).max()
    step = jax.jit(make_train_step(model, np.ones(NUM_CLASSES, np.float32)))
    state, metrics = step(state, batch, jax.random.key(0))
    torch_loss_value = torch_train_runner(reference, torch_optimizer(reference), tbatch)().item()
    after = np.abs(flax_logits(model, state.params, batch) - reference(tbatch).detach().numpy())
    result = {'logits': float(before), 'loss': abs(float(metrics['loss']) - torch_loss_value),
              'logits after step': float(after.max())}
    if max(result.values()) > TOLERANCE:
        raise AssertionError(f'Flax and torch models disagree: {result}')
    return result


def measure_model(args, nodes: int) -> dict:
    """Steps/s of each train step (Flax dense, Flax graph, torch) at one node budget."""
    host_batch = synthetic_batch(args, nodes, seed=nodes)
    mesh = sharding.make_mesh()
    batch, rng = sharding.global_batch(host_batch, mesh), jax.random.key(0)
    models = {'flax': flax_model(args, 'dense'), 'flax graph': flax_model(args, 'graph')}
    params = jax.jit(models['flax'].init, static_argnums=(2, 3))(
        jax.random.key(0), jax.device_put(host_batch['graph']), True, None)['params']
    torch.manual_seed(0)
    reference = TorchSlideTransformer(args.feature_dim, args.d_model, args.heads,
                                      args.transformer_layers, args.gcn_layers)
    load_flax_params(reference, params)
    tbatch, slides = torch_batch(host_batch), torch_slides(host_batch)
    unpadded = abs(torch_unpadded_loss(reference, slides) - torch_loss(reference, tbatch).item())
    if unpadded > TOLERANCE:
        raise AssertionError(f'the unpadded PyTorch loss differs from the padded one by {unpadded}')
    unpadded_reference = copy.deepcopy(reference)
    agreement = check_agreement(models['flax'], params, batch, reference, tbatch)
    agreement['unpadded loss'] = unpadded
    runners, compile_seconds = {}, {}
    weights = np.ones(NUM_CLASSES, np.float32)
    for name, model in models.items():
        state = jax.device_put(flax_state(model, jax.tree.map(jnp.copy, params)),
                               sharding.replicated(mesh))
        with jax.set_mesh(mesh):
            executable, compile_seconds[name] = compiled(make_train_step(model, weights), state,
                                                         batch, rng, donate=True, options={})
        runners[name] = flax_train_runner(executable, state, batch, rng)
    runners['torch'] = torch_train_runner(reference, torch_optimizer(reference), tbatch)
    runners['torch unpadded'] = torch_unpadded_runner(
        unpadded_reference, torch_optimizer(unpadded_reference), slides)
    start = cpu_seconds()
    times = interleaved(runners, args.warmup, args.steps)
    others = others_since(start)
    graph = host_batch['graph']
    return {'nodes': nodes, 'valid nodes': int(graph.nodes['mask'].sum()),
            'edges': int(graph.edges['mask'].sum()), 'edge budget': graph.senders.size,
            'rates': {name: 1.0 / statistics.median(t) for name, t in times.items()},
            'compile': compile_seconds, 'agreement': agreement, 'others': others}


def report_models(args, rows: list[dict]) -> None:
    print(f'\n## Train step: {args.slides} slides, D = {args.feature_dim}, d_model {args.d_model}, '
          f'{args.heads} heads, {args.transformer_layers} + {args.gcn_layers} layers, '
          f'k = {args.k}, '
          f'AdamW, float32, dropout 0; {args.warmup} warm-up + {args.steps} timed steps (median)\n')
    print('| nodes (budget) | valid nodes | edges / budget | flax steps/s '
          '| torch unpadded steps/s | flax / torch unpadded | torch padded steps/s '
          '| flax / torch padded | flax graph-attention steps/s | compile s (dense, graph) '
          '| max logit diff (before, after a step) | other processes, cores |')
    print('|---|---|---|---|---|---|---|---|---|---|---|---|')
    for r in rows:
        rates, c, a = r['rates'], r['compile'], r['agreement']
        print(f'| {r["nodes"]} | {r["valid nodes"]} | {r["edges"]} / {r["edge budget"]} '
              f'| {rates["flax"]:.2f} | {rates["torch unpadded"]:.2f} '
              f'| {rates["flax"] / rates["torch unpadded"]:.2f}x | {rates["torch"]:.2f} '
              f'| {rates["flax"] / rates["torch"]:.2f}x | {rates["flax graph"]:.2f} '
              f'| {c["flax"]:.1f}, {c["flax graph"]:.1f} '
              f'| {a["logits"]:.1e}, {a["logits after step"]:.1e} | {r["others"]:.2f} |')


# ---- part 2: dense attention alone ----

def einsum_attention(query, key, value, valid):
    """Dense attention as one [H, N, N] softmax (pathjax's dense path before blocked_attention):
    query, key, value [N, H, d], the first `valid` keys attended."""
    logits = jnp.einsum('qhd,khd->hqk', query, key) / np.sqrt(query.shape[-1])
    logits = jnp.where(jnp.arange(query.shape[0]) < valid, logits, -jnp.inf)
    return jnp.einsum('hqk,khd->qhd', jax.nn.softmax(logits, axis=-1), value)


def attention_gradient(attention):
    """jit of the gradients w.r.t. query, key, value [B, N, H, d] of sum(out * g) over each
    slide's valid rows (valid int [B])."""
    def objective(query, key, value, out_grad, valid):
        out = jax.vmap(attention)(query, key, value, valid)
        rows = jnp.arange(query.shape[1])[None, :] < valid[:, None]
        return jnp.sum(jnp.where(rows[..., None, None], out * out_grad, 0.0))
    return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))


def measure_attention(args, nodes: int) -> dict:
    """Forward + backward seconds of dense attention over `args.slides` slides of between
    nodes/2 + 1 and `nodes` valid nodes (as synthetic_batch draws them), d_model / heads per
    head: pathjax's blocked_attention vs torch's scaled_dot_product_attention with the padding
    mask (its fused CPU flash kernel); gradients checked to agree. Compiled temporaries of
    blocked_attention and of the einsum form."""
    rng = np.random.default_rng(nodes)
    shape = (args.slides, nodes, args.heads, args.d_model // args.heads)
    query, key, value, out_grad = (rng.normal(size=shape).astype(np.float32) for _ in range(4))
    valid = rng.integers(nodes // 2 + 1, nodes + 1, args.slides).astype(np.int32)
    mesh = sharding.make_mesh()
    inputs = sharding.global_batch([query, key, value, out_grad, valid], mesh)
    with jax.set_mesh(mesh):
        functions = {name: attention_gradient(attention).lower(*inputs).compile()
                     for name, attention in (('blocked', blocked_attention),
                                             ('einsum', einsum_attention))}
    memory = {name: function.memory_analysis().temp_size_in_bytes * mesh.devices.size
              for name, function in functions.items()}
    grads = functions['blocked'](*inputs)

    rows = torch.from_numpy(np.arange(nodes)[None, :] < valid[:, None])  # [B, N]
    tensors = [torch.tensor(x).transpose(1, 2).contiguous() for x in (query, key, value)]
    t_grad = torch.from_numpy(out_grad).transpose(1, 2) * rows[:, None, :, None]
    for tensor in tensors:
        tensor.requires_grad_(True)

    def torch_step():
        for tensor in tensors:
            tensor.grad = None
        out = torch.nn.functional.scaled_dot_product_attention(
            *tensors, attn_mask=rows[:, None, None, :])
        (out * t_grad).sum().backward()

    torch_step()
    gap = max(float(np.abs(np.asarray(g) - t.grad.transpose(1, 2).numpy()).max())
              for g, t in zip(grads, tensors))
    if gap > TOLERANCE:
        raise AssertionError(f'blocked attention and torch disagree by {gap}')
    runners = {'blocked': lambda: jax.block_until_ready(functions['blocked'](*inputs)),
               'torch': torch_step}
    times = interleaved(runners, args.warmup, args.steps)
    return {'nodes': nodes, 'valid nodes': int(valid.sum()), 'memory': memory, 'gap': gap,
            'seconds': {name: statistics.median(t) for name, t in times.items()}}


def report_attention(args, rows: list[dict]) -> None:
    print(f'\n## Dense attention alone, forward + backward: {args.slides} slides, {args.heads} '
          f'heads of {args.d_model // args.heads}, float32\n')
    print('| nodes (budget) | valid nodes | blocked s | torch SDPA s | torch / blocked '
          '| blocked temporaries MiB | einsum temporaries MiB | max gradient gap |')
    print('|---|---|---|---|---|---|---|---|')
    for r in rows:
        s, m = r['seconds'], r['memory']
        print(f'| {r["nodes"]} | {r["valid nodes"]} | {s["blocked"]:.3f} | {s["torch"]:.3f} '
              f'| {s["torch"] / s["blocked"]:.2f}x | {m["blocked"] / 2 ** 20:.0f} '
              f'| {m["einsum"] / 2 ** 20:.0f} | {r["gap"]:.1e} |')


# ---- part 3: kNN graph ----

def numpy_knn(features: np.ndarray, k: int, chunk: int, rows: int | None = None) -> np.ndarray:
    """Brute force: chunks of float32 squared distances, self excluded, argpartition.
    Indices [rows, k] (unordered) of the first `rows` points' neighbours (default all)."""
    rows = len(features) if rows is None else rows
    norms = np.einsum('ij,ij->i', features, features)
    neighbours = np.empty((rows, k), np.int64)
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        distances = norms[start:stop, None] + norms[None] - 2.0 * (features[start:stop]
                                                                   @ features.T)
        distances[np.arange(stop - start), np.arange(start, stop)] = np.inf
        neighbours[start:stop] = np.argpartition(distances, k - 1, axis=1)[:, :k]
    return neighbours


def sklearn_knn(features: np.ndarray, k: int, algorithm: str,
                rows: int | None = None) -> np.ndarray:
    """NearestNeighbors(k + 1) fitted on all points, queried with the first `rows`; each
    point's own index removed (or the farthest, where a duplicate point hides it)."""
    rows = len(features) if rows is None else rows
    index = NearestNeighbors(n_neighbors=k + 1, algorithm=algorithm).fit(features)
    found = index.kneighbors(features[:rows], return_distance=False)  # [rows, k + 1]
    keep = found != np.arange(rows)[:, None]
    keep[keep.all(axis=1), -1] = False
    return found[keep].reshape(rows, k)


def sklearn_method(algorithm: str, feature_dim: int, k: int) -> str:
    """The algorithm NearestNeighbors uses for features of this size ('auto' resolved)."""
    return NearestNeighbors(n_neighbors=k + 1, algorithm=algorithm).fit(
        np.zeros((1000, feature_dim), np.float32))._fit_method


def exact_distances(features: np.ndarray, neighbours: np.ndarray) -> np.ndarray:
    """Sorted float64 distances [n, k] from each point to its listed neighbours."""
    points = features.astype(np.float64)
    rows = np.arange(len(neighbours))[:, None]
    return np.sort(np.linalg.norm(points[neighbours] - points[rows], axis=-1), axis=1)


def check_knn(features: np.ndarray, results: dict) -> dict:
    """Per method: (fraction of rows with pathjax's neighbour set, max |sorted distance diff|)."""
    ours = results['pathjax']
    distances = exact_distances(features, ours)
    checks = {}
    for name, found in results.items():
        same = np.mean([set(a) == set(b) for a, b in zip(ours, found)])
        gap = np.abs(exact_distances(features, found) - distances).max()
        checks[name] = (float(same), float(gap))
        if gap > 1e-3:
            raise AssertionError(f'{name} finds other neighbours than pathjax (gap {gap})')
    return checks


def compile_timer() -> list[float]:
    """Collects JAX's trace, lowering and backend compile durations from now on."""
    durations = []

    def listen(event: str, duration: float, **_):
        if event.startswith('/jax/core/compile/'):
            durations.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    return durations


def timed(function, repeats: int) -> float:
    """Median seconds of `repeats` calls."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def xla_matmul_rate(feature_dim: int, chunk: int = 1024, points: int = 16384) -> float:
    """GFLOP/s of XLA's float32 [chunk, D] @ [D, points]: the roof of a chunk's distances."""
    rng = np.random.default_rng(0)
    a = jnp.asarray(rng.normal(size=(chunk, feature_dim)), jnp.float32)
    b = jnp.asarray(rng.normal(size=(points, feature_dim)), jnp.float32)
    product = jax.jit(lambda x, y: x @ y.T)
    product(a, b).block_until_ready()
    return 2 * chunk * feature_dim * points / timed(lambda: product(a, b).block_until_ready(),
                                                    5) / 1e9


def knn_methods(k: int, chunk: int) -> dict:
    """Name -> function(features, rows): the neighbours of the first `rows` points (None: all;
    pathjax always does all)."""
    return {
        'pathjax': lambda x, rows=None: graphs.knn_indices(x, k),
        'numpy': lambda x, rows=None: numpy_knn(x, k, chunk, rows),
        'sklearn auto': lambda x, rows=None: sklearn_knn(x, k, 'auto', rows),
        'sklearn brute': lambda x, rows=None: sklearn_knn(x, k, 'brute', rows),
    }


def first_call(features: np.ndarray, k: int, compile_seconds: list) -> tuple[np.ndarray, float]:
    """knn_indices on fresh caches: (its result, the seconds spent tracing and compiling)."""
    jax.clear_caches()  # part 1 built its graphs with the same programs
    compile_seconds.clear()
    return graphs.knn_indices(features, k), sum(compile_seconds)


def measure_knn(args, count: int, previous: dict | None, compile_seconds: list) -> dict:
    """Seconds per method at N = count. A method predicted (quadratically from the previous
    size) to take over --max-seconds is timed on a slice of query rows and extrapolated."""
    features = np.random.default_rng(count).normal(size=(count, args.feature_dim)).astype(
        np.float32)
    repeats = args.knn_repeats if count <= 10_000 else 1
    seconds, extrapolated, results = {}, {}, {}
    start = cpu_seconds()
    results['pathjax'], compile_time = first_call(features, args.k, compile_seconds)
    for name, method in knn_methods(args.k, args.numpy_chunk).items():
        predicted = previous['seconds'][name] * (count / previous['count']) ** 2 \
            if previous else 0.0
        if predicted > args.max_seconds and name != 'pathjax':
            rows = max(args.numpy_chunk, int(count * args.max_seconds / predicted))
            seconds[name] = timed(lambda: method(features, rows), 1) * count / rows
            extrapolated[name] = rows
        else:
            seconds[name] = timed(lambda: results.__setitem__(name, method(features)), repeats)
    checks = check_knn(features, results) if count == min(args.knn_sizes) else None
    return {'count': count, 'seconds': seconds, 'compile': compile_time, 'checks': checks,
            'extrapolated': extrapolated, 'others': others_since(start)}


def report_knn(args, rows: list[dict], matmul_rate: float) -> None:
    names = list(rows[0]['seconds'])
    print(f'\n## kNN graph: D = {args.feature_dim} random float32 features, k = {args.k}, '
          f'self excluded; seconds (median of --knn-repeats {args.knn_repeats} for N <= 10,000, '
          f'one run above); ratio = method / pathjax (> 1: pathjax faster); pathjax GFLOP/s '
          f'counts the 2 N^2 D of the distances (XLA float32 matmul alone: '
          f'{matmul_rate:.0f} GFLOP/s)\n')
    print('| N | ' + ' | '.join(f'{n} s' for n in names) + ' | '
          + ' | '.join(f'{n} / pathjax' for n in names[1:])
          + ' | pathjax GFLOP/s | pathjax compile s | other processes, cores |')
    print('|---' * (2 * len(names) + 3) + '|')
    for r in rows:
        s = r['seconds']
        cells = [f'{s[n]:.2f}' + (f' (extrapolated from {r["extrapolated"][n]} rows)'
                                  if n in r['extrapolated'] else '') for n in names]
        print(f'| {r["count"]:,} | ' + ' | '.join(cells) + ' | '
              + ' | '.join(f'{s[n] / s["pathjax"]:.2f}x' for n in names[1:])
              + f' | {2 * r["count"] ** 2 * args.feature_dim / s["pathjax"] / 1e9:.0f}'
              + f' | {r["compile"]:.2f} | {r["others"]:.2f} |')
    for r in rows:
        if r['checks']:
            print(f'\nagreement at N = {r["count"]:,} (rows with pathjax\'s neighbour set, max '
                  f'|sorted exact distance difference|): ' + ', '.join(
                      f'{n} {same:.4f} / {gap:.1e}' for n, (same, gap) in r['checks'].items()))
    print('scikit-learn algorithm used: ' + ', '.join(
        f'{a} -> {sklearn_method(a, args.feature_dim, args.k)}' for a in ('auto', 'brute')))


# ---- main ----

def header(args) -> None:
    print(f'machine: {cpu_line()}, {len(os.sched_getaffinity(0))} of {os.cpu_count()} cores '
          f'used, {args.threads} threads (XLA via affinity, torch.set_num_threads, threadpoolctl); '
          f'pathjax on {len(jax.devices())} CPU device(s)')
    print(f'jax {jax.__version__}, jaxlib {jaxlib.version.__version__}, torch {torch.__version__}, '
          f'numpy {np.__version__}, scikit-learn {sklearn.__version__}, '
          f'python {platform.python_version()}, XLA_FLAGS={os.environ.get("XLA_FLAGS", "")!r}')
    print(f'pathjax from {os.path.dirname(pathjax.__file__)}')
    print(f'load average at start: {os.getloadavg()[0]:.2f}; "other processes, cores": CPU '
          f'that other processes used during a row (/proc/stat busy time minus this process)')


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--threads', type=int, default=len(os.sched_getaffinity(0)))
    parser.add_argument('--nodes', type=int, nargs='*', default=[512, 2048],
                        help='node budgets (powers of two) of the train-step batch')
    parser.add_argument('--attention-nodes', type=int, nargs='*', default=[2048],
                        help='node budgets of the attention-alone comparison')
    parser.add_argument('--slides', type=int, default=8)
    parser.add_argument('--devices', type=int, default=0,
                        help="pathjax's CPU devices; 0: as config.cpu_devices = 0 gives")
    parser.add_argument('--feature-dim', type=int, default=512)
    parser.add_argument('--d-model', type=int, default=128)
    parser.add_argument('--heads', type=int, default=4)
    parser.add_argument('--transformer-layers', type=int, default=2)
    parser.add_argument('--gcn-layers', type=int, default=2)
    parser.add_argument('--k', type=int, default=8)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--steps', type=int, default=5)
    parser.add_argument('--knn-sizes', type=int, nargs='*', default=[2000, 10_000, 50_000])
    parser.add_argument('--knn-repeats', type=int, default=3)
    parser.add_argument('--numpy-chunk', type=int, default=1024,
                        help='query rows per numpy distance chunk')
    parser.add_argument('--max-seconds', type=float, default=180.0,
                        help='a kNN method predicted to take longer is extrapolated')
    return parser.parse_args(argv)


def measure(args) -> tuple[list[dict], list[dict], list[dict], float]:
    """(train-step rows, attention rows, kNN rows, XLA's matmul GFLOP/s) of parse()'s args
    (`prepare` first)."""
    compile_seconds = compile_timer()
    model_rows = [measure_model(args, nodes) for nodes in args.nodes]
    attention_rows = [measure_attention(args, nodes) for nodes in args.attention_nodes]
    knn_rows, matmul_rate = [], xla_matmul_rate(args.feature_dim) if args.knn_sizes else 0.0
    with threadpoolctl.threadpool_limits(args.threads):
        for count in sorted(args.knn_sizes):
            knn_rows.append(measure_knn(args, count, knn_rows[-1] if knn_rows else None,
                                        compile_seconds))
    return model_rows, attention_rows, knn_rows, matmul_rate


def prepare(args) -> None:
    """Before JAX starts its CPU backend: the cores, and pathjax's CPU devices."""
    pin_threads(args.threads)
    cpu_devices.set_count(args.devices or cpu_devices.auto_count(args.threads, (args.slides,),
                                                                  (), 1))


QUICK = ['--nodes', '256', '--attention-nodes', '512', '--warmup', '1', '--steps', '2',
         '--knn-sizes', '1000', '2000', '--knn-repeats', '1', '--feature-dim', '128',
         '--slides', '4']


def run(quick: bool) -> list[dict]:
    """Rows (ratio > 1: pathjax better): slide-model train steps/s vs PyTorch (dense and graph
    attention), dense attention alone vs torch's SDPA and its temporaries vs the einsum form,
    kNN seconds vs numpy and scikit-learn. quick: 4 slides, 256 nodes, attention at 512,
    D = 128, kNN at 1,000 and 2,000; else 512 and 2,048 nodes, attention at 2,048, kNN up to
    50,000."""
    args = parse(QUICK if quick else [])
    prepare(args)
    model_rows, attention_rows, knn_rows, _ = measure(args)
    threads = f'{args.threads} threads, {len(jax.devices())} CPU device(s), float32'
    rows = []
    for r in model_rows:
        rates, nodes = r['rates'], r['nodes']
        what = f'{args.slides} slides x {nodes} nodes ({r["valid nodes"]:,} valid)'
        rows.append(row(f'train step, {what}, dense attention', 'steps/s', rates['flax'],
                        rates['torch unpadded'], 'the same model in PyTorch, one unpadded slide '
                        'at a time, gradients accumulated', True,
                        f'attention exp and matmuls ({threads})'))
        rows.append(row(f'train step, {what}, dense attention, vs padded PyTorch', 'steps/s',
                        rates['flax'], rates['torch'], 'the same model in PyTorch on the padded '
                        'batch (SDPA with the padding mask: it computes the padded rows)', True,
                        f'attention exp and matmuls ({threads})'))
        rows.append(row(f'train step, {what}, graph attention', 'steps/s', rates['flax graph'],
                        rates['torch unpadded'], 'the unpadded PyTorch loop, dense attention',
                        True, f'gathers and scatter-adds over {r["edges"]:,} edges ({threads})'))
    for r in attention_rows:
        seconds, memory, nodes = r['seconds'], r['memory'], r['nodes']
        rows.append(row(f'dense attention forward + backward, {args.slides} slides x {nodes} '
                        'nodes', 's', seconds['blocked'], seconds['torch'],
                        "torch scaled_dot_product_attention (fused CPU flash kernel), padding "
                        'mask', False, f'exp and small matmuls per 64 x 128 tile ({threads})'))
        rows.append(row(f'dense attention training temporaries, {args.slides} slides x {nodes} '
                        'nodes', 'bytes', memory['blocked'], memory['einsum'],
                        'the einsum form (an [H, N, N] softmax per slide), compiled', False,
                        'O(N x tile) per slide, not O(N^2)'))
    for r in knn_rows:
        seconds, count = r['seconds'], r['count']
        for name in ('numpy', 'sklearn brute'):
            suffix = f' ({r["extrapolated"][name]} query rows, extrapolated)' \
                if name in r['extrapolated'] else ''
            rows.append(row(f'kNN graph, N = {count:,}, D = {args.feature_dim}, k = {args.k}', 's',
                            seconds['pathjax'], seconds[name],
                            f'{name.replace(" brute", "")} brute force{suffix}',
                            False, f'distance matmul and top-k ({args.threads} threads)'))
    return rows


def main() -> None:
    args = parse()
    prepare(args)
    header(args)
    model_rows, attention_rows, knn_rows, matmul_rate = measure(args)
    print(f'load average at end: {os.getloadavg()[0]:.2f}')
    if model_rows:
        report_models(args, model_rows)
    if attention_rows:
        report_attention(args, attention_rows)
    if knn_rows:
        report_knn(args, knn_rows, matmul_rate)


if __name__ == '__main__':
    main()
