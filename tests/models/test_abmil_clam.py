"""ABMIL and CLAM single-branch: parity with the authors' PyTorch code, padding invariance, the
batched (vmapped) contract, few-patch slides and bfloat16 compute."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from benchmarks.torch_slide_baselines import CLAM_SB, TorchABMIL
from pathjax.data import graphs
from pathjax.models.slide import factory
from pathjax.models.slide.abmil import ABMIL
from pathjax.models.slide.clam import CLAMSingleBranch

DIM, CLASSES = 24, 3


# The authors' modules (MIL-Lab ABMIL @ dfc3c17, CLAM's CLAM_SB @ 53e2409), shared with the
# benchmark: benchmarks/torch_slide_baselines.py.


# --- Helpers. --------------------------------------------------------------------------------

def features(count, seed=0):
    return np.random.default_rng(seed).normal(size=(count, DIM)).astype(np.float32)


def padded(slide_features, nodes):
    count = len(slide_features)
    graph = graphs.slide_graph(slide_features, np.zeros((count, 2), np.int32),
                               np.zeros(0, np.int32), np.zeros(0, np.int32))
    return graphs.pad_graph(graph, nodes, 8)


def parameters(model, graph, seed=0):
    """Random float32 parameters of the model's shapes, biases nonzero (their copy is tested too);
    no initializer is compiled (fast)."""
    rng = np.random.default_rng(seed)

    def draw(path, leaf):
        scale = 1 / np.sqrt(leaf.shape[0]) if path[-1].key == 'kernel' else 0.1
        return (scale * rng.normal(size=leaf.shape)).astype(np.float32)

    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), graph))['params']
    return jax.tree_util.tree_map_with_path(draw, shapes)


def copy_linear(linear, dense):
    """Flax Dense params -> torch Linear (weight = kernel.T)."""
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(dense['kernel']).T.copy()))
        linear.bias.copy_(torch.from_numpy(np.asarray(dense['bias'])))


def torch_abmil(params):
    model = TorchABMIL(DIM, 512, 256, 0.25, CLASSES).eval()
    copy_linear(model.patch_embed[0], params['fc'])
    for name in ('attention_a', 'attention_b'):
        copy_linear(getattr(model.global_attn, name)[0], params['attention'][name])
    copy_linear(model.global_attn.attention_c, params['attention']['attention_c'])
    copy_linear(model.classifier, params['classifier'])
    return model


def torch_clam(params, k_sample):
    model = CLAM_SB(DIM, (512, 256), 0.25, k_sample, CLASSES).eval()
    copy_linear(model.attention_net[0], params['fc'])
    attention = model.attention_net[3]
    for name in ('attention_a', 'attention_b'):
        copy_linear(getattr(attention, name)[0], params['attention'][name])
    copy_linear(attention.attention_c, params['attention']['attention_c'])
    copy_linear(model.classifiers, params['classifier'])
    for c, linear in enumerate(model.instance_classifiers):
        copy_linear(linear, params[f'instance_classifier_{c}'])
    return model


def run(model, params, graph, labels=None):
    """-> (logits, weights, instance loss or None) for one slide, eval mode."""
    (logits, weights), state = model.apply({'params': params}, graph, True, labels,
                                           mutable=['losses'])
    losses = state.get('losses', {}).get('instance')
    return logits, weights, None if losses is None else losses[0]


# --- Tests. ----------------------------------------------------------------------------------

def test_abmil_matches_mil_lab():
    slide = features(37)
    model = ABMIL(num_classes=CLASSES)
    params = parameters(model, padded(slide, 64), seed=0)
    logits, weights, _ = run(model, params, padded(slide, 64))
    with torch.no_grad():
        expected, raw = torch_abmil(params)(torch.from_numpy(slide)[None])
    np.testing.assert_allclose(logits, expected[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(weights[:37], F.softmax(raw, -1)[0, 0].numpy(), rtol=0, atol=1e-5)
    assert np.all(np.asarray(weights[37:]) == 0)


@pytest.mark.parametrize('count, torch_k', [(37, 8), (11, 5), (2, 1)])
def test_clam_matches_clam_including_the_instance_loss(count, torch_k):
    """37 patches: CLAM itself (k_sample=8). Fewer than 2 * 8 valid patches (CLAM fails or labels
    patches twice): CLAM with k_sample = valid // 2."""
    slide = features(count, seed=count)
    model = CLAMSingleBranch(num_classes=CLASSES)
    params = parameters(model, padded(slide, 64), seed=1)
    logits, weights, loss = run(model, params, padded(slide, 64), labels=2)
    with torch.no_grad():
        expected, raw, expected_loss = torch_clam(params, torch_k)(torch.from_numpy(slide),
                                                                   torch.tensor(2))
    np.testing.assert_allclose(logits, expected[0].numpy(), rtol=0, atol=1e-5)
    np.testing.assert_allclose(weights[:count], F.softmax(raw, 1)[0].numpy(), rtol=0, atol=1e-5)
    assert loss.dtype == jnp.float32 and abs(float(loss) - float(expected_loss)) <= 1e-5


@pytest.mark.parametrize('model', [ABMIL(num_classes=CLASSES, d_model=32, attention_hidden=16),
                                   CLAMSingleBranch(num_classes=CLASSES, d_model=32,
                                                    attention_hidden=16)])
def test_padding_changes_nothing(model):
    slide = features(37, seed=3)
    params = parameters(model, padded(slide, 64), seed=2)
    small = run(model, params, padded(slide, 64), labels=1)
    large = run(model, params, padded(slide, 128), labels=1)
    np.testing.assert_allclose(large[0], small[0], rtol=0, atol=1e-6)
    np.testing.assert_allclose(large[1][:37], small[1][:37], rtol=0, atol=1e-7)
    assert np.all(np.asarray(large[1][37:]) == 0) and float(large[1].sum()) == pytest.approx(1.0)
    if isinstance(model, CLAMSingleBranch):
        assert float(large[2]) == pytest.approx(float(small[2]), abs=1e-6)


