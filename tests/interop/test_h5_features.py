"""Feature files written the way TRIDENT, CLAM and STAMP write them: detected, validated and read;
write_trident's files read back, by us and by TRIDENT's reading code; hostile files refused."""

import json
import re

import h5py
import numpy as np
import pytest

from pathjax.interop import h5_features as h5f
from pathjax.interop.h5_features import FeatureFileError

RNG = np.random.default_rng(0)


# --- each tool's own writing code, copied (commits as in pathjax/interop/h5_features.py) -------

def trident_save_h5(save_path, assets, attributes=None, mode='w'):
    """mahmoodlab/TRIDENT trident/IO.py save_h5 (the first-write branch; TRIDENT opens 'w')."""
    with h5py.File(save_path, mode) as file:
        for key, val in assets.items():
            data_shape = val.shape
            data_type = val.dtype
            chunk_shape = (1, ) + data_shape[1:]
            maxshape = (None, ) + data_shape[1:]
            dset = file.create_dataset(key, shape=data_shape, maxshape=maxshape,
                                       chunks=chunk_shape, dtype=data_type)
            dset[:] = val
            if attributes is not None and key in attributes:
                for attr_key, attr_val in attributes[key].items():
                    if isinstance(attr_val, dict):
                        attr_val = json.dumps(attr_val)
                    elif attr_val is None:
                        attr_val = 'None'
                    dset.attrs[attr_key] = attr_val


def trident_read_coords(coords_path):
    """TRIDENT trident/IO.py read_coords."""
    with h5py.File(coords_path, 'r') as f:
        attrs = dict(f['coords'].attrs)
        coords = f['coords'][:]
    return attrs, coords


def write_trident_style(folder, name, features, coords, *, patch_size=256, src_mag=40,
                        target_mag=20, width=10_000, height=8_000, encoder='conch_v15'):
    """TRIDENT: IO.py coords_to_h5 writes <job>/patches/<name>_patches.h5, then
    wsi_objects/WSI.py extract_patch_features re-reads it (read_coords) and writes
    features_<encoder>/<name>.h5 with save_h5."""
    (folder / 'patches').mkdir(exist_ok=True)
    coords_path = folder / 'patches' / f'{name}_patches.h5'
    attributes = {
        'patch_size': patch_size,
        'patch_size_level0': patch_size * src_mag // target_mag,
        'level0_magnification': src_mag,
        'target_magnification': target_mag,
        'overlap': 0,
        'name': name,
        'savetodir': str(folder),
        'level0_width': width,
        'level0_height': height,
    }
    trident_save_h5(coords_path, {'coords': np.asarray(coords, dtype=np.int64)},
                    {'coords': attributes})
    coords_attrs, coords = trident_read_coords(coords_path)
    save_features = folder / f'features_{encoder}'
    save_features.mkdir(exist_ok=True)
    path = save_features / f'{name}.h5'
    trident_save_h5(path, {'features': features, 'coords': coords},
                    {'features': {'name': name, 'savetodir': str(save_features),
                                  'encoder': encoder},
                     'coords': coords_attrs})
    return path


def trident_reads(path):
    """What TRIDENT's WSI.extract_slide_features reads of a features file, with the attrs that
    extract_patch_features and the slide encoders (slide_encoder_models/load.py) need."""
    with h5py.File(path, 'r') as f:
        coords = f['coords'][:]
        patch_features = f['features'][:]
        coords_attrs = dict(f['coords'].attrs)
    for key in ('patch_size', 'level0_magnification', 'target_magnification'):
        assert coords_attrs.get(key, None) is not None
    coords_attrs['patch_size_level0'] = int(coords_attrs['patch_size_level0'])
    return patch_features, coords, coords_attrs


