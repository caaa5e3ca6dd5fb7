"""ImageNet VGG-16 weights in torchvision layout -> the Flax trunk, vs numpy and torch forwards;
hostile weight files, the check of a file against a backbone, the converter."""

import contextlib
import dataclasses
import json
import math
import pathlib
import struct
import subprocess
import sys
import tracemalloc
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pathjax.models.patch import pretrained, vit_presets, vit_weights
from pathjax.models.patch.feature_net import FeatureNet
from pathjax.models.patch.pretrained import PretrainedWeightsError
from pathjax.models.patch.vgg import VGG16
from pathjax.models.patch.weight_files import open_weights

# torchvision's vgg16 (config 'D'), written out here so the test does not trust pathjax's tables.
CFG = (64, 64, 'M', 128, 128, 'M', 256, 256, 256, 'M', 512, 512, 512, 'M', 512, 512, 512, 'M')
CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
CONV_NAMES = ('conv1_1', 'conv1_2', 'conv2_1', 'conv2_2', 'conv3_1', 'conv3_2', 'conv3_3',
              'conv4_1', 'conv4_2', 'conv4_3', 'conv5_1', 'conv5_2', 'conv5_3')
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])

_apply = jax.jit(VGG16().apply)


def _conv_shapes():
    """[(torchvision index, out, in)] for the 13 convs."""
    shapes, c_in, index = [], 3, 0
    for v in CFG:
        if v == 'M':
            index += 1
        else:
            shapes.append((index, v, c_in))
            c_in, index = v, index + 2
    return shapes


def _random_state_dict(seed: int) -> dict[str, np.ndarray]:
    """He-normal weights in torchvision layout (activations stay O(1) through 13 layers)."""
    rng = np.random.default_rng(seed)
    state = {}
    for index, c_out, c_in in _conv_shapes():
        std = np.sqrt(2.0 / (9 * c_in))
        weight = rng.standard_normal((c_out, c_in, 3, 3)) * std
        state[f'features.{index}.weight'] = weight.astype(np.float32)
        state[f'features.{index}.bias'] = (rng.standard_normal(c_out) * 0.05).astype(np.float32)
    state['classifier.0.weight'] = rng.standard_normal((10, 512)).astype(np.float32)  # ignored
    state['classifier.0.bias'] = np.zeros(10, np.float32)
    return state


def _conv3x3(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """x [B, H, W, C], torch weight [O, C, 3, 3] -> [B, H, W, O]; stride 1, padding 1 (im2col)."""
    _, h, w, _ = x.shape
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    patches = np.stack([padded[:, i:i + h, j:j + w] for i in range(3) for j in range(3)], axis=3)
    kernel = weight.transpose(0, 2, 3, 1).reshape(weight.shape[0], 9, weight.shape[1])  # [O, 9, C]
    return np.einsum('bhwkc,okc->bhwo', patches, kernel)


def _reference_forward(state: dict[str, np.ndarray], images: np.ndarray) -> np.ndarray:
    """uint8 [B, H, W, 3] -> [B, 512]: normalize, convs + ReLU, max-pools, global average pool."""
    x = (images.astype(np.float64) / 255.0 - MEAN) / STD
    index = 0
    for v in CFG:
        if v == 'M':
            b, h, w, c = x.shape
            x = x.reshape(b, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
            index += 1
        else:
            weight = state[f'features.{index}.weight'].astype(np.float64)
            x = np.maximum(_conv3x3(x, weight) + state[f'features.{index}.bias'], 0.0)
            index += 2
    return x.mean(axis=(1, 2))


def _assert_close(ours, reference):
    ours, reference = np.asarray(ours), np.asarray(reference)
    assert ours.shape == reference.shape
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * np.abs(reference).max())


@pytest.fixture(scope='module')
def state_dict():
    return _random_state_dict(seed=0)


@pytest.fixture(scope='module')
def npz_path(state_dict, tmp_path_factory):
    path = tmp_path_factory.mktemp('weights') / 'vgg16.npz'
    np.savez(path, **state_dict)
    return path


@pytest.fixture(scope='module')
def images():
    return np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3), dtype=np.uint8)


