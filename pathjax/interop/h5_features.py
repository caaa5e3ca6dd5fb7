"""Per-slide patch-feature .h5 files of TRIDENT, CLAM and STAMP (v2): validate, read, and write
TRIDENT's layout.

Layouts, as each tool's own code writes them (checked against these snapshots):
- TRIDENT, github.com/mahmoodlab/TRIDENT @ a91fa8490e0210ebbbe58452c3babe009e0ab7ca:
  trident/IO.py `save_h5` (each dataset chunked (1, ...) with maxshape (None, ...), no
  compression; a None attr is stored as the string 'None') and `coords_to_h5`;
  trident/wsi_objects/WSI.py `extract_patch_features`. `features` [N, D] float32 (float16 under
  a half-precision encoder), attrs `name`, `savetodir`, `encoder` (str); `coords` [N, 2] int64
  level-0 top-left (x, y), attrs (ints unless noted) `patch_size`, `patch_size_level0`
  (= patch_size * level0_magnification // target_magnification), `level0_magnification`,
  `target_magnification`, `overlap`, `name` (str), `savetodir` (str), `level0_width`,
  `level0_height`. TRIDENT records no mpp; `write_trident` adds `mpp` on coords.
- CLAM, github.com/mahmoodlab/CLAM @ 53e2409d4a8189c682c173382964a85f114f923c:
  utils/file_utils.py `save_hdf5` (chunks (32, ...), maxshape (None, ...), appended batch by
  batch) and extract_features_fp.py `compute_w_loader`: `features` [N, D] float32, `coords`
  [N, 2] int32 level-0 top-left (x, y), no attrs; the level-0 patch side is the caller's.
- STAMP v2, github.com/KatherLab/STAMP @ c54ce06739622c127a83eccb35a7082e504b9aef:
  src/stamp/preprocessing/__init__.py `extract_` (contiguous datasets, no chunks) and
  src/stamp/preprocessing/tiling.py: `feats` [N, D] float16, `coords` [N, 2] float32 top-left
  (x, y) in micrometres (level-0 px * slide mpp); file attrs `stamp_version`, `extractor`,
  `unit` = 'um', `tile_size_um` (float), `tile_size_px` (int), `code_hash`, `feat_type` = 'tile'.
  Like STAMP's own reader (src/stamp/modeling/data.py `get_coords`), a file of v2.0 with
  `tile_size` and `unit` = 'um' is read too.
"""

import contextlib
import dataclasses
import math
import os
import pathlib
from typing import Iterator

import h5py
import numpy as np

from pathjax.artifacts import atomic_path

FORMATS = ('auto', 'trident', 'clam', 'stamp')
MAX_FEATURE_BYTES = 8 << 30  # N * D * 4 (float32): larger files are refused before any read
_READ_BYTES = 64 << 20  # features are read, converted and checked this many bytes at a time
_FEATURES = {'trident': 'features', 'clam': 'features', 'stamp': 'feats'}
_MAX_COORD = 2.0 ** 53  # beyond this a coordinate is no pixel position (and int64 casts break)


class FeatureFileError(ValueError):
    """A feature file that cannot be used; the message names the file and the field."""


@dataclasses.dataclass(frozen=True)
class FeatureFileInfo:
    """What a feature file's headers say (no feature rows read)."""
    path: pathlib.Path
    format: str  # 'trident' | 'clam' | 'stamp'
    num_patches: int  # N
    feature_dim: int  # D
    encoder: str  # trident features.attrs['encoder'], stamp attrs['extractor'], '' if none
    coords_unit: str  # 'px' (level 0) or 'um'
    patch_size_level0: float  # patch side in level-0 px; 0.0 for stamp (see tile_size_um)
    tile_size_um: float  # stamp's tile side in micrometres; 0.0 otherwise
    slide_size: tuple[int, int] | None  # (level0_width, level0_height) when recorded
    mpp: float  # microns per level-0 px when recorded (coords.attrs['mpp']), else 0.0


