"""The Flax ViT against timm's: every preset at reduced depth and width with random weights, the
full-size parameter counts, position-embedding resampling, weight files and their errors."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models.patch import encoders, vit_presets, vit_weights
from pathjax.models.patch.pretrained import PretrainedWeightsError
from pathjax.models.patch.vit import VisionTransformer, resample_pos_embed

torch = pytest.importorskip('torch', reason='the timm parity tests need the test extra (torch)')
timm = pytest.importorskip('timm', reason='the timm parity tests need the test extra (timm)')

SMALL = {'embed_dim': 96, 'num_heads': 4, 'depth': 2}  # reduced width (head size 24) and depth


def small_preset(preset):
    return dataclasses.replace(preset, arch=dataclasses.replace(preset.arch, **SMALL))


def timm_model(preset, **overrides):
    """timm's network of the preset (SMALL unless overridden), random weights, eval mode."""
    torch.manual_seed(0)
    model = timm.create_model(preset.timm_name, pretrained=False,
                              **vit_presets.timm_kwargs(preset, **{**SMALL, **overrides})).eval()
    with torch.no_grad():
        for parameter in model.parameters():  # away from timm's init (LayerScale 1e-5, zeros)
            parameter.normal_(0, 0.05)
    return model


def timm_features(model, preset, images: np.ndarray) -> np.ndarray:
    """The preset's output recipe on timm's tokens (after the final norm), images normalized
    [B, H, W, 3]."""
    with torch.no_grad():
        tokens = model.forward_features(torch.from_numpy(np.array(images)).permute(0, 3, 1, 2))
        tokens = tokens.numpy()
    patches = tokens[:, preset.arch.prefix_tokens:].mean(axis=1)
    return {'class': tokens[:, 0], 'mean': patches,
            'class+mean': np.concatenate([tokens[:, 0], patches], axis=-1)}[preset.arch.output]


def state_dict(model) -> dict[str, np.ndarray]:
    return {key: value.numpy() for key, value in model.state_dict().items()}


@pytest.mark.parametrize('name', list(vit_presets.PRESETS))
def test_preset_matches_timm(name):
    preset = small_preset(vit_presets.PRESETS[name])
    model = timm_model(preset)
    params = vit_weights.convert(preset, state_dict(model), 'timm')
    images = np.random.default_rng(1).normal(size=(2, 224, 224, 3)).astype(np.float32)
    expected = timm_features(model, preset, images)
    features = np.asarray(jax.jit(VisionTransformer(preset.arch).apply)({'params': params},
                                                                        images))
    assert features.shape == (2, preset.arch.feature_dim) == expected.shape
    np.testing.assert_allclose(features, expected, rtol=0, atol=1e-4)


@pytest.mark.parametrize('name', list(vit_presets.PRESETS))
def test_full_size_parameter_count_matches_timm(name):
    preset = vit_presets.PRESETS[name]
    with torch.device('meta'):  # shapes only, nothing allocated
        model = timm.create_model(preset.timm_name, pretrained=False,
                                  **vit_presets.timm_kwargs(preset))
    expected = sum(p.numel() for p in model.parameters())
    ours = sum(math.prod(leaf.shape) for leaf in
               jax.tree.leaves(vit_weights.abstract_params(preset)))
    assert ours == expected
    assert set(vit_weights.expected_keys(preset)) == set(model.state_dict())


@pytest.mark.parametrize('old, new, prefix', [(37, 16, 0), (14, 16, 1), (16, 16, 5), (16, 9, 1)])
def test_position_embedding_resampling_matches_timm(old, new, prefix):
    from timm.layers import resample_abs_pos_embed
    pos_embed = np.random.default_rng(2).normal(size=(1, prefix + old * old, 8)).astype(np.float32)
    expected = resample_abs_pos_embed(torch.from_numpy(pos_embed), new_size=(new, new),
                                      num_prefix_tokens=prefix).numpy()
    resampled = resample_pos_embed(pos_embed, (new, new), prefix)
    assert resampled.shape == (1, prefix + new * new, 8)
    np.testing.assert_allclose(resampled, expected, rtol=0, atol=2e-5)


def test_dinov2_weights_for_518_px_load_at_224(tmp_path):
    """A DINOv2 file's 37 x 37 position embeddings are resampled to the preset's 16 x 16, and the
    encoder then equals timm's model made for 224 px from the same file (timm resamples when it
    loads a checkpoint into a model of another size)."""
    from safetensors.torch import save_file
    preset = small_preset(vit_presets.PRESETS['vit_small_patch14_reg4_dinov2'])
    trained_at_518 = timm_model(preset, img_size=518)
    path = tmp_path / 'dinov2.safetensors'
    save_file(trained_at_518.state_dict(), path)
    at_224 = timm_model(preset)
    from timm.models.vision_transformer import checkpoint_filter_fn
    at_224.load_state_dict(checkpoint_filter_fn(trained_at_518.state_dict(), at_224))
    images = np.random.default_rng(3).integers(0, 256, (2, 224, 224, 3), dtype=np.uint8)
    normalized = np.asarray(encoders.normalize(images, preset.mean, preset.std))
    params = jax.tree.map(jnp.asarray, vit_weights.load_params(preset, path))
    encoder = encoders.Encoder(preset, params, 'test')
    np.testing.assert_allclose(np.asarray(encoder(images)),
                               timm_features(at_224, preset, normalized), rtol=0, atol=1e-4)


