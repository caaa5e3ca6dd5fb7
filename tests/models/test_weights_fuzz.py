"""Weight files are hostile input: mutated .safetensors and .npz files (bit flips, truncation,
inserted and deleted bytes, edited and random headers) either load or raise
PretrainedWeightsError, never another exception, and allocate little while doing so."""

import dataclasses
import io
import json
import pathlib
import struct
import tracemalloc
import zipfile

import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pathjax.models.patch import vit_presets, vit_weights
from pathjax.models.patch.weight_files import PretrainedWeightsError, open_weights

PEAK_BYTES = 64 * 2**20
FUZZ = settings(max_examples=300, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# The readers' part of a loader: check the headers against a tiny expected set, then read.
EXPECTED = {'a': (2, 3), 'b': (4,), 'c': (2, 2)}
STATE = {'a': np.arange(6, dtype=np.float32).reshape(2, 3) / 7,
         'b': np.array([1.5, -2.0, 0.25, 8.0], ml_dtypes.bfloat16),
         'c': np.array([[1, 2], [3, 4]], np.float16),
         'classifier.weight': np.ones((3, 2), np.float32)}  # not expected: never read

SAFETENSORS_NAMES = {np.dtype(np.float32): 'F32', np.dtype(ml_dtypes.bfloat16): 'BF16',
                     np.dtype(np.float16): 'F16'}


def safetensors_parts(state: dict[str, np.ndarray]) -> tuple[dict, bytes]:
    """The JSON header and the data section of a .safetensors file of `state`."""
    header, data = {}, b''
    for key, value in state.items():
        raw = np.ascontiguousarray(value).tobytes()
        header[key] = {'dtype': SAFETENSORS_NAMES[value.dtype], 'shape': list(value.shape),
                       'data_offsets': [len(data), len(data) + len(raw)]}
        data += raw
    return header, data


def safetensors_file(header, data: bytes) -> bytes:
    text = json.dumps(header).encode()
    return struct.pack('<Q', len(text)) + text + data


def safetensors_bytes(state: dict[str, np.ndarray]) -> bytes:
    """A .safetensors file of `state`, written as the format's specification says."""
    return safetensors_file(*safetensors_parts(state))


def npz_bytes(state: dict[str, np.ndarray], compressed: bool) -> bytes:
    buffer = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(
        buffer, **{k: np.asarray(v, np.float32) for k, v in state.items()})
    return buffer.getvalue()


def load_expected(path: pathlib.Path) -> dict[str, np.ndarray]:
    with open_weights(path) as weights:
        for key, shape in EXPECTED.items():
            if key not in weights or weights[key].shape != shape:
                raise PretrainedWeightsError(f'{path}: no {key} of shape {shape}')
        return {key: weights.read(key) for key in EXPECTED}


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
    return tmp_path_factory.mktemp('fuzz')


def check_file(load, folder: pathlib.Path, name: str, data: bytes):
    """load(a file of `data`) under tracemalloc: its result, or None for PretrainedWeightsError
    naming the file; any other exception fails the test, and so does a peak over PEAK_BYTES."""
    path = folder / name
    path.write_bytes(data)
    tracemalloc.start()
    try:
        return load(path)
    except PretrainedWeightsError as error:
        assert str(path) in str(error)
        return None
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < PEAK_BYTES, f'{peak} bytes allocated'


# Byte-level mutations of any file.

AT = st.floats(0, 1, exclude_max=True)  # where in the file, as a fraction of its length
EDITS = st.lists(st.one_of(
    st.tuples(st.just('flip'), AT, st.integers(0, 7)),
    st.tuples(st.just('truncate'), AT),
    st.tuples(st.just('insert'), AT, st.binary(min_size=1, max_size=9)),
    st.tuples(st.just('delete'), AT, st.integers(1, 9)),
    st.tuples(st.just('overwrite'), AT, st.binary(min_size=1, max_size=9))),
    min_size=1, max_size=4)


def mutate(data: bytes, edits) -> bytes:
    data = bytearray(data)
    for kind, fraction, *arg in edits:
        at = int(fraction * len(data))
        if kind == 'flip' and at < len(data):
            data[at] ^= 1 << arg[0]
        elif kind == 'truncate':
            del data[at:]
        elif kind == 'insert':
            data[at:at] = arg[0]
        elif kind == 'delete':
            del data[at:at + arg[0]]
        elif kind == 'overwrite':
            data[at:at + len(arg[0])] = arg[0]
    return bytes(data)


@FUZZ
@given(edits=EDITS)
def test_mutated_safetensors(folder, edits):
    check_file(load_expected, folder, 'w.safetensors', mutate(safetensors_bytes(STATE), edits))


ZIP_SIZE_FIELDS = {b'PK\x01\x02': (20, 24), b'PK\x03\x04': (18, 22)}  # central, local header:
# offsets of the compressed and uncompressed sizes


def edit_zip_sizes(data: bytes, edits) -> bytes:
    """Overwrites the compressed or uncompressed size of the n-th central directory or local
    header entry (a zip bomb claims a small size or a huge one)."""
    data = bytearray(data)
    for signature, n, field, value in edits:
        starts = [i for i in range(len(data)) if data.startswith(signature, i)]
        if starts:
            at = starts[n % len(starts)] + ZIP_SIZE_FIELDS[signature][field]
            data[at:at + 4] = struct.pack('<I', value)
    return bytes(data)


@FUZZ
@given(edits=EDITS, compressed=st.booleans())
def test_mutated_npz(folder, edits, compressed):
    check_file(load_expected, folder, 'w.npz', mutate(npz_bytes(STATE, compressed), edits))


@FUZZ
@given(edits=st.lists(st.tuples(st.sampled_from(sorted(ZIP_SIZE_FIELDS)), st.integers(0, 3),
                                st.integers(0, 1), st.integers(0, 2**32 - 1) | st.integers(0, 200)),
                      min_size=1, max_size=3),
       compressed=st.booleans())
def test_npz_size_fields(folder, edits, compressed):
    check_file(load_expected, folder, 'z.npz', edit_zip_sizes(npz_bytes(STATE, compressed), edits))


def test_unmutated_files_load(folder):
    for name, data in (('w.safetensors', safetensors_bytes(STATE)),
                       ('w.npz', npz_bytes(STATE, compressed=True))):
        loaded = check_file(load_expected, folder, name, data)
        for key in EXPECTED:
            np.testing.assert_array_equal(loaded[key], np.asarray(STATE[key], np.float32))
            assert loaded[key].dtype == np.float32


# Header edits: the JSON header of a .safetensors file, the .npy headers of an .npz file.

JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=4), inner,
                                                                max_size=4),
    max_leaves=12)