@dataclasses.dataclass(frozen=True)
class ImportedPatches:
    """A slide's patches, validated."""
    features: np.ndarray  # float32 [N, D]
    coords: np.ndarray  # int64 [N, 2] level-0 px (x, y) top-left (stamp without mpp: um)
    grid: np.ndarray  # int64 [N, 2] absolute (row, col) = rint(y / step), rint(x / step)
    extent: float  # patch side in the unit of coords


def _error(path, field: str, problem: str) -> FeatureFileError:
    return FeatureFileError(f'{path}: {field}: {problem}')


def _field(obj, name: str) -> str:
    """'coords.attrs['x']' for a dataset's attr, 'attrs['x']' for the file's."""
    owner = obj.name.lstrip('/')
    return f'{owner}.attrs[{name!r}]' if owner else f'attrs[{name!r}]'


@contextlib.contextmanager
def _open(path: pathlib.Path) -> Iterator[h5py.File]:
    try:
        f = h5py.File(path, 'r')
    except OSError as error:
        raise _error(path, 'file', f'not a readable HDF5 file ({error})') from error
    with f:
        yield f


def _link(f: h5py.File, name: str):
    """The link `name` in the file's root without following it; None when absent."""
    return f.get(name, getlink=True)


def _detect(f: h5py.File, path: pathlib.Path) -> str:
    if _link(f, 'features') is not None:
        for name, marker in (('coords', 'patch_size_level0'), ('features', 'encoder')):
            hard = isinstance(_link(f, name), h5py.HardLink)
            if hard and marker in _dataset_attrs(f, path, name):
                return 'trident'
        return 'clam'
    if _link(f, 'feats') is not None:
        return 'stamp'
    raise _error(path, 'features', f"no dataset 'features' (TRIDENT, CLAM) or 'feats' (STAMP); "
                 f'the file holds {sorted(f.keys())}')


def _dataset_attrs(f: h5py.File, path: pathlib.Path, name: str) -> h5py.AttributeManager:
    try:
        return f[name].attrs
    except (OSError, KeyError, RuntimeError) as error:
        raise _error(path, name, f'unreadable ({error})') from error


def _dataset(f: h5py.File, path: pathlib.Path, name: str, fmt: str) -> h5py.Dataset:
    """The hard-linked, self-contained, numeric [N, k] dataset `name`."""
    link = _link(f, name)
    if link is None:
        raise _error(path, name, f'missing: a {fmt} file has a dataset {name!r}')
    if not isinstance(link, h5py.HardLink):
        raise _error(path, name, f'is a {type(link).__name__}, which would read another object '
                     'or file; only datasets stored in this file are read')
    try:
        dset = f[name]
    except (OSError, KeyError, RuntimeError) as error:
        raise _error(path, name, f'unreadable ({error})') from error
    if not isinstance(dset, h5py.Dataset):
        raise _error(path, name, f'is a {type(dset).__name__}, not a dataset')
    if dset.is_virtual:
        raise _error(path, name, 'is a virtual dataset (its data lives in other files)')
    if dset.external is not None:
        raise _error(path, name, 'uses external storage (its data lives in other files)')
    if dset.dtype.kind not in 'iuf':
        raise _error(path, name, f'has dtype {dset.dtype}, not a number')
    shape = dset.shape
    if shape is None or len(shape) != 2:
        if shape is not None and len(shape) == 1 and shape[0] == 0:
            raise _error(path, name, 'is empty: the slide has no patches')
        raise _error(path, name, f'has shape {shape}, not [N, k]')
    return dset