def test_conv_indices_match_torchvision():
    assert pretrained.torchvision_conv_indices() == list(CONV_INDICES)
    assert [index for index, _, _ in _conv_shapes()] == list(CONV_INDICES)


def test_npz_matches_numpy_reference(state_dict, npz_path, images):
    params = pretrained.vgg16_trunk_params(pretrained.read_vgg16_state_dict(npz_path))
    assert sorted(params) == sorted(CONV_NAMES)
    assert params['conv1_1']['kernel'].shape == (3, 3, 3, 64)
    assert all(leaf.dtype == np.float32 for leaf in jax.tree.leaves(params))
    features = _apply({'params': params}, images)
    assert features.dtype == jnp.float32
    assert np.abs(np.asarray(features)).max() > 1e-3  # not a trivially dead network
    _assert_close(features, _reference_forward(state_dict, images))


def test_load_pretrained_trunk_keeps_embedding_and_head(state_dict, npz_path, images):
    model = FeatureNet(num_classes=3, embed_dim=8)
    # Random values in the initialised tree's shapes (cheaper than compiling model.init).
    rng = np.random.default_rng(2)
    abstract = jax.eval_shape(model.init, jax.random.key(0), images)['params']
    params = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape) * 0.1, s.dtype),
                          abstract)
    before = np.asarray(params['trunk']['conv1_1']['kernel'])
    trunk = pretrained.load_pretrained_trunk(npz_path, params['trunk'])
    np.testing.assert_array_equal(params['trunk']['conv1_1']['kernel'], before)  # not mutated
    for index, name in zip(CONV_INDICES, CONV_NAMES, strict=True):
        np.testing.assert_array_equal(trunk[name]['kernel'],
                                      state_dict[f'features.{index}.weight'].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(trunk[name]['bias'], state_dict[f'features.{index}.bias'])
        assert isinstance(trunk[name]['kernel'], jax.Array)
    assert trunk['embedding'] is params['trunk']['embedding']
    features, cosines = jax.jit(model.apply)({'params': {**params, 'trunk': trunk}}, images)
    embedding = params['trunk']['embedding']
    expected = _reference_forward(state_dict, images) @ np.asarray(embedding['kernel'], np.float64)
    _assert_close(features, expected + np.asarray(embedding['bias']))
    assert cosines.shape == (2, 3)


def test_accepts_abstract_trunk_params(npz_path):
    abstract = jax.eval_shape(VGG16().init, jax.random.key(0), jnp.zeros((1, 32, 32, 3), jnp.uint8))
    trunk = pretrained.load_pretrained_trunk(npz_path, abstract['params'])
    assert trunk['conv5_3']['kernel'].shape == (3, 3, 512, 512)


# Errors: each names the file and the key or layer at fault.


def _write_npz(tmp_path, state, name='weights.npz'):
    path = tmp_path / name
    np.savez(path, **state)
    return path


def _width_one_params():
    return jax.eval_shape(VGG16().init, jax.random.key(0),
                          jnp.zeros((1, 32, 32, 3), jnp.uint8))['params']


def test_missing_file(tmp_path):
    path = tmp_path / 'absent.npz'
    with pytest.raises(PretrainedWeightsError, match='not found.*absent.npz'):
        pretrained.load_pretrained_trunk(path, _width_one_params())


def test_missing_key(state_dict, tmp_path):
    state = {k: v for k, v in state_dict.items() if k != 'features.28.bias'}
    path = _write_npz(tmp_path, state)
    with pytest.raises(PretrainedWeightsError, match=r"weights.npz.*'features.28.bias'.*conv5_3"):
        pretrained.load_pretrained_trunk(path, _width_one_params())


def test_wrong_shape(state_dict, tmp_path):
    state = dict(state_dict)
    state['features.0.weight'] = state['features.0.weight'].transpose(2, 3, 1, 0)  # Flax layout
    path = _write_npz(tmp_path, state)
    expected = r"weights.npz.*'features.0.weight'.*conv1_1.*\(3, 3, 3, 64\).*\(64, 3, 3, 3\)"
    with pytest.raises(PretrainedWeightsError, match=expected):
        pretrained.load_pretrained_trunk(path, _width_one_params())


def test_non_finite_values(state_dict, tmp_path):
    state = dict(state_dict)
    state['features.2.bias'] = np.full(64, np.nan, np.float32)
    with pytest.raises(PretrainedWeightsError, match=r"'features.2.bias'.*conv1_2.*NaN"):
        pretrained.load_pretrained_trunk(_write_npz(tmp_path, state), _width_one_params())


def test_width_not_one(npz_path):
    quarter = jax.eval_shape(VGG16(width=0.25).init, jax.random.key(0),
                             jnp.zeros((1, 32, 32, 3), jnp.uint8))['params']
    with pytest.raises(PretrainedWeightsError,
                       match=r'vgg16.npz.*conv1_1 kernel.*\(3, 3, 3, 64\).*\(3, 3, 3, 16\).*width'):
        pretrained.load_pretrained_trunk(npz_path, quarter)


def test_whole_variables_instead_of_trunk_params(npz_path):
    variables = {'params': _width_one_params()}
    with pytest.raises(PretrainedWeightsError, match=r"no layer conv1_1.*params\['trunk'\]"):
        pretrained.load_pretrained_trunk(npz_path, variables)


def test_batch_norm_variant_is_named(tmp_path):
    state = {'features.0.weight': np.zeros((64, 3, 3, 3), np.float32),
             'features.1.running_mean': np.zeros(64, np.float32)}
    with pytest.raises(PretrainedWeightsError, match=r"'features.0.bias'.*vgg16_bn"):
        pretrained.vgg16_trunk_params(state)


def test_unknown_suffix_and_unreadable_npz(tmp_path):
    path = tmp_path / 'weights.h5'
    path.write_bytes(b'x')
    with pytest.raises(PretrainedWeightsError, match=r"weights.h5.*'\.h5'"):
        pretrained.read_vgg16_state_dict(path)
    path = tmp_path / 'broken.npz'
    path.write_bytes(b'not a zip file')
    with pytest.raises(PretrainedWeightsError, match='broken.npz'):
        pretrained.read_vgg16_state_dict(path)


def test_npz_with_pickled_objects_is_refused(tmp_path):
    path = tmp_path / 'objects.npz'
    np.savez(path, **{'features.0.weight': np.array([{'a': 1}], dtype=object)})
    with pytest.raises(PretrainedWeightsError, match='objects.npz.*dtype object'):
        pretrained.read_vgg16_state_dict(path)


def test_pth_without_torch_says_what_to_install(tmp_path, monkeypatch):
    path = tmp_path / 'vgg16.pth'
    path.write_bytes(b'x')
    monkeypatch.setitem(sys.modules, 'torch', None)  # `import torch` now raises ImportError
    with pytest.raises(ImportError, match=r"vgg16.pth.*pip install -e '\.\[torch\]'.*\.npz"):
        pretrained.read_vgg16_state_dict(path)
    with pytest.raises(ImportError, match=r"vgg16.pth.*pip install"):
        pretrained.check_weights_file(path, 'vgg16')


# The PyTorch path: a hand-built torchvision-layout VGG-16, saved with torch.save.


def _torch_vgg16(torch):
    class TorchVGG16(torch.nn.Module):
        """torchvision's vgg16 feature stack (same state_dict keys) + ImageNet normalization."""

        def __init__(self):
            super().__init__()
            layers, c_in = [], 3
            for v in CFG:
                if v == 'M':
                    layers.append(torch.nn.MaxPool2d(kernel_size=2, stride=2))
                else:
                    layers += [torch.nn.Conv2d(c_in, v, kernel_size=3, padding=1),
                               torch.nn.ReLU(inplace=True)]
                    c_in = v
            self.features = torch.nn.Sequential(*layers)
            self.classifier = torch.nn.Sequential(torch.nn.Linear(512, 10))  # ignored by pathjax

        def forward(self, images):  # [B, 3, H, W] in [0, 255] -> [B, 512]
            mean = torch.tensor(MEAN, dtype=torch.float32).view(1, 3, 1, 1)
            std = torch.tensor(STD, dtype=torch.float32).view(1, 3, 1, 1)
            x = self.features((images / 255.0 - mean) / std)
            return torch.nn.functional.adaptive_avg_pool2d(x, 1).flatten(1)

    torch.manual_seed(0)
    net = TorchVGG16().eval()
    with torch.no_grad():
        for module in net.features:
            if isinstance(module, torch.nn.Conv2d):
                torch.nn.init.kaiming_normal_(module.weight, nonlinearity='relu')
                torch.nn.init.normal_(module.bias, std=0.05)
    return net


@pytest.fixture(scope='module')
def torch_net():
    torch = pytest.importorskip('torch', reason='the .pth path needs the torch extra')
    return torch, _torch_vgg16(torch)


def test_pth_matches_pytorch(torch_net, images, tmp_path):
    torch, net = torch_net
    state = net.state_dict()
    weight_keys = [k for k in state if k.startswith('features.') and k.endswith('.weight')]
    assert weight_keys == [f'features.{i}.weight' for i in CONV_INDICES]
    path = tmp_path / 'vgg16.pth'
    torch.save(state, path)
    params = pretrained.vgg16_trunk_params(pretrained.read_vgg16_state_dict(path))
    ours = _apply({'params': params}, images)
    with torch.no_grad():
        theirs = net(torch.from_numpy(images).permute(0, 3, 1, 2).float()).numpy()
    assert np.abs(theirs).max() > 1e-3
    _assert_close(ours, theirs)


@pytest.mark.parametrize('wrap', ['state_dict', 'module.'])
def test_pth_wrapped_state_dict(torch_net, tmp_path, wrap):
    torch, net = torch_net
    state = net.state_dict()
    saved = ({'state_dict': state, 'epoch': 3} if wrap == 'state_dict'
             else {f'module.{k}': v for k, v in state.items()})
    path = tmp_path / 'wrapped.pt'
    torch.save(saved, path)
    with open_weights(path) as weights:
        assert set(weights) == set(state)
        assert weights['features.28.weight'].shape == (512, 512, 3, 3)
        np.testing.assert_array_equal(weights.read('features.28.weight'),
                                      state['features.28.weight'].numpy())


def test_pth_to_npz_roundtrip(torch_net, tmp_path):
    torch, net = torch_net
    pth, npz = tmp_path / 'vgg16.pth', tmp_path / 'vgg16.npz'
    torch.save(net.state_dict(), pth)
    assert pretrained.main(['pretrained', str(pth), str(npz)]) == 0  # the CLI
    assert pretrained.main(['pretrained', str(tmp_path / 'absent.pth'), str(npz)]) == 2
    from_pth = pretrained.vgg16_trunk_params(pretrained.read_vgg16_state_dict(pth))
    from_npz = pretrained.vgg16_trunk_params(pretrained.read_vgg16_state_dict(npz))
    jax.tree.map(np.testing.assert_array_equal, from_pth, from_npz)
    with np.load(npz, allow_pickle=False) as data:
        assert sorted(data.files) == sorted(f'features.{i}.{kind}' for i in CONV_INDICES
                                            for kind in ('weight', 'bias'))  # no classifier


def test_unreadable_pth(torch_net, tmp_path):
    path = tmp_path / 'broken.pth'
    path.write_bytes(b'not a torch file')
    with pytest.raises(PretrainedWeightsError, match='broken.pth'):
        pretrained.read_vgg16_state_dict(path)


# Weight files are hostile input (issue 17): each file below was accepted, or raised something
# other than PretrainedWeightsError, or allocated what it claimed, before the headers were
# checked first. More in test_weights_fuzz.py.

SMALL_VIT = dataclasses.replace(
    vit_presets.PRESETS['vit_small_patch16_224'],
    arch=dataclasses.replace(vit_presets.PRESETS['vit_small_patch16_224'].arch, depth=1,
                             embed_dim=16, num_heads=2, img_size=32))


@contextlib.contextmanager
def allocates_at_most(limit: int):
    tracemalloc.start()
    try:
        yield
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < limit, f'{peak} bytes allocated'


def _npy_header(shape, descr='<f4') -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': False, 'shape': {tuple(shape)!r}, }}\n"
    return b'\x93NUMPY\x01\x00' + struct.pack('<H', len(text)) + text.encode('latin1')


def _safetensors_header(shapes: dict[str, tuple[int, ...]]) -> tuple[dict, int]:
    """A float32 .safetensors header of `shapes` and the size of its data section."""
    header, offset = {}, 0
    for key, shape in shapes.items():
        end = offset + 4 * math.prod(shape)
        header[key] = {'dtype': 'F32', 'shape': list(shape), 'data_offsets': [offset, end]}
        offset = end
    return header, offset


def _write_safetensors(path, header: dict | bytes, data: bytes | int) -> pathlib.Path:
    """`data`: the data section, or its size (a sparse file of zeros: nothing is written)."""
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', len(text)) + text)
        if isinstance(data, bytes):
            f.write(data)
        else:
            f.truncate(8 + len(text) + data)
    return path


@pytest.fixture(scope='module')
def small_vit_state():
    rng = np.random.default_rng(5)
    return {key: rng.normal(0, 0.05, shape).astype(np.float32)
            for key, (_, shape) in vit_weights.expected_keys(SMALL_VIT).items()}


def _small_vit_safetensors(state) -> tuple[dict, bytes]:
    header, _ = _safetensors_header({key: value.shape for key, value in state.items()})
    return header, b''.join(value.tobytes() for value in state.values())


def test_npz_zip_bomb_is_refused_from_its_header(tmp_path):
    """1 MB of deflated zeros under a trunk key whose .npy header says 128 MiB."""
    path = tmp_path / 'bomb.npz'
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED, compresslevel=1) as archive:
        with archive.open('features.0.weight.npy', 'w', force_zip64=True) as member:
            member.write(_npy_header((2**25,)))
            for _ in range(32):
                member.write(bytes(2**22))
    assert path.stat().st_size < 2**20
    expected = r"bomb.npz: key 'features.0.weight' \(layer conv1_1\) has shape \(33554432,\)"
    with allocates_at_most(2**26), pytest.raises(PretrainedWeightsError, match=expected):
        pretrained.load_pretrained_trunk(path, _width_one_params())
    with allocates_at_most(2**22), pytest.raises(PretrainedWeightsError, match=expected):
        pretrained.check_weights_file(path, 'vgg16')


