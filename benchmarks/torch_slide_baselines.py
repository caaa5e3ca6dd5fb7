"""The PyTorch reference of the slide-baselines benchmark: each baseline as its authors wrote it,
run as their training code runs it (one unpadded slide at a time).

The modules are the authors' code as copied into the parity tests (tests/models/test_abmil_clam.py,
tests/models/test_transmil.py; the tests keep their own copies), with the sizes as arguments and
dropout settable (the benchmark uses 0):
- ABMIL: mahmoodlab/MIL-Lab src/models/abmil.py and layers.py (create_mlp with one fc layer,
  GlobalGatedAttention), commit dfc3c17.
- CLAM_SB: mahmoodlab/CLAM models/model_clam.py (Attn_Net_Gated, CLAM_SB with inst_eval,
  subtyping=False, CrossEntropyLoss as instance loss), commit 53e2409.
- TransMIL: szc19990412/TransMIL models/TransMIL.py @ 9d6aee57 with lucidrains/nystrom-attention
  nystrom_attention/nystrom_attention.py @ fbe9ebad (einops spelled in torch, the unused mask
  branch left out).
- mean: the mean of the slide's patch features -> Linear -> ReLU -> Dropout -> Linear (pathjax's
  MeanPool; no external code to follow).

`load_flax_params(name, model, params)` copies a pathjax model's Flax parameters into the torch
module (Dense kernels [in, out] -> Linear weights [out, in], Conv kernels [kh, kw, 1, C] ->
[C, 1, kh, kw]). `slide_loss(name, model, features, label, bag_weight)` is one slide's training
loss as the authors' train loops compute it (cross entropy; CLAM: bag_weight x it +
(1 - bag_weight) x the instance loss).
"""

import math

import flax
import numpy as np
import torch
import torch.nn.functional as F

MODELS = ('abmil', 'transmil', 'clam_sb', 'mean')


# ---- ABMIL (MIL-Lab) ----

class GlobalGatedAttention(torch.nn.Module):
    def __init__(self, L, D, dropout, num_classes=1):
        super().__init__()
        self.attention_a = torch.nn.Sequential(torch.nn.Linear(L, D), torch.nn.Tanh(),
                                               torch.nn.Dropout(dropout))
        self.attention_b = torch.nn.Sequential(torch.nn.Linear(L, D), torch.nn.Sigmoid(),
                                               torch.nn.Dropout(dropout))
        self.attention_c = torch.nn.Linear(D, num_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x)))


class TorchABMIL(torch.nn.Module):
    def __init__(self, in_dim, embed_dim, attn_dim, dropout, num_classes):
        super().__init__()
        self.patch_embed = torch.nn.Sequential(torch.nn.Linear(in_dim, embed_dim), torch.nn.ReLU())
        self.global_attn = GlobalGatedAttention(embed_dim, attn_dim, dropout)
        self.classifier = torch.nn.Linear(embed_dim, num_classes)

    def forward(self, h):  # [B, M, in_dim] -> (logits [B, C], raw attention [B, 1, M])
        h = self.patch_embed(h)
        A = torch.transpose(self.global_attn(h), -2, -1)
        return self.classifier(torch.bmm(F.softmax(A, dim=-1), h).squeeze(dim=1)), A


# ---- CLAM_SB (CLAM) ----

class Attn_Net_Gated(torch.nn.Module):
    def __init__(self, L, D, dropout, n_classes=1):
        super().__init__()
        self.attention_a = [torch.nn.Linear(L, D), torch.nn.Tanh()]
        self.attention_b = [torch.nn.Linear(L, D), torch.nn.Sigmoid()]
        if dropout:
            self.attention_a.append(torch.nn.Dropout(0.25))
            self.attention_b.append(torch.nn.Dropout(0.25))
        self.attention_a = torch.nn.Sequential(*self.attention_a)
        self.attention_b = torch.nn.Sequential(*self.attention_b)
        self.attention_c = torch.nn.Linear(D, n_classes)

    def forward(self, x):
        return self.attention_c(self.attention_a(x).mul(self.attention_b(x))), x