NUMBERS = st.integers(-20, 40) | st.sampled_from([2**31, 2**63, 2**64 + 3, 2**70])
FIELD_VALUES = {
    'dtype': st.sampled_from(['F32', 'BF16', 'F16', 'F64', 'I64', 'BOOL', 'U8', 'F8', 'f32'])
    | JSON,
    'shape': st.lists(NUMBERS, max_size=4) | JSON,
    'data_offsets': st.lists(NUMBERS, min_size=0, max_size=3) | JSON}


@st.composite
def safetensors_headers(draw):
    """The valid file's header with a few fields replaced, entries dropped or added."""
    header = safetensors_parts(STATE)[0]
    for _ in range(draw(st.integers(1, 3))):
        key = draw(st.sampled_from(sorted(header)))
        action = draw(st.sampled_from(['field', 'field', 'drop', 'copy', 'metadata']))
        if action == 'field' and isinstance(header[key], dict):
            field = draw(st.sampled_from(sorted(FIELD_VALUES)))
            header[key][field] = draw(FIELD_VALUES[field])
        elif action == 'drop':
            del header[key]
        elif action == 'copy' and isinstance(header[key], dict):  # (metadata may be JSON now)
            header[draw(st.sampled_from(['a', 'module.a', 'z', '']))] = dict(header[key])
        elif action == 'copy':
            continue
        else:
            header['__metadata__'] = draw(JSON)
        if not header:
            break
    return header


@FUZZ
@given(header=safetensors_headers() | JSON, data_size=st.integers(0, 80))
def test_safetensors_header_edits(folder, header, data_size):
    data = safetensors_parts(STATE)[1]
    check_file(load_expected, folder, 'h.safetensors', safetensors_file(header, data[:data_size]))