def test_tied_attention_scores_still_give_disjoint_picks():
    """All scores equal (attention_c's kernel 0): the top picks are the first valid // 2 patches,
    the bottom picks the last valid // 2, none of them twice."""
    model = CLAMSingleBranch(num_classes=CLASSES, d_model=32, attention_hidden=16)
    graph = padded(features(11, seed=7), 64)
    params = parameters(model, graph)
    params['attention']['attention_c']['kernel'] = np.zeros_like(
        params['attention']['attention_c']['kernel'])
    (_, weights), state = model.apply({'params': params}, graph, True, 1,
                                      mutable=['losses', 'intermediates'])
    nodes = np.asarray(state['intermediates']['pooling_input'][0])
    classifier = params['instance_classifier_1']
    logits = np.concatenate([nodes[:5], nodes[6:11]]) @ classifier['kernel'] + classifier['bias']
    expected = F.cross_entropy(torch.from_numpy(logits), torch.tensor([1] * 5 + [0] * 5))
    np.testing.assert_allclose(weights[:11], 1 / 11, rtol=1e-6)
    assert float(state['losses']['instance'][0]) == pytest.approx(float(expected), abs=1e-5)


def test_a_slide_of_one_valid_patch_has_no_instance_loss():
    model = CLAMSingleBranch(num_classes=CLASSES, d_model=32, attention_hidden=16)
    params = parameters(model, padded(features(1), 64), seed=0)
    assert float(run(model, params, padded(features(1), 64), labels=0)[2]) == 0.0


@pytest.mark.parametrize('module', [ABMIL, CLAMSingleBranch])
def test_batched_slides_with_and_without_labels(module):
    settings = dict(num_classes=CLASSES, d_model=32, attention_hidden=16)
    if module is CLAMSingleBranch:
        settings['k_sample'] = 4
    batched = factory.batched(module)(**settings)  # as the slide stage runs it
    slides = [features(37, seed=4), features(5, seed=5), features(0)]
    batch = graphs.stack_graphs([padded(slide, 64) for slide in slides])
    labels = jnp.array([0, 2, 1])
    single = module(**settings)
    params = parameters(single, padded(slides[0], 64))
    # Initialized batched and without labels, it has the same parameters (instance classifiers too).
    shapes = jax.eval_shape(lambda: batched.init(jax.random.key(0), batch, True, None))['params']
    assert jax.tree.structure(shapes) == jax.tree.structure(params)
    (logits, weights), state = batched.apply({'params': params}, batch, True, labels,
                                             mutable=['losses', 'intermediates'])
    assert logits.shape == (3, CLASSES) and weights.shape == (3, 64)
    assert state['intermediates']['pooling_input'][0].shape == (3, 64, 32)
    for index, slide in enumerate(slides):
        expected = run(single, params, padded(slide, 64), labels=int(labels[index]))
        np.testing.assert_allclose(logits[index], expected[0], rtol=0, atol=1e-6)
        np.testing.assert_allclose(weights[index], expected[1], rtol=0, atol=1e-7)
        if module is CLAMSingleBranch:
            np.testing.assert_allclose(state['losses']['instance'][0][index], expected[2],
                                       rtol=0, atol=1e-6)
    if module is ABMIL:
        assert 'losses' not in state
    assert np.all(np.asarray(weights[2]) == 0)
    (unlabelled, _), state = batched.apply({'params': params}, batch, True, None,
                                           mutable=['losses'])
    np.testing.assert_allclose(unlabelled, logits, rtol=0, atol=1e-6)
    assert 'losses' not in state
    (trained, _), _ = batched.apply({'params': params}, batch, False, labels, mutable=['losses'],
                                    rngs={'dropout': jax.random.key(1)})
    assert bool(jnp.isfinite(trained).all())


@pytest.mark.parametrize('module', [ABMIL, CLAMSingleBranch])
@pytest.mark.parametrize('count', [1, 0])
def test_gradients_are_finite_with_one_or_no_valid_patch(module, count):
    model = module(num_classes=CLASSES, d_model=32, attention_hidden=16)
    graph = padded(features(count), 64)
    params = parameters(model, graph, seed=0)

    def objective(p):
        logits, _, loss = run(model, p, graph, labels=1)
        return logits.sum() + (0.0 if loss is None else loss)

    value, gradients = jax.value_and_grad(objective)(params)
    assert bool(jnp.isfinite(value))
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(gradients))


@pytest.mark.parametrize('module', [ABMIL, CLAMSingleBranch])
def test_bfloat16_compute_stays_close_to_float32(module):
    graph = padded(features(37, seed=6), 64)
    single, half = module(num_classes=CLASSES), module(num_classes=CLASSES, dtype=jnp.bfloat16)
    params = parameters(single, graph)
    shapes = jax.eval_shape(lambda: half.init(jax.random.key(0), graph))['params']
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(shapes))
    reference, reference_weights, reference_loss = run(single, params, graph, labels=1)
    logits, weights, loss = run(half, params, graph, labels=1)
    assert logits.dtype == weights.dtype == jnp.float32
    np.testing.assert_allclose(logits, reference, rtol=0, atol=5e-2)
    np.testing.assert_allclose(weights, reference_weights, rtol=0, atol=5e-3)
    if module is CLAMSingleBranch:
        assert loss.dtype == jnp.float32 and abs(float(loss) - float(reference_loss)) < 5e-2