class CLAM_SB(torch.nn.Module):
    def __init__(self, embed_dim, size, dropout, k_sample, n_classes):
        super().__init__()
        fc = [torch.nn.Linear(embed_dim, size[0]), torch.nn.ReLU(), torch.nn.Dropout(dropout),
              Attn_Net_Gated(L=size[0], D=size[1], dropout=dropout, n_classes=1)]
        self.attention_net = torch.nn.Sequential(*fc)
        self.classifiers = torch.nn.Linear(size[0], n_classes)
        self.instance_classifiers = torch.nn.ModuleList(
            [torch.nn.Linear(size[0], 2) for _ in range(n_classes)])
        self.k_sample, self.n_classes = k_sample, n_classes
        self.instance_loss_fn = torch.nn.CrossEntropyLoss()

    def inst_eval(self, A, h, classifier):
        top_p_ids = torch.topk(A, self.k_sample)[1][-1]
        top_p = torch.index_select(h, dim=0, index=top_p_ids)
        top_n_ids = torch.topk(-A, self.k_sample, dim=1)[1][-1]
        top_n = torch.index_select(h, dim=0, index=top_n_ids)
        all_targets = torch.cat([torch.full((self.k_sample,), 1).long(),
                                 torch.full((self.k_sample,), 0).long()])
        logits = classifier(torch.cat([top_p, top_n], dim=0))
        return self.instance_loss_fn(logits, all_targets)

    def forward(self, h, label):  # [N, embed_dim] -> (logits [1, C], raw attention [1, N], loss)
        A, h = self.attention_net(h)
        A_raw = A = torch.transpose(A, 1, 0)
        A = F.softmax(A, dim=1)
        total_inst_loss = 0.0
        inst_labels = F.one_hot(label, num_classes=self.n_classes).squeeze()
        for i in range(len(self.instance_classifiers)):
            if inst_labels[i].item() == 1:
                total_inst_loss += self.inst_eval(A, h, self.instance_classifiers[i])
        return self.classifiers(torch.mm(A, h)), A_raw, total_inst_loss


# ---- TransMIL (TransMIL + nystrom-attention) ----

def moore_penrose_iter_pinv(x, iters=6):
    abs_x = torch.abs(x)
    col = abs_x.sum(dim=-1)
    row = abs_x.sum(dim=-2)
    z = x.transpose(-1, -2) / (torch.max(col) * torch.max(row))
    I = torch.eye(x.shape[-1])[None]  # noqa: E741 (the authors' name)
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
        l = math.ceil(n / m)  # noqa: E741 (the authors' name)
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
    def __init__(self, norm_layer=torch.nn.LayerNorm, dim=512, heads=8, dropout=0.1):
        super().__init__()
        self.norm = norm_layer(dim)
        self.attn = TorchNystromAttention(dim=dim, dim_head=dim // heads, heads=heads,
                                          num_landmarks=dim // 2, pinv_iterations=6,
                                          residual=True, dropout=dropout)

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
    def __init__(self, n_classes, in_features, dim, heads, dropout=0.1):
        super().__init__()
        self.pos_layer = TorchPPEG(dim=dim)
        self._fc1 = torch.nn.Sequential(torch.nn.Linear(in_features, dim), torch.nn.ReLU())
        self.cls_token = torch.nn.Parameter(torch.randn(1, 1, dim))
        self.layer1 = TorchTransLayer(dim=dim, heads=heads, dropout=dropout)
        self.layer2 = TorchTransLayer(dim=dim, heads=heads, dropout=dropout)
        self.norm = torch.nn.LayerNorm(dim)
        self._fc2 = torch.nn.Linear(dim, n_classes)

    def forward(self, data):  # [1, n, in_features] -> logits [1, C]
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


# ---- mean pooling ----

class TorchMeanPool(torch.nn.Module):
    def __init__(self, in_dim, hidden, dropout, num_classes):
        super().__init__()
        self.mlp_hidden = torch.nn.Linear(in_dim, hidden)
        self.dropout = torch.nn.Dropout(dropout)
        self.mlp_out = torch.nn.Linear(hidden, num_classes)

    def forward(self, h):  # [N, in_dim] -> logits [C]
        return self.mlp_out(self.dropout(torch.relu(self.mlp_hidden(h.mean(0)))))


# ---- construction, parameters, loss ----

def create(name: str, feature_dim: int, d_model: int, hidden: int, heads: int, k_sample: int,
           num_classes: int, dropout: float = 0.0) -> torch.nn.Module:
    """The authors' module for pathjax's model `name` with these sizes."""
    if name == 'abmil':
        return TorchABMIL(feature_dim, d_model, hidden, dropout, num_classes)
    if name == 'clam_sb':
        return CLAM_SB(feature_dim, (d_model, hidden), dropout, k_sample, num_classes)
    if name == 'transmil':
        return TorchTransMIL(num_classes, feature_dim, d_model, heads, dropout)
    if name == 'mean':
        return TorchMeanPool(feature_dim, hidden, dropout, num_classes)
    raise ValueError(f'unknown model {name!r}; choose among {", ".join(MODELS)}')