def test_npz_member_must_be_exactly_its_header_and_data(tmp_path):
    path = tmp_path / 'claim.npz'  # 220 bytes whose header claims 4 TiB
    with zipfile.ZipFile(path, 'w') as archive:
        archive.writestr('features.0.weight.npy', _npy_header((2**40,)))
    with pytest.raises(PretrainedWeightsError,
                       match=r"claim.npz: cannot read as .npz: member 'features.0.weight.npy' "
                             r"holds 80 bytes, but its 80-byte .npy header describes shape "
                             r"\(1099511627776,\) float32 \(4398046511104 bytes\) after it"):
        pretrained.load_pretrained_trunk(path, _width_one_params())
    path = tmp_path / 'longer.npz'  # the right header, then more than it describes
    with zipfile.ZipFile(path, 'w', zipfile.ZIP_DEFLATED) as archive:
        archive.writestr('features.0.bias.npy', _npy_header((64,)) + bytes(4 * 64 + 1))
    with open_weights(path) as weights, pytest.raises(PretrainedWeightsError,
                                                      match='holds 326 bytes, but its 69-byte'):
        weights['features.0.bias']  # pylint: disable=pointless-statement


def _set(key, field, value):
    def edit(header):
        header[key][field] = value(header) if callable(value) else value
        return json.dumps(header).encode()
    return edit