def _datasets(f: h5py.File, path: pathlib.Path, fmt: str) -> tuple[h5py.Dataset, h5py.Dataset]:
    """(features [N, D], coords [N, 2]) after the checks that need only the headers."""
    features_name = _FEATURES[fmt]
    features = _dataset(f, path, features_name, fmt)
    coords = _dataset(f, path, 'coords', fmt)
    (n, d), (n_coords, two) = features.shape, coords.shape
    if two != 2:
        raise _error(path, 'coords', f'has shape {coords.shape}, not [N, 2]')
    if n != n_coords:
        raise _error(path, 'coords', f'has {n_coords} rows but {features_name} has {n}')
    if n == 0:
        raise _error(path, features_name, 'is empty: the slide has no patches')
    if d == 0:
        raise _error(path, features_name, f'has shape {features.shape}: no feature dimension')
    for dset, size in ((features, n * d * 4), (coords, n * 2 * 8)):
        if size > MAX_FEATURE_BYTES:
            raise _error(path, dset.name.lstrip('/'),
                         f'shape {dset.shape} needs {size / 2**30:.1f} GiB in memory, over '
                         f'the {MAX_FEATURE_BYTES / 2**30:.0f} GiB cap')
    return features, coords


def _number(path: pathlib.Path, obj, name: str, required: bool,
            zero_ok: bool = False) -> float | None:
    """A positive (or, with zero_ok, zero: unknown), finite number attr of obj (a dataset or the
    file); None when absent and not required."""
    field = _field(obj, name)
    if name not in obj.attrs:
        if required:
            raise _error(path, field, 'missing')
        return None
    try:
        value = np.asarray(obj.attrs[name])
    except (OSError, TypeError, ValueError) as error:
        raise _error(path, field, f'unreadable ({error})') from error
    if value.size != 1 or value.dtype.kind not in 'iuf':
        raise _error(path, field, f'is {value!r}, not a number')
    number = float(value.reshape(()))
    if not (math.isfinite(number) and (number > 0 or zero_ok and number == 0)):
        raise _error(path, field, f'is {number}, not a positive number')
    return number


def _text(obj, name: str) -> str:
    """A string attr of obj; '' when absent or TRIDENT's 'None'."""
    value = obj.attrs.get(name, '')
    if isinstance(value, np.ndarray) and value.size == 1:
        value = value.reshape(()).item()
    if isinstance(value, bytes):
        value = value.decode('utf-8', errors='replace')
    value = str(value)
    return '' if value == 'None' else value


def detect_format(path: str | os.PathLike) -> str:
    """'trident', 'clam' or 'stamp', from the datasets and attrs present (no data read)."""
    path = pathlib.Path(path)
    with _open(path) as f:
        return _detect(f, path)


def inspect(path: str | os.PathLike, format: str = 'auto',
            patch_size_level0: float = 0.0) -> FeatureFileInfo:
    """Validates a feature file from its headers alone.

    Args:
        path: the .h5 file.
        format: one of FORMATS; 'auto' detects it.
        patch_size_level0: a patch's side in level-0 px for CLAM files, which do not record it
            (`features.patch_size_level0` in the config); ignored for the other formats.
    Raises:
        FeatureFileError: naming the file and the field at fault.
    """
    path = pathlib.Path(path)
    if format not in FORMATS:
        raise _error(path, 'format', f'{format!r} is not one of {FORMATS}')
    with _open(path) as f:
        fmt = _detect(f, path) if format == 'auto' else format
        features, coords = _datasets(f, path, fmt)
        n, d = features.shape
        slide_size, mpp, tile_size_um = None, 0.0, 0.0
        if fmt == 'stamp':
            encoder, unit, patch_size_level0 = _text(f, 'extractor'), 'um', 0.0
            tile_size_um = _stamp_tile_size_um(f, path)
        elif fmt == 'trident':
            encoder, unit = _text(features, 'encoder'), 'px'
            patch_size_level0 = _number(path, coords, 'patch_size_level0', required=True)
            width = _number(path, coords, 'level0_width', required=False)
            height = _number(path, coords, 'level0_height', required=False)
            if width is not None and height is not None:
                slide_size = (int(round(width)), int(round(height)))
            mpp = _number(path, coords, 'mpp', required=False, zero_ok=True) or 0.0
        else:
            encoder, unit = '', 'px'
            if not (math.isfinite(patch_size_level0) and patch_size_level0 > 0):
                raise _error(path, 'patch_size_level0', f'is {patch_size_level0}: CLAM files do '
                             "not record a patch's size; set features.patch_size_level0 to its "
                             'side in level-0 pixels')
    return FeatureFileInfo(path=path, format=fmt, num_patches=n, feature_dim=d, encoder=encoder,
                           coords_unit=unit, patch_size_level0=float(patch_size_level0),
                           tile_size_um=tile_size_um, slide_size=slide_size, mpp=mpp)