def clam_save_hdf5(output_path, asset_dict, attr_dict=None, mode='a', chunk_size=32):
    """mahmoodlab/CLAM utils/file_utils.py save_hdf5."""
    with h5py.File(output_path, mode) as file:
        for key, val in asset_dict.items():
            data_shape = val.shape
            if key not in file:
                data_type = val.dtype
                chunk_shape = (chunk_size, ) + data_shape[1:]
                maxshape = (None, ) + data_shape[1:]
                dset = file.create_dataset(key, shape=data_shape, maxshape=maxshape,
                                           chunks=chunk_shape, dtype=data_type)
                dset[:] = val
                if attr_dict is not None and key in attr_dict:
                    for attr_key, attr_val in attr_dict[key].items():
                        dset.attrs[attr_key] = attr_val
            else:
                dset = file[key]
                dset.resize(len(dset) + data_shape[0], axis=0)
                dset[-data_shape[0]:] = val
    return output_path


def write_clam_style(path, features, coords, batch_size=16):
    """CLAM extract_features_fp.py compute_w_loader: one save_hdf5 per batch, 'w' then 'a'."""
    mode = 'w'
    for start in range(0, len(features), batch_size):
        batch = slice(start, start + batch_size)
        asset_dict = {'features': features[batch].astype(np.float32),
                      'coords': coords[batch].astype(np.int32)}
        clam_save_hdf5(path, asset_dict, attr_dict=None, mode=mode)
        mode = 'a'
    return path


def write_stamp_style(path, feats, coords_um, *, tile_size_um=256.0, tile_size_px=224,
                      extractor='uni2', **replace_attrs):
    """KatherLab/STAMP src/stamp/preprocessing/__init__.py extract_ (feats are .half(), coords
    .float() micrometres); replace_attrs overrides or (None) drops attrs for the bad cases."""
    attrs = {'stamp_version': '2.3.0', 'extractor': extractor, 'unit': 'um',
             'tile_size_um': tile_size_um, 'tile_size_px': tile_size_px,
             'code_hash': '1a2b3c4d', 'feat_type': 'tile'}
    attrs.update(replace_attrs)
    with h5py.File(path, 'w') as h5_fp:
        h5_fp['coords'] = np.asarray(coords_um, np.float32)
        h5_fp['feats'] = np.asarray(feats, np.float16)
        for key, value in attrs.items():
            if value is not None:
                h5_fp.attrs[key] = value
    return path


# --- data -----------------------------------------------------------------------------------