def _tensor(value) -> torch.Tensor:
    return torch.from_numpy(np.array(value, np.float32))


def _copy_linear(linear: torch.nn.Linear, dense: dict) -> None:
    linear.weight.copy_(_tensor(dense['kernel']).T)
    if 'bias' in dense:
        linear.bias.copy_(_tensor(dense['bias']))


def _load_transmil(model: TorchTransMIL, params) -> None:
    renamed = {'fc1': '_fc1.0', 'fc2': '_fc2', 'to_out': 'to_out.0'}
    state = {}
    for path, value in flax.traverse_util.flatten_dict(params).items():
        value = np.array(value, np.float32)
        *modules, leaf = path
        if leaf == 'kernel':  # Dense [in, out] -> [out, in]; Conv [kh, kw, 1, C] -> [C, 1, kh, kw]
            value, leaf = (value.T if value.ndim == 2 else value.transpose(3, 2, 0, 1)), 'weight'
        elif leaf == 'scale':
            leaf = 'weight'
        elif leaf == 'cls_token':
            value = value[None, None]
        state['.'.join([renamed.get(m, m) for m in modules] + [leaf])] = torch.from_numpy(
            np.ascontiguousarray(value))
    model.load_state_dict(state)


def load_flax_params(name: str, model: torch.nn.Module, params) -> None:
    """Copy pathjax's Flax parameters of model `name` into the torch module (in place)."""
    with torch.no_grad():
        if name == 'transmil':
            _load_transmil(model, params)
        elif name == 'mean':
            _copy_linear(model.mlp_hidden, params['mlp_hidden'])
            _copy_linear(model.mlp_out, params['mlp_out'])
        elif name == 'abmil':
            _copy_linear(model.patch_embed[0], params['fc'])
            for branch in ('attention_a', 'attention_b'):
                _copy_linear(getattr(model.global_attn, branch)[0], params['attention'][branch])
            _copy_linear(model.global_attn.attention_c, params['attention']['attention_c'])
            _copy_linear(model.classifier, params['classifier'])
        elif name == 'clam_sb':
            _copy_linear(model.attention_net[0], params['fc'])
            attention = model.attention_net[3]
            for branch in ('attention_a', 'attention_b'):
                _copy_linear(getattr(attention, branch)[0], params['attention'][branch])
            _copy_linear(attention.attention_c, params['attention']['attention_c'])
            _copy_linear(model.classifiers, params['classifier'])
            for c, linear in enumerate(model.instance_classifiers):
                _copy_linear(linear, params[f'instance_classifier_{c}'])
        else:
            raise ValueError(f'unknown model {name!r}')


def slide_loss(name: str, model: torch.nn.Module, features: torch.Tensor, label: torch.Tensor,
               bag_weight: float) -> torch.Tensor:
    """One slide's training loss: features [n, D] (the slide's patches, unpadded), label int64
    scalar. Cross entropy of the slide's logits; CLAM: bag_weight x it + (1 - bag_weight) x the
    instance loss (CLAM's core_utils.train_loop_clam)."""
    target = label.reshape(1)
    if name == 'abmil':
        logits = model(features[None])[0]
    elif name == 'transmil':
        logits = model(features[None])
    elif name == 'mean':
        logits = model(features)[None]
    elif name == 'clam_sb':
        logits, _, instance_loss = model(features, label)
        return bag_weight * F.cross_entropy(logits, target) + (1 - bag_weight) * instance_loss
    else:
        raise ValueError(f'unknown model {name!r}')
    return F.cross_entropy(logits, target)


def train_runner(name: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 slides: list[torch.Tensor], labels: list[torch.Tensor], bag_weight: float):
    """A zero-argument call running one train step as the MIL code runs it: one slide at a time
    (unpadded), each slide's loss / len(slides) backpropagated as it comes (gradient
    accumulation: the gradient of the mean loss over the slides), then one optimizer step.
    Returns the mean loss (float)."""
    def run() -> float:
        model.train()
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for features, label in zip(slides, labels):
            loss = slide_loss(name, model, features, label, bag_weight) / len(slides)
            loss.backward()
            total += loss.item()
        optimizer.step()
        return total
    return run
