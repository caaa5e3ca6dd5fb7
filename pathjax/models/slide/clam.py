"""CLAM single-branch: ABMIL plus an instance clustering loss (Lu et al., Nature Biomedical
Engineering 2021).

The network is ABMIL's (fc -> gated attention -> attention pooling -> bag classifier) plus one
instance classifier Dense(2) per class. In training, the slide's `k_sample` most and least attended
valid patches go to its class's instance classifier with instance labels 1 and 0; the instance
loss is their mean cross entropy, sown under `losses/instance` (the caller weighs it against the
bag cross entropy with bag_weight, 0.7 in CLAM). Code followed: mahmoodlab/CLAM
models/model_clam.py (CLAM_SB, inst_eval) at commit 53e2409d4a8189c682c173382964a85f114f923c, with
`subtyping=False` (no out-of-class branch) and CLAM's default instance loss: main.py's
`--inst_loss` defaults to None, which utils/core_utils.py maps to nn.CrossEntropyLoss (SmoothTop1SVM
only for 'svm').

Slides with fewer than 2 * k_sample valid patches, where CLAM fails (torch.topk with k > N) or
labels the same patches 1 and 0: each side takes valid // 2 patches, so the picks are valid and
disjoint (CLAM's inst_eval with k_sample = valid // 2; an odd count leaves the median out), and a
slide of 0 or 1 valid patches has loss 0.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import jraph

from pathjax.models.slide.abmil import ABMIL


class CLAMSingleBranch(ABMIL):
    """One slide graph -> (logits [C] float32, attention weights [N] float32); with `labels`,
    sows the instance loss (scalar float32) under `losses/instance`."""

    k_sample: int = 8

    @nn.compact
    def __call__(self, graph: jraph.GraphsTuple, deterministic: bool = True, labels=None):
        """labels: this slide's class (int scalar) in training, else None."""
        nodes, scores, weights = self.attend(graph, deterministic)
        logits = self.classify(nodes, weights)
        # Initialization creates the instance classifiers even without a label.
        if labels is not None or self.is_initializing():
            loss = self.instance_loss(nodes, scores, graph.nodes['mask'],
                                      0 if labels is None else labels)
            if labels is not None:
                self.sow('losses', 'instance', loss)
        return logits, weights

    def instance_loss(self, nodes: jax.Array, scores: jax.Array, mask: jax.Array,
                      label) -> jax.Array:
        """inst_eval for the in-class branch. nodes [N, D], raw attention scores [N], mask [N],
        label int -> mean cross entropy (float32) over the picked patches."""
        size = scores.shape[0]
        k = min(self.k_sample, size)
        scores = jax.lax.stop_gradient(scores)
        top = jax.lax.top_k(jnp.where(mask, scores, -jnp.inf), k)[1]
        # top_k breaks ties to the lower index; on the reversed array the k lowest break ties to
        # the higher index: exactly the reverse of top's order, so the first valid // 2 of each
        # are disjoint.
        bottom = size - 1 - jax.lax.top_k(jnp.where(mask, -scores, -jnp.inf)[::-1], k)[1]
        keep = jnp.tile(jnp.arange(k) < jnp.minimum(k, mask.sum() // 2), 2)
        targets = jnp.concatenate([jnp.ones(k, jnp.int32), jnp.zeros(k, jnp.int32)])
        instances = nodes[jnp.concatenate([top, bottom])].astype(jnp.float32)
        logits = jnp.stack([
            nn.Dense(2, dtype=jnp.float32, name=f'instance_classifier_{c}')(instances)
            for c in range(self.num_classes)])[label]
        cross_entropy = -jnp.take_along_axis(jax.nn.log_softmax(logits), targets[:, None],
                                             axis=1)[:, 0]
        return jnp.where(keep, cross_entropy, 0.0).sum() / jnp.maximum(keep.sum(), 1)