@pytest.mark.parametrize('suffix', ['.safetensors', '.pth', '.npz'])
def test_load_encoder_from_each_file_format(tmp_path, suffix, monkeypatch):
    preset = vit_presets.PRESETS['vit_small_patch16_224']
    monkeypatch.setitem(vit_presets.PRESETS, preset.name, small_preset(preset))
    model = timm_model(small_preset(preset))
    path = tmp_path / f'weights{suffix}'
    if suffix == '.safetensors':
        from safetensors.torch import save_file
        save_file(model.state_dict(), path)
    elif suffix == '.pth':
        torch.save(model.state_dict(), path)
    else:
        np.savez(path, **state_dict(model))
    encoder = encoders.load_encoder(preset.name, path)
    images = np.random.default_rng(4).integers(0, 256, (3, 224, 224, 3), dtype=np.uint8)
    normalized = np.asarray(encoders.normalize(images, preset.mean, preset.std))
    np.testing.assert_allclose(np.asarray(encoder(images)),
                               timm_features(model, preset, normalized), rtol=0, atol=1e-4)
    assert encoder.identity.startswith(f'{preset.name}:weights{suffix}:')
    with pytest.raises(ValueError, match=r'takes \[B, 224, 224, 3\]'):
        encoder(images[:, :112, :112])


def test_a_wrong_file_is_refused_with_what_is_wrong_and_what_fits(tmp_path):
    dinov2 = small_preset(vit_presets.PRESETS['vit_small_patch14_reg4_dinov2'])
    weights = state_dict(timm_model(dinov2))
    other = small_preset(vit_presets.PRESETS['vit_small_patch16_224'])
    with pytest.raises(PretrainedWeightsError) as refused:
        vit_weights.convert(other, weights, 'dino.safetensors')
    message = str(refused.value)
    assert 'dino.safetensors is not a vit_small_patch16_224' in message
    assert 'unexpected' in message and 'reg_token' in message and 'blocks.0.ls1.gamma' in message
    assert "patch_embed.proj.weight (96, 3, 14, 14) (expected (96, 3, 16, 16))" in message
    assert 'fits preset(s)' not in message  # the full-size presets do not fit a small file
    damaged = dict(weights)
    del damaged['norm.weight']
    damaged['head.weight'] = np.zeros((2, 96), np.float32)
    with pytest.raises(PretrainedWeightsError, match=r'missing \(1\): norm.weight.*unexpected '
                                                     r'\(1\): head.weight'):
        vit_weights.convert(dinov2, damaged, 'x')
    full = vit_presets.PRESETS['vit_small_patch16_224']
    with torch.device('meta'):
        meta = timm.create_model(full.timm_name, **vit_presets.timm_kwargs(full))
    fake = {k: np.broadcast_to(np.float32(0), tuple(v.shape)) for k, v in meta.state_dict().items()}
    fake.pop('cls_token')
    with pytest.raises(PretrainedWeightsError, match='fits no preset') as refused:
        vit_weights.convert(vit_presets.PRESETS['vit_base_patch16_224'], fake, 'small.pth')
    assert 'mis-shaped' in str(refused.value)
    fake['cls_token'] = np.zeros((1, 1, 384), np.float32)
    with pytest.raises(PretrainedWeightsError, match=r'fits preset\(s\) vit_small_patch16_224'):
        vit_weights.convert(vit_presets.PRESETS['vit_base_patch16_224'], fake, 'small.pth')
    (tmp_path / 'broken.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{not json')
    with pytest.raises(PretrainedWeightsError, match='cannot read as .safetensors'):
        encoders.load_encoder('vit_small_patch16_224', tmp_path / 'broken.safetensors')
    with pytest.raises(ValueError, match='unknown ViT preset'):
        encoders.load_encoder('vit_tiny', None)


def test_converter_writes_a_torch_free_npz_of_a_checked_vit_file(tmp_path, monkeypatch):
    from pathjax.models.patch import pretrained
    preset = vit_presets.PRESETS['vit_small_patch16_224']
    monkeypatch.setitem(vit_presets.PRESETS, preset.name, small_preset(preset))
    model = timm_model(small_preset(preset))
    source, target = tmp_path / 'model.bin', tmp_path / 'model.npz'
    torch.save(model.state_dict(), source)
    assert pretrained.main(['pretrained', str(source), str(target), preset.name]) == 0
    written = dict(np.load(target))
    assert sorted(written) == sorted(model.state_dict())
    np.testing.assert_array_equal(written['pos_embed'], model.state_dict()['pos_embed'].numpy())
    # A file of another preset is refused and nothing is written.
    assert pretrained.main(['pretrained', str(source), str(tmp_path / 'x.npz'),
                            'vit_small_patch14_reg4_dinov2']) == 2
    assert not (tmp_path / 'x.npz').exists()