def _stamp_tile_size_um(f: h5py.File, path: pathlib.Path) -> float:
    unit = _text(f, 'unit')
    if unit not in ('', 'um'):
        raise _error(path, "attrs['unit']", f"is {unit!r}; STAMP v2 coords are in 'um'")
    if 'tile_size_um' in f.attrs:
        return _number(path, f, 'tile_size_um', required=True)
    if unit == 'um' and 'tile_size' in f.attrs:  # STAMP 2.0
        return _number(path, f, 'tile_size', required=True)
    raise _error(path, "attrs['tile_size_um']", 'missing: without the tile side the micrometre '
                 'coords cannot be placed on a grid (re-extract with STAMP v2)')


def read(info: FeatureFileInfo, mpp: float = 0.0) -> ImportedPatches:
    """Reads and checks the features and coords that `inspect` described.

    Args:
        info: from `inspect`.
        mpp: microns per level-0 px, to turn STAMP's micrometre coords into pixels (else
            info.mpp); ignored for pixel coords. A STAMP file with no mpp at all is returned as a
            micrometre map: coords = rint(coords_um), extent = tile_size_um (the grid is right).
    Returns:
        features float32 [N, D] (read in row blocks, so a float16 file does not double the peak
        memory), coords int64 [N, 2] (x, y) top-left, grid int64 [N, 2] (row, col), extent.
    Raises:
        FeatureFileError: NaN or inf features, NaN/inf/negative coords, coords outside the slide,
            or a file that changed since `inspect`.
    """
    path = info.path
    mpp = mpp or info.mpp
    if not (math.isfinite(mpp) and mpp >= 0):
        raise _error(path, 'mpp', f'is {mpp}, not a positive number')
    with _open(path) as f:
        features_dset, coords_dset = _datasets(f, path, info.format)
        expected = (info.num_patches, info.feature_dim)
        if features_dset.shape != expected:
            raise _error(path, features_dset.name.lstrip('/'),
                         f'has shape {features_dset.shape}, not {expected}: changed since inspect')
        features = _read_features(path, features_dset)
        try:
            raw = np.asarray(coords_dset[()], dtype=np.float64)
        except (OSError, RuntimeError) as error:
            raise _error(path, 'coords', f'unreadable ({error})') from error
    for description, bad in (('NaN or inf', ~np.isfinite(raw)), ('negative', raw < 0),
                             ('over 2**53', raw > _MAX_COORD)):
        _refuse_rows(path, 'coords', bad.any(axis=1), description)
    if info.coords_unit == 'um':
        step = info.tile_size_um
        grid_source = raw
        scale = mpp if mpp > 0 else 1.0
        coords = np.rint(raw / scale).astype(np.int64)
        extent = info.tile_size_um / scale
    else:
        step = extent = info.patch_size_level0
        coords = np.rint(raw).astype(np.int64)
        grid_source = coords.astype(np.float64)
    if info.slide_size is not None:
        width, height = info.slide_size
        outside = (coords[:, 0] + extent > width + 1) | (coords[:, 1] + extent > height + 1)
        _refuse_rows(path, 'coords', outside,
                     f'patches of side {extent:g} reach outside the {width}x{height} slide')
    grid = np.rint(grid_source[:, ::-1] / step).astype(np.int64)
    return ImportedPatches(features=features, coords=coords, grid=grid, extent=float(extent))