def _duplicate_norm_bias(header):
    text = json.dumps(header)
    return (text[:-1] + ', "norm.bias": ' + json.dumps(header['norm.weight']) + '}').encode()


@pytest.mark.parametrize('edit, problem', [
    (_set('norm.bias', 'data_offsets', [-64, 0]), r"'norm.bias': data_offsets \[-64, 0\] is not"),
    (_set('norm.bias', 'data_offsets', lambda h: h['norm.weight']['data_offsets']),
     r"tensors '(norm.weight|norm.bias)' and '(norm.weight|norm.bias)' overlap"),
    (_set('norm.bias', 'shape', 16), r"'norm.bias': shape 16 is not a list"),
    (_set('norm.bias', 'shape', [2**70]), r"'norm.bias': bytes \d+-\d+ do not hold shape"),
    (_duplicate_norm_bias, r"key 'norm.bias' twice"),
    (lambda header: b'[]', 'the JSON header is a list, not an object'),
    (lambda header: b'[' * 100_000 + b']' * 100_000, 'RecursionError'),
], ids=['negative offsets', 'overlap', 'scalar shape', '2**70 shape', 'duplicate key',
        'not an object', 'deeply nested'])
def test_safetensors_header_is_checked(tmp_path, small_vit_state, edit, problem):
    header, data = _small_vit_safetensors(small_vit_state)
    path = _write_safetensors(tmp_path / 'vit.safetensors', edit(header), data)
    with pytest.raises(PretrainedWeightsError, match=r'vit.safetensors: cannot read as '
                                                     r'.safetensors: .*' + problem):
        vit_weights.load_params(SMALL_VIT, path)


