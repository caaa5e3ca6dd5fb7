"""The input normalization of the ViT presets and its override: the presets named after timm
models use timm's default pretrained config, the others their model's; `feature_net.mean/std`
override them (checked by `normalization_problem`), reach the network and the features'
identity; the encoder then equals timm's forward of the same weights on the same uint8 images."""

import dataclasses
import json
import math
import re

import jax
import numpy as np
import pytest

from pathjax.models.patch import encoders, vit_presets
from pathjax.models.patch.feature_net import (FeatureNet, create_feature_net, normalization,
                                        normalization_problem)
from pathjax.train import extract
from pathjax.train.feature_learning import initial_params
from tests.conftest import make_config

SMALL = {'embed_dim': 96, 'num_heads': 4, 'depth': 2}  # as test_vit: reduced width and depth
PRESET = 'vit_small_patch16_224'
OTHER_MEAN, OTHER_STD = vit_presets.H_OPTIMUS_MEAN, vit_presets.H_OPTIMUS_STD
KNOWN = {(vit_presets.IMAGENET_MEAN, vit_presets.IMAGENET_STD): "ImageNet's",
         (vit_presets.INCEPTION_MEAN, vit_presets.INCEPTION_STD): '(0.5, 0.5, 0.5)',
         (vit_presets.H_OPTIMUS_MEAN, vit_presets.H_OPTIMUS_STD): "H-optimus'"}


def _timm():
    return pytest.importorskip('timm', reason='the timm checks need the test extra (timm)')


def _vit_config(**overrides):
    return make_config(**{'feature_net.backbone': PRESET, 'feature_net.learn': False,
                          **overrides})


@pytest.mark.parametrize('name', [n for n, p in vit_presets.PRESETS.items() if p.named_by_timm])
def test_timm_named_presets_normalize_as_timms_default_pretrained_cfg(name):
    timm = _timm()
    preset = vit_presets.PRESETS[name]
    cfg = timm.models.get_pretrained_cfg(name)  # the default tag's
    assert cfg is not None, f'timm has no pretrained cfg for {name}'
    assert preset.mean == tuple(cfg.mean) and preset.std == tuple(cfg.std), (
        f'{name}: {preset.mean}, {preset.std}; timm {cfg.architecture}.{cfg.tag}: {cfg.mean}, '
        f'{cfg.std}')
    assert preset.norm_from == f'timm {cfg.architecture}.{cfg.tag}'
    assert (preset.mean, preset.std) in KNOWN


@pytest.mark.parametrize('name', [n for n, p in vit_presets.PRESETS.items()
                                  if not p.named_by_timm])
def test_shape_named_presets_normalize_as_the_model_they_fit(name):
    """Virchow2 and UNI2-h (hub models, no cfg in timm's registry) normalize with ImageNet's
    statistics (timm's IMAGENET_DEFAULT_*); the preset says so."""
    timm = _timm()
    preset = vit_presets.PRESETS[name]
    assert timm.models.get_pretrained_cfg(name) is None  # not a timm name: nothing to follow
    assert vit_presets.IMAGENET_MEAN == tuple(timm.data.IMAGENET_DEFAULT_MEAN)
    assert vit_presets.IMAGENET_STD == tuple(timm.data.IMAGENET_DEFAULT_STD)
    assert (preset.mean, preset.std) == (vit_presets.IMAGENET_MEAN, vit_presets.IMAGENET_STD)
    assert "ImageNet's" in preset.fits and preset.norm_from.endswith("(ImageNet's)")
    assert preset.norm_from.split()[0] in preset.fits  # the fitted model's name


def test_named_constants_and_the_documented_overrides():
    timm = _timm()
    assert vit_presets.INCEPTION_MEAN == tuple(timm.data.IMAGENET_INCEPTION_MEAN)
    assert vit_presets.INCEPTION_STD == tuple(timm.data.IMAGENET_INCEPTION_STD)
    # Conflicts: a public model of a timm-named preset's architecture that normalizes otherwise;
    # its `fits` text gives the override.
    for name in ('vit_base_patch16_224', 'vit_large_patch16_224'):  # Phikon, UNI
        preset = vit_presets.PRESETS[name]
        assert preset.mean != vit_presets.IMAGENET_MEAN
        assert "set feature_net.mean/std to ImageNet's" in preset.fits
    h_optimus = vit_presets.PRESETS['vit_giant_patch14_reg4_dinov2'].fits
    assert f'feature_net.mean to {vit_presets.H_OPTIMUS_MEAN}' in h_optimus
    assert f'feature_net.std to {vit_presets.H_OPTIMUS_STD}' in h_optimus