def _read_features(path: pathlib.Path, dset: h5py.Dataset) -> np.ndarray:
    """float32 [N, D], read and checked in row blocks; NaN or inf rows are refused."""
    n, d = dset.shape
    out = np.empty((n, d), np.float32)
    rows = max(1, _READ_BYTES // (4 * d))
    field = dset.name.lstrip('/')
    bad = np.zeros(n, bool)
    for start in range(0, n, rows):
        block = np.s_[start:min(n, start + rows)]
        try:
            dset.read_direct(out, block, block)
        except (OSError, RuntimeError, TypeError) as error:
            raise _error(path, field, f'unreadable ({error})') from error
        bad[block] = ~np.isfinite(out[block]).all(axis=1)
    _refuse_rows(path, field, bad, 'NaN or inf')
    return out


def _refuse_rows(path: pathlib.Path, field: str, bad: np.ndarray, description: str) -> None:
    """FeatureFileError naming how many rows are bad and the first, if any is."""
    if bad.any():
        first = int(np.argmax(bad))
        raise _error(path, field, f'{int(bad.sum())} of {bad.size} rows {description} '
                     f'(first: row {first})')


def _same_number(value: float) -> int | float:
    """An int when value is whole (TRIDENT writes magnifications as ints), else the float."""
    return int(value) if float(value).is_integer() else float(value)


def write_trident(path: str | os.PathLike, features: np.ndarray, coords: np.ndarray, *,
                  encoder: str, patch_size: int, patch_size_level0: int,
                  level0_magnification: float, target_magnification: float, level0_width: int,
                  level0_height: int, mpp: float) -> None:
    """Writes features in TRIDENT's layout (trident/IO.py save_h5), atomically.

    Args:
        path: the .h5 file; written under a temporary name next to it, then renamed.
        features: [N, D], stored as float32 `features` with attrs name, savetodir, encoder.
        coords: [N, 2] level-0 px (x, y) top-left, stored as int64 `coords` with TRIDENT's attrs
            (overlap 0, name and savetodir from path) plus `mpp` (0: unknown, as are
            magnifications of 0).
    Raises:
        FeatureFileError: features not a finite [N, D] with N, D > 0, or coords not [N, 2].
    """
    path = pathlib.Path(path)
    features = np.asarray(features, np.float32)
    coords = np.asarray(coords)
    if features.ndim != 2 or 0 in features.shape:
        raise _error(path, 'features', f'has shape {features.shape}, not [N, D] with N, D > 0')
    _refuse_rows(path, 'features', ~np.isfinite(features).all(axis=1), 'NaN or inf')
    if coords.shape != (len(features), 2):
        raise _error(path, 'coords', f'has shape {coords.shape}, not {(len(features), 2)}')
    name, savetodir = path.stem, str(path.parent)
    attributes = {
        'features': {'name': name, 'savetodir': savetodir, 'encoder': encoder},
        'coords': {
            'patch_size': int(patch_size),
            'patch_size_level0': int(patch_size_level0),
            'level0_magnification': _same_number(level0_magnification),
            'target_magnification': _same_number(target_magnification),
            'overlap': 0,
            'name': name,
            'savetodir': savetodir,
            'level0_width': int(level0_width),
            'level0_height': int(level0_height),
            'mpp': float(mpp),
        },
    }
    assets = {'features': features, 'coords': coords.astype(np.int64)}
    with atomic_path(path) as temporary:
        with h5py.File(temporary, 'w') as f:
            for key, value in assets.items():
                dset = f.create_dataset(key, shape=value.shape, maxshape=(None,) + value.shape[1:],
                                        chunks=(1,) + value.shape[1:], dtype=value.dtype)
                dset[:] = value
                for attr, attr_value in attributes[key].items():
                    dset.attrs[attr] = attr_value
