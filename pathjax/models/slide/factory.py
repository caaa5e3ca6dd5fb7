"""The one place a slide model is chosen: `slide_net.model` names it, `create_slide_model` builds
it from the config, mapped over a batch of padded slides.

Every slide model takes one padded slide graph (`graphs.slide_graph`), `deterministic` and the
slide's label (None outside training), and returns (logits [C] float32, per-patch scores [N]);
it sows its per-patch representation before pooling as `intermediates/pooling_input` (with a
`perturbations` hook of the same name: per-patch contributions) and, when it has an auxiliary
loss, sows it under `losses` (training weighs it against the slide's cross entropy with
`slide_net.bag_weight`). Its scores are attention weights (heatmaps) when
`scores_are_attention`; otherwise heatmaps show per-patch contributions.
"""

from typing import Any

import flax.linen as nn

from pathjax.models.compute_dtype import compute_dtype
from pathjax.models.slide.abmil import ABMIL
from pathjax.models.slide.clam import CLAMSingleBranch
from pathjax.models.slide.graph_transformer import SlideTransformer
from pathjax.models.slide.mean_pool import MeanPool
from pathjax.models.slide.transmil import TransMIL

MODELS = ('graph_transformer', 'abmil', 'transmil', 'clam_sb', 'mean')
AUXILIARY_LOSS = ('clam_sb',)  # models that sow a `losses` collection in training


def batched(model: type[nn.Module]) -> type[nn.Module]:
    """`model` over slides on a leading axis: parameters shared, an independent dropout stream
    per slide; the label is batched (or None)."""
    return nn.vmap(model, in_axes=(0, None, 0), out_axes=0,
                   variable_axes={'params': None, 'intermediates': 0, 'perturbations': 0,
                                  'losses': 0},
                   split_rngs={'params': False, 'dropout': True})


def model_arguments(net, num_classes: int, dtype: Any) -> tuple[type[nn.Module], dict]:
    """(the slide model's class, its keyword arguments) for `config.slide_net` (`net`)."""
    common = {'num_classes': num_classes, 'dropout': net.dropout, 'dtype': dtype}
    if net.model == 'graph_transformer':
        return SlideTransformer, dict(
            common, d_model=net.d_model, num_heads=net.heads,
            transformer_layers=net.transformer_layers, gcn_layers=net.gcn_layers,
            attention=net.attention, pooling=net.pooling, mlp_hidden=net.mlp_hidden,
            position_encoding=net.position_encoding)
    if net.model == 'abmil':
        return ABMIL, dict(common, d_model=net.d_model, attention_hidden=net.mlp_hidden)
    if net.model == 'clam_sb':
        return CLAMSingleBranch, dict(common, d_model=net.d_model,
                                      attention_hidden=net.mlp_hidden, k_sample=net.instance_k)
    if net.model == 'transmil':
        return TransMIL, dict(common, d_model=net.d_model, heads=net.heads)
    if net.model == 'mean':
        return MeanPool, dict(common, mlp_hidden=net.mlp_hidden)
    raise ValueError(f'slide_net.model must be one of {", ".join(MODELS)}, got {net.model!r}')


def create_slide_model(config, num_classes: int) -> nn.Module:
    """The batched slide model described by `config.slide_net` and `config.dtype`."""
    model, arguments = model_arguments(config.slide_net, num_classes, compute_dtype(config))
    return batched(model)(**arguments)


def scores_are_attention(net) -> bool:
    """True when the model's per-patch scores are attention weights (heatmaps show them);
    otherwise heatmaps show each patch's contribution to the predicted class."""
    if net.model == 'graph_transformer':
        return net.pooling == 'gated'
    return net.model in ('abmil', 'clam_sb')