def test_normalization_resolves_the_override_against_the_backbone():
    preset = vit_presets.PRESETS[PRESET]
    assert normalization(_vit_config()) == (preset.mean, preset.std)
    config = _vit_config(**{'feature_net.mean': OTHER_MEAN, 'feature_net.std': OTHER_STD})
    assert normalization(config) == (OTHER_MEAN, OTHER_STD)
    assert normalization(_vit_config(**{'feature_net.mean': [0, 1, 0.5],
                                        'feature_net.std': (1, 2, 3)})) == ((0.0, 1.0, 0.5),
                                                                            (1.0, 2.0, 3.0))
    vgg = make_config(**{'feature_net.backbone': 'vgg16'})
    assert normalization(vgg) == (vit_presets.IMAGENET_MEAN, vit_presets.IMAGENET_STD)
    model = create_feature_net(config)
    assert (model.mean, model.std) == (OTHER_MEAN, OTHER_STD)
    assert create_feature_net(vgg).mean is None  # VGG-16's own


@pytest.mark.parametrize('mean, std, problem', [
    ((0.5, 0.5), (0.5, 0.5, 0.5), r'feature_net.mean must be 3 numbers.*\(0.5, 0.5\)'),
    ((0.5, 0.5, 0.5), (), r'feature_net.std must be 3 numbers.*got \(\)'),
    ((), (0.5, 0.5, 0.5), r'feature_net.mean must be 3 numbers.*got \(\)'),
    ((0.5, 0.5, 0.5), (0.5, 0.0, 0.5), r'feature_net.std must be > 0'),
    ((0.5, 0.5, 0.5), (0.5, -0.1, 0.5), r'feature_net.std must be > 0'),
    ((0.5, math.nan, 0.5), (0.5, 0.5, 0.5), r'feature_net.mean must be finite'),
    ((0.5, 0.5, 0.5), (0.5, math.inf, 0.5), r'feature_net.std must be finite'),
    ((0.5, 1.5, 0.5), (0.5, 0.5, 0.5), r'feature_net.mean must lie in \[0, 1\]'),
    ((124.0, 116.0, 104.0), (58.0, 57.0, 57.0), r'feature_net.mean must lie in \[0, 1\]'),
    (('0.5', 0.5, 0.5), (0.5, 0.5, 0.5), r'feature_net.mean must be numbers'),
], ids=['mean of 2', 'std empty', 'mean empty', 'std 0', 'std < 0', 'mean NaN', 'std inf',
        'mean > 1', 'in [0, 255]', 'a string'])
def test_normalization_problem_refuses_bad_values(mean, std, problem):
    config = _vit_config(**{'feature_net.mean': (), 'feature_net.std': ()})
    config.feature_net.mean, config.feature_net.std = mean, std  # past the ConfigDict's types
    assert re.search(problem, normalization_problem(config))
    with pytest.raises(ValueError, match=problem):
        normalization(config)
    with pytest.raises(ValueError, match=problem):
        create_feature_net(config)


def test_normalization_problem_accepts_good_values_and_vgg_takes_none():
    assert normalization_problem(_vit_config()) == ''
    assert normalization_problem(_vit_config(**{'feature_net.mean': (0.0, 1.0, 0.5),
                                                'feature_net.std': (1e-3, 1.0, 10.0)})) == ''
    vgg = make_config(**{'feature_net.backbone': 'vgg16'})
    assert normalization_problem(vgg) == ''
    vgg.feature_net.mean, vgg.feature_net.std = OTHER_MEAN, OTHER_STD
    assert 'are for ViT presets' in normalization_problem(vgg)
    with pytest.raises(ValueError, match='VGG-16 normalizes with ImageNet'):
        jax.eval_shape(FeatureNet(num_classes=2, width=0.125, mean=OTHER_MEAN).init,
                       jax.random.key(0), np.zeros((1, 32, 32, 3), np.uint8))


def test_a_config_without_the_fields_means_the_presets():
    config = _vit_config()  # as a config written before the fields
    with config.unlocked():
        del config.feature_net['mean'], config.feature_net['std']
    preset = vit_presets.PRESETS[PRESET]
    assert normalization_problem(config) == ''
    assert normalization(config) == (preset.mean, preset.std)