def test_safetensors_header_size_is_capped(tmp_path):
    path = tmp_path / 'big.safetensors'  # a 101 MB header (sparse: nothing written)
    with open(path, 'wb') as f:
        f.write(struct.pack('<Q', 101_000_000))
        f.truncate(8 + 101_000_000)
    with allocates_at_most(2**26), pytest.raises(
            PretrainedWeightsError, match=r'big.safetensors.*header of 101000000 bytes.*at most'):
        pretrained.load_pretrained_trunk(path, _width_one_params())
    path.write_bytes(struct.pack('<Q', 2**63) + b'{}')
    with pytest.raises(PretrainedWeightsError, match=r'header of 9223372036854775808 bytes in '
                                                     r'a file of 10 bytes'):
        pretrained.load_pretrained_trunk(path, _width_one_params())


@pytest.mark.parametrize('damage', ['truncated', 'bit flip'])
def test_damaged_npz(tmp_path, small_vit_state, damage):
    path = tmp_path / 'vit.npz'
    np.savez_compressed(path, **small_vit_state)
    raw = bytearray(path.read_bytes())
    if damage == 'truncated':
        del raw[len(raw) // 2:]
    else:  # in the middle of pos_embed's compressed data
        info = zipfile.ZipFile(path).getinfo('pos_embed.npy')
        name_length, extra_length = struct.unpack('<HH', raw[info.header_offset + 26:
                                                             info.header_offset + 30])
        raw[info.header_offset + 30 + name_length + extra_length + info.compress_size // 2] ^= 4
    path.write_bytes(bytes(raw))
    with pytest.raises(PretrainedWeightsError, match=r'vit.npz: cannot read as .npz: '
                                                     r'(zipfile.BadZipFile|zlib.error)'):
        vit_weights.load_params(SMALL_VIT, path)


def test_check_weights_file_reads_headers_only(tmp_path, npz_path):
    with allocates_at_most(2**22):  # the file holds 58 MB of weights
        pretrained.check_weights_file(npz_path, 'vgg16')
    large = vit_presets.PRESETS['vit_large_patch16_224']
    shapes = {key: shape for key, (_, shape) in vit_weights.expected_keys(large).items()}
    path = _write_safetensors(tmp_path / 'uni.safetensors', *_safetensors_header(shapes))
    with allocates_at_most(2**24):  # 1.2 GB of (sparse) weights
        pretrained.check_weights_file(path, large.name)
    with pytest.raises(PretrainedWeightsError, match=r'uni.safetensors is not a '
                                                     r'vit_base_patch16_224.*fits preset\(s\) '
                                                     r'vit_large_patch16_224'):
        pretrained.check_weights_file(path, 'vit_base_patch16_224')
    del shapes['norm.bias']
    path = _write_safetensors(tmp_path / 'uni.safetensors', *_safetensors_header(shapes))
    with pytest.raises(PretrainedWeightsError, match=r'missing \(1\): norm.bias'):
        pretrained.check_weights_file(path, large.name)
    with pytest.raises(PretrainedWeightsError, match=r"uni.safetensors: missing key "
                                                     r"'features.0.weight'"):
        pretrained.check_weights_file(path, 'vgg16')
    with pytest.raises(ValueError, match="unknown backbone 'vgg19'"):
        pretrained.check_weights_file(path, 'vgg19')


@pytest.mark.parametrize('tokens, fits', [(37 * 37, True), (37 * 37 + 1, False),
                                          (129 * 129, False)])
def test_check_weights_file_allows_resampled_position_embeddings(tmp_path, tokens, fits):
    """DINOv2's 518 px files (37 x 37 patches) fit the preset made for 224 px."""
    dinov2 = vit_presets.PRESETS['vit_small_patch14_reg4_dinov2']
    shapes = {key: shape for key, (_, shape) in vit_weights.expected_keys(dinov2).items()}
    shapes['pos_embed'] = (1, tokens, 384)
    path = _write_safetensors(tmp_path / 'dinov2.safetensors', *_safetensors_header(shapes))
    if fits:
        pretrained.check_weights_file(path, dinov2.name)
    else:
        with pytest.raises(PretrainedWeightsError, match=rf'mis-shaped \(1\): pos_embed '
                                                         rf'\(1, {tokens}, 384\)'):
            pretrained.check_weights_file(path, dinov2.name)


def test_check_weights_file_of_a_torch_file(torch_net, tmp_path, small_vit_state, monkeypatch):
    torch, _ = torch_net
    monkeypatch.setitem(vit_presets.PRESETS, SMALL_VIT.name, SMALL_VIT)
    path = tmp_path / 'vit.bin'
    torch.save({key: torch.from_numpy(value) for key, value in small_vit_state.items()}, path)
    pretrained.check_weights_file(path, SMALL_VIT.name)
    torch.save({'state_dict': {'module.norm.bias': torch.zeros(3, dtype=torch.int64)}}, path)
    with pytest.raises(PretrainedWeightsError, match=r'vit.bin is not a vit_small_patch16_224.*'
                                                     r'mis-shaped \(1\): norm.bias \(3,\).*'
                                                     r'not floating-point \(1\): norm.bias'):
        pretrained.check_weights_file(path, SMALL_VIT.name)


@pytest.mark.parametrize('preset', [[], ['vit_small_patch16_224']], ids=['vgg16', 'vit'])
def test_converter_reports_a_bad_file_in_one_line(tmp_path, preset):
    source = tmp_path / 'broken.npz'
    source.write_bytes(b'PK\x03\x04 not a whole zip file')
    result = subprocess.run(
        [sys.executable, '-m', 'pathjax.models.patch.pretrained', str(source), str(tmp_path / 'out.npz'),
         *preset], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'Traceback' not in result.stderr, result.stderr
    assert f'{source}: cannot read as .npz: zipfile.BadZipFile' in lines[0]
    assert not (tmp_path / 'out.npz').exists()