def some_cells(n=40, rows=7, cols=9):
    """[n, 2] distinct (row, col) cells of a rows x cols grid, in scan order."""
    flat = np.sort(RNG.choice(rows * cols, size=n, replace=False))
    return np.stack([flat // cols, flat % cols], axis=1)


def some_features(n, d=12, dtype=np.float32):
    return RNG.normal(size=(n, d)).astype(dtype)


def raises(path, field, *patterns):
    """pytest.raises for a FeatureFileError naming path and field (and patterns)."""
    return pytest.raises(FeatureFileError, match=re.escape(f'{path}: {field}') +
                         ''.join(f'.*{p}' for p in patterns))


# --- reading each tool's files --------------------------------------------------------------

@pytest.mark.parametrize('dtype', [np.float32, np.float16])
def test_trident(tmp_path, dtype):
    cells = some_cells()
    step = 512  # patch_size 256 at 20x on a 40x slide
    coords = cells[:, ::-1] * step
    features = some_features(len(cells), dtype=dtype)
    path = write_trident_style(tmp_path, 'slide-1', features, coords, width=9 * step + 100,
                               height=7 * step + 3)
    assert h5f.detect_format(path) == 'trident'
    info = h5f.inspect(path)
    assert (info.format, info.num_patches, info.feature_dim) == ('trident', len(cells), 12)
    assert (info.encoder, info.coords_unit, info.patch_size_level0) == ('conch_v15', 'px', 512)
    assert (info.slide_size, info.mpp, info.tile_size_um) == ((9 * step + 100, 7 * step + 3), 0, 0)
    patches = h5f.read(info)
    assert patches.features.dtype == np.float32
    np.testing.assert_array_equal(patches.features, features.astype(np.float32))
    assert patches.coords.dtype == patches.grid.dtype == np.int64
    np.testing.assert_array_equal(patches.coords, coords)
    np.testing.assert_array_equal(patches.grid, cells)
    assert patches.extent == 512


def test_trident_encoder_none_reads_as_empty(tmp_path):
    cells = some_cells(5)
    path = write_trident_style(tmp_path, 's', some_features(5), cells[:, ::-1] * 512,
                               encoder=None)
    assert h5f.inspect(path).encoder == ''


def test_clam_grid_is_absolute(tmp_path):
    cells = some_cells(50)
    step = 448
    origin = np.array([3 * step + 7, 5 * step])  # (x, y): not at the slide's corner
    coords = origin + cells[:, ::-1] * step
    features = some_features(len(cells))
    path = write_clam_style(tmp_path / 'slide.h5', features, coords)
    with h5py.File(path) as f:
        assert f['coords'].dtype == np.int32 and f['features'].chunks == (32, 12)
    assert h5f.detect_format(path) == 'clam'
    info = h5f.inspect(path, patch_size_level0=step)
    assert (info.format, info.num_patches, info.feature_dim, info.encoder) == ('clam', 50, 12, '')
    assert (info.patch_size_level0, info.slide_size, info.coords_unit) == (step, None, 'px')
    patches = h5f.read(info)
    np.testing.assert_array_equal(patches.features, features)
    np.testing.assert_array_equal(patches.coords, coords)
    np.testing.assert_array_equal(patches.grid, cells + [5, 3])
    assert patches.extent == step


def test_stamp_um_to_px(tmp_path):
    cells = some_cells()
    mpp, tile_um = 0.25, 256.0
    origin_px = np.array([4096, 2048])  # a supertile corner, in level-0 px (x, y)
    coords_px = origin_px + cells[:, ::-1] * 1024
    feats = some_features(len(cells), dtype=np.float16)
    path = write_stamp_style(tmp_path / 'slide.h5', feats, coords_px * mpp)
    assert h5f.detect_format(path) == 'stamp'
    info = h5f.inspect(path)
    assert (info.format, info.encoder, info.coords_unit, info.tile_size_um) == (
        'stamp', 'uni2', 'um', tile_um)
    assert (info.patch_size_level0, info.slide_size, info.mpp) == (0, None, 0)
    expected_grid = cells + origin_px[::-1] // 1024
    patches = h5f.read(info, mpp=mpp)
    np.testing.assert_array_equal(patches.features, feats.astype(np.float32))
    np.testing.assert_array_equal(patches.coords, coords_px)
    np.testing.assert_array_equal(patches.grid, expected_grid)
    assert patches.extent == 1024
    um_map = h5f.read(info)  # no mpp: a micrometre map
    np.testing.assert_array_equal(um_map.coords, coords_px * mpp)
    np.testing.assert_array_equal(um_map.grid, expected_grid)
    assert um_map.extent == tile_um


def test_stamp_2_0_tile_size(tmp_path):
    """STAMP 2.0 wrote `tile_size`; STAMP's reader (modeling/data.py get_coords) takes it with
    unit 'um'."""
    cells = some_cells(10)
    path = write_stamp_style(tmp_path / 's.h5', some_features(10), cells[:, ::-1] * 224.0,
                             tile_size_um=None, tile_size=224.0)
    patches = h5f.read(h5f.inspect(path))
    np.testing.assert_array_equal(patches.grid, cells)


# --- write_trident ----------------------------------------------------------------------------

def test_write_trident_round_trip_and_trident_reads_it(tmp_path):
    cells = some_cells()
    coords = cells[:, ::-1] * 512 + [0, 1024]
    features = some_features(len(cells))
    path = tmp_path / 'out' / 'slide-1.h5'
    h5f.write_trident(path, features, coords, encoder='pathjax-vgg16', patch_size=256,
                      patch_size_level0=512, level0_magnification=40.0,
                      target_magnification=20.0, level0_width=5000, level0_height=6000, mpp=0.25)
    assert [p.name for p in path.parent.iterdir()] == ['slide-1.h5']  # no temporary left
    info = h5f.inspect(path)
    assert (info.format, info.encoder, info.patch_size_level0) == ('trident', 'pathjax-vgg16', 512)
    assert (info.slide_size, info.mpp) == ((5000, 6000), 0.25)
    patches = h5f.read(info)
    np.testing.assert_array_equal(patches.features, features)
    np.testing.assert_array_equal(patches.coords, coords)
    np.testing.assert_array_equal(patches.grid, cells + [2, 0])

    trident_features, trident_coords, attrs = trident_reads(path)
    np.testing.assert_array_equal(trident_features, features)
    np.testing.assert_array_equal(trident_coords, coords)
    assert attrs['patch_size_level0'] == 512 and attrs['level0_magnification'] == 40

    reference = write_trident_style(tmp_path, 'ref', features, coords)
    with h5py.File(path) as ours, h5py.File(reference) as theirs:
        for key in ('features', 'coords'):
            a, b = ours[key], theirs[key]
            assert (a.dtype, a.chunks, a.maxshape, a.compression) == (
                b.dtype, b.chunks, b.maxshape, b.compression)
            assert set(b.attrs) <= set(a.attrs)
            for name in b.attrs:
                assert type(a.attrs[name]) is type(b.attrs[name]), (key, name)
        assert set(ours['coords'].attrs) - set(theirs['coords'].attrs) == {'mpp'}


def test_write_trident_without_mpp(tmp_path):
    """A slide of unknown resolution: mpp and magnifications 0 (train/extract.py)."""
    path = tmp_path / 's.h5'
    h5f.write_trident(path, some_features(2), [[0, 0], [224, 0]], encoder='e', patch_size=224,
                      patch_size_level0=224, level0_magnification=0.0, target_magnification=0.0,
                      level0_width=448, level0_height=224, mpp=0.0)
    info = h5f.inspect(path)
    assert (info.mpp, info.patch_size_level0, info.slide_size) == (0, 224, (448, 224))
    np.testing.assert_array_equal(h5f.read(info).grid, [[0, 0], [0, 1]])
    with h5py.File(path, 'a') as f:
        f['coords'].attrs['mpp'] = -0.5
    with raises(path, "coords.attrs['mpp']", 'not a positive number'):
        h5f.inspect(path)


def test_write_trident_refuses_nan(tmp_path):
    features = some_features(4)
    features[2, 1] = np.nan
    path = tmp_path / 'x.h5'
    with raises(path, 'features', '1 of 4 rows', 'row 2'):
        h5f.write_trident(path, features, np.zeros((4, 2)), encoder='e', patch_size=1,
                          patch_size_level0=1, level0_magnification=1, target_magnification=1,
                          level0_width=1, level0_height=1, mpp=1)
    assert not list(tmp_path.iterdir())


# --- bad files ----------------------------------------------------------------------------------

def plain_file(path, **datasets):
    with h5py.File(path, 'w') as f:
        for name, value in datasets.items():
            f[name] = value
    return path


def test_missing_datasets(tmp_path):
    path = plain_file(tmp_path / 'a.h5', coords=np.zeros((3, 2)))
    with raises(path, 'features', 'no dataset'):
        h5f.inspect(path)
    path = plain_file(tmp_path / 'b.h5', features=np.zeros((3, 4)))
    with raises(path, 'coords', 'missing'):
        h5f.inspect(path, patch_size_level0=256)


def test_shape_checks(tmp_path):
    path = plain_file(tmp_path / 'a.h5', features=np.zeros((10, 4)), coords=np.zeros((9, 2)))
    with raises(path, 'coords', '9 rows', '10'):
        h5f.inspect(path, patch_size_level0=256)
    path = plain_file(tmp_path / 'b.h5', features=np.zeros(10), coords=np.zeros((10, 2)))
    with raises(path, 'features', 'not \\[N, k\\]'):
        h5f.inspect(path, patch_size_level0=256)
    path = plain_file(tmp_path / 'c.h5', features=np.zeros((10, 4)), coords=np.zeros((10, 3)))
    with raises(path, 'coords', 'not \\[N, 2\\]'):
        h5f.inspect(path, patch_size_level0=256)
    path = plain_file(tmp_path / 'd.h5', features=np.array([['a', 'b']] * 2, dtype='S1'),
                      coords=np.zeros((2, 2)))
    with raises(path, 'features', 'not a number'):
        h5f.inspect(path, patch_size_level0=256)
    path = plain_file(tmp_path / 'e.h5', features=np.zeros((3, 0)), coords=np.zeros((3, 2)))
    with raises(path, 'features', 'no feature dimension'):
        h5f.inspect(path, patch_size_level0=256)


def test_trident_empty_slide(tmp_path):
    """A slide without tissue: TRIDENT saves features of shape (0,) and coords (0, 2)."""
    path = tmp_path / 'empty.h5'
    trident_save_h5(path, {'features': np.empty((0,), np.float32),
                           'coords': np.empty((0, 2), np.int64)},
                    {'features': {'encoder': 'uni_v1'}, 'coords': {'patch_size_level0': 512}})
    with raises(path, 'features', 'no patches'):
        h5f.inspect(path)


@pytest.mark.parametrize('value', [np.nan, 0, -4, 'big'])
def test_bad_patch_size_attr(tmp_path, value):
    path = write_trident_style(tmp_path, 's', some_features(3), np.zeros((3, 2)))
    with h5py.File(path, 'a') as f:
        f['coords'].attrs['patch_size_level0'] = value
    with raises(path, "coords.attrs['patch_size_level0']"):
        h5f.inspect(path)


@pytest.mark.parametrize('bad, row', [(np.nan, 3), (np.inf, 7), (-np.inf, 0)])
def test_non_finite_features(tmp_path, bad, row):
    features = some_features(20, dtype=np.float16)
    features[row, 5] = bad
    path = write_clam_style(tmp_path / 's.h5', features, some_cells(20) * 256)
    with raises(path, 'features', '1 of 20 rows', f'row {row}'):
        h5f.read(h5f.inspect(path, patch_size_level0=256))


def test_bad_coords(tmp_path):
    cells = some_cells(20)
    coords = (cells[:, ::-1] * 512).astype(np.float32)  # integer-valued floats are accepted
    for row, value, problem in ((4, np.nan, 'NaN or inf'), (6, -512, 'negative')):
        bad = coords.copy()
        bad[row, 1] = value
        path = tmp_path / f'{row}.h5'
        write_stamp_style(path, some_features(20), bad)
        with raises(path, 'coords', '1 of 20 rows', problem, f'row {row}'):
            h5f.read(h5f.inspect(path), mpp=0.5)
    path = plain_file(tmp_path / 'float.h5', features=some_features(20), coords=coords)
    np.testing.assert_array_equal(h5f.read(h5f.inspect(path, patch_size_level0=512)).grid, cells)


def test_coords_outside_slide(tmp_path):
    cells = some_cells(30)
    coords = cells[:, ::-1] * 512
    width = 6 * 512  # columns 6, 7 and 8 reach outside
    path = write_trident_style(tmp_path, 's', some_features(30), coords, width=width,
                               height=7 * 512)
    outside = cells[:, 1] >= 6
    with raises(path, 'coords', f'{outside.sum()} of 30 rows', 'outside',
                f'row {np.argmax(outside)}'):
        h5f.read(h5f.inspect(path))


def test_stamp_without_tile_size(tmp_path):
    path = write_stamp_style(tmp_path / 's.h5', some_features(3), np.zeros((3, 2)),
                             tile_size_um=None)
    with raises(path, "attrs['tile_size_um']", 'missing'):
        h5f.inspect(path)


def test_clam_without_patch_size(tmp_path):
    path = write_clam_style(tmp_path / 's.h5', some_features(3), np.zeros((3, 2)))
    with raises(path, 'patch_size_level0', 'features.patch_size_level0'):
        h5f.inspect(path)


def test_explicit_format_must_fit(tmp_path):
    trident = write_trident_style(tmp_path, 's', some_features(3), np.zeros((3, 2)))
    with raises(trident, 'feats', 'missing'):
        h5f.inspect(trident, format='stamp')
    clam = write_clam_style(tmp_path / 'c.h5', some_features(3), np.zeros((3, 2)))
    with raises(clam, "coords.attrs['patch_size_level0']", 'missing'):
        h5f.inspect(clam, format='trident')
    with raises(clam, 'format'):
        h5f.inspect(clam, format='qupath')


def test_links_and_foreign_storage_refused(tmp_path):
    other = plain_file(tmp_path / 'other.h5', features=some_features(3))
    with h5py.File(tmp_path / 'external_link.h5', 'w') as f:
        f['features'] = h5py.ExternalLink(str(other), 'features')
        f['coords'] = np.zeros((3, 2))
    with raises(tmp_path / 'external_link.h5', 'features', 'ExternalLink'):
        h5f.inspect(tmp_path / 'external_link.h5', patch_size_level0=1)

    with h5py.File(tmp_path / 'soft_link.h5', 'w') as f:
        f['features'] = some_features(3)
        f['hidden'] = np.zeros((3, 2))
        f['coords'] = h5py.SoftLink('/hidden')
    with raises(tmp_path / 'soft_link.h5', 'coords', 'SoftLink'):
        h5f.inspect(tmp_path / 'soft_link.h5', patch_size_level0=1)

    layout = h5py.VirtualLayout(shape=(3, 12), dtype='f4')
    layout[:] = h5py.VirtualSource(str(other), 'features', shape=(3, 12))
    with h5py.File(tmp_path / 'virtual.h5', 'w') as f:
        f.create_virtual_dataset('features', layout)
        f['coords'] = np.zeros((3, 2))
    with raises(tmp_path / 'virtual.h5', 'features', 'virtual'):
        h5f.inspect(tmp_path / 'virtual.h5', patch_size_level0=1)

    raw = tmp_path / 'raw.bin'
    raw.write_bytes(np.zeros((3, 2), np.float32).tobytes())
    with h5py.File(tmp_path / 'external.h5', 'w') as f:
        f['features'] = some_features(3)
        f.create_dataset('coords', shape=(3, 2), dtype='f4',
                         external=[(str(raw), 0, h5py.h5f.UNLIMITED)])
    with raises(tmp_path / 'external.h5', 'coords', 'external storage'):
        h5f.inspect(tmp_path / 'external.h5', patch_size_level0=1)


def test_not_hdf5(tmp_path):
    good = write_clam_style(tmp_path / 'good.h5', some_features(64), np.zeros((64, 2)))
    truncated = tmp_path / 'truncated.h5'
    truncated.write_bytes(good.read_bytes()[:good.stat().st_size // 2])
    garbage = tmp_path / 'garbage.h5'
    garbage.write_bytes(RNG.bytes(4096))
    for path in (truncated, garbage, tmp_path / 'absent.h5'):
        with raises(path, 'file', 'not a readable HDF5 file'):
            h5f.inspect(path, patch_size_level0=1)
        with raises(path, 'file'):
            h5f.detect_format(path)


def test_absurd_shape_refused_before_reading(tmp_path):
    path = tmp_path / 'huge.h5'
    with h5py.File(path, 'w') as f:  # chunked and never written: sparse, a few KiB on disk
        f.create_dataset('features', shape=(2**40, 1024), chunks=(64, 1024), dtype='f4')
        f.create_dataset('coords', shape=(2**40, 2), chunks=(4096, 2), dtype='i8')
    assert path.stat().st_size < 1 << 20
    with raises(path, 'features', 'cap'):
        h5f.inspect(path, patch_size_level0=256)