def test_network_identity_records_the_normalization():
    params = {'w': np.arange(4, dtype=np.float32)}
    source = {'checkpoint': 'initial'}
    default = extract.network_identity(_vit_config(), params, source)
    preset = vit_presets.PRESETS[PRESET]
    assert json.loads(default)['normalization'] == {'mean': list(preset.mean),
                                                    'std': list(preset.std)}
    same = _vit_config(**{'feature_net.mean': preset.mean, 'feature_net.std': preset.std})
    assert extract.network_identity(same, params, source) == default  # the same normalization
    other = _vit_config(**{'feature_net.mean': OTHER_MEAN, 'feature_net.std': OTHER_STD})
    changed = extract.network_identity(other, params, source)
    assert changed != default
    assert json.loads(changed)['normalization'] == {'mean': list(OTHER_MEAN),
                                                    'std': list(OTHER_STD)}
    only_std = _vit_config(**{'feature_net.mean': preset.mean, 'feature_net.std': OTHER_STD})
    assert extract.network_identity(only_std, params, source) not in (default, changed)
    vgg = extract.network_identity(make_config(**{'feature_net.backbone': 'vgg16'}), params,
                                   source)
    assert 'normalization' not in json.loads(vgg)  # fixed: VGG-16's identities are unchanged


# timm parity: a small vit_small_patch16_224 (SMALL) with random weights in a file.

@pytest.fixture
def small_weights(tmp_path, monkeypatch):
    """(timm model, .safetensors path) of the SMALL preset, installed as PRESET."""
    torch = pytest.importorskip('torch', reason='the timm parity tests need torch')
    timm = _timm()
    from safetensors.torch import save_file
    full = vit_presets.PRESETS[PRESET]
    preset = dataclasses.replace(full, arch=dataclasses.replace(full.arch, **SMALL))
    monkeypatch.setitem(vit_presets.PRESETS, PRESET, preset)
    torch.manual_seed(0)
    model = timm.create_model(PRESET, pretrained=False,
                              **vit_presets.timm_kwargs(preset, **SMALL)).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from timm's init
            parameter.normal_(0, 0.05)
    path = tmp_path / 'vit_s.safetensors'
    save_file(model.state_dict(), path)
    return model, path


def _timm_class_token(model, images: np.ndarray, mean, std) -> np.ndarray:
    """timm's forward of uint8 [B, H, W, 3] images normalized with mean and std (float64 then
    float32, independent of pathjax): the class token after the final norm."""
    import torch
    x = ((images.astype(np.float64) / 255.0 - np.asarray(mean)) / np.asarray(std))
    with torch.no_grad():
        tokens = model.forward_features(
            torch.from_numpy(x.astype(np.float32)).permute(0, 3, 1, 2))
    return tokens[:, 0].numpy()


def test_the_default_normalization_is_timms_for_its_weights(small_weights):
    """The bug this fixes: pathjax's encoder and timm's own forward of the same weights, each
    with its default normalization (timm's: the model's pretrained_cfg), on the same images."""
    timm = _timm()
    model, path = small_weights
    data = timm.data.resolve_data_config({}, model=model)
    images = np.random.default_rng(0).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    expected = _timm_class_token(model, images, data['mean'], data['std'])
    assert (data['mean'], data['std']) == ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))  # augreg's
    features = np.asarray(encoders.load_encoder(PRESET, path)(images))
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)
    imagenet = _timm_class_token(model, images, vit_presets.IMAGENET_MEAN,
                                 vit_presets.IMAGENET_STD)  # the preset's before
    assert np.abs(features - imagenet).max() > 20 * 1e-4


def test_the_override_reaches_the_features(small_weights):
    """feature_net.mean/std: the feature network built from the config, and load_encoder given
    the same values, equal timm's forward of the same weights with that normalization."""
    model, path = small_weights
    images = np.random.default_rng(1).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    expected = _timm_class_token(model, images, OTHER_MEAN, OTHER_STD)
    config = _vit_config(**{'feature_net.weights': str(path), 'feature_net.mean': OTHER_MEAN,
                            'feature_net.std': OTHER_STD})
    net = create_feature_net(config)
    params = initial_params(net, config, 224)
    features = jax.jit(lambda p, x: net.apply({'params': p}, x, method=FeatureNet.features))(
        params, images)
    np.testing.assert_allclose(np.asarray(features), expected, rtol=0, atol=1e-4)
    encoder = encoders.load_encoder(PRESET, path, mean=OTHER_MEAN, std=OTHER_STD)
    np.testing.assert_allclose(np.asarray(encoder(images)), expected, rtol=0, atol=1e-4)
    default = encoders.load_encoder(PRESET, path)
    assert encoder.identity != default.identity
    assert encoder.identity.startswith(f'{PRESET}:vit_s.safetensors:')
    assert np.abs(np.asarray(default(images)) - expected).max() > 20 * 1e-4  # it matters