@FUZZ
@given(size=st.integers(0, 2**64 - 1) | st.integers(0, 300), text=st.binary(max_size=200))
def test_safetensors_header_size_and_bytes(folder, size, text):
    check_file(load_expected, folder, 's.safetensors', struct.pack('<Q', size) + text)


DESCRS = st.sampled_from(['<f4', '>f4', '<f2', '<f8', '|O', '<c8', '|V8', '<U3', '|b1', '<i8',
                          '<M8[s]', 'V99999999999999999999', [('x', '<f4')], ('<f4', (2,)),
                          ('<f4',), None])


@st.composite
def npy_members(draw):
    """An .npy member: a version, a header dict (or any text) and data of some length."""
    nbytes = 0
    if draw(st.booleans()):
        shape = draw(st.sampled_from([(2, 3), (4,), (2, 2), (3, 2)]) | st.lists(NUMBERS, max_size=4)
                     .map(tuple))
        descr = draw(DESCRS)
        text = (f"{{'descr': {descr!r}, 'fortran_order': {draw(st.booleans())}, "
                f"'shape': {shape!r}, }}")
        if isinstance(descr, str) and descr[1:2] in 'fbi' and all(0 <= n < 10 for n in shape):
            nbytes = np.dtype(descr).itemsize * int(np.prod(shape))
    else:
        text = draw(st.text(max_size=60) | st.sampled_from(['+' * 9000 + '1', '-' * 5000 + '1',
                                                            '(' * 300 + ')' * 300]))
    raw = text.encode('latin1', 'replace') + b'\n'
    version = draw(st.sampled_from([(1, 0), (2, 0), (3, 0), (0, 9)]))
    length = struct.pack('<H' if version == (1, 0) else '<I', len(raw))
    if draw(st.booleans()):  # a lying header length
        length = struct.pack('<I', draw(st.integers(0, 2**32 - 1)))[:len(length)]
    magic = b'\x93NUMPY' + bytes(version)
    data = draw(st.binary(min_size=nbytes, max_size=nbytes))
    return magic + length + raw + mutate(data, draw(st.just([]) | EDITS))


@pytest.mark.filterwarnings('ignore:Duplicate name:UserWarning')  # zipfile, writing them
@FUZZ
@given(keys=st.lists(st.sampled_from(['a', 'b', 'c', 'module.a', 'x']), min_size=1, max_size=3,
                     unique=True),
       members=st.lists(npy_members(), min_size=3, max_size=3),
       compressed=st.booleans(), keep_valid=st.booleans())
def test_npz_header_edits(folder, keys, members, compressed, keep_valid):
    valid = {k: np.asarray(v, np.float32) for k, v in STATE.items()} if keep_valid else {}
    buffer = io.BytesIO()
    method = zipfile.ZIP_DEFLATED if compressed else zipfile.ZIP_STORED
    with zipfile.ZipFile(buffer, 'w', method) as archive:
        written = set()
        for key, member in zip(keys, members):
            archive.writestr(f'{key}.npy', member)
            written.add(key.removeprefix('module.'))
        for key, value in valid.items():
            if key not in written:
                with archive.open(f'{key}.npy', 'w') as out:
                    np.lib.format.write_array(out, value)
    check_file(load_expected, folder, 'e.npz', buffer.getvalue())


# The same through a ViT preset (shrunk: one block of width 16 on 32 px images).

SMALL_VIT = dataclasses.replace(
    vit_presets.PRESETS['vit_small_patch16_224'],
    arch=dataclasses.replace(vit_presets.PRESETS['vit_small_patch16_224'].arch, depth=1,
                             embed_dim=16, num_heads=2, img_size=32))


@pytest.fixture(scope='module')
def vit_files():
    rng = np.random.default_rng(0)
    state = {key: rng.normal(0, 0.05, shape).astype(np.float32)
             for key, (_, shape) in vit_weights.expected_keys(SMALL_VIT).items()}
    return {'.safetensors': safetensors_bytes(state), '.npz': npz_bytes(state, compressed=True)}


@settings(max_examples=200, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(edits=EDITS, suffix=st.sampled_from(['.safetensors', '.npz']))
def test_mutated_vit_files(folder, vit_files, edits, suffix):
    check_file(lambda path: vit_weights.load_params(SMALL_VIT, path), folder, f'vit{suffix}',
               mutate(vit_files[suffix], edits))
