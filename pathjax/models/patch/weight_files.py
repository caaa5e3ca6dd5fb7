"""Weight files are hostile input: state_dicts from .safetensors, .npz and torch (.pth/.pt/.bin)
files, every header checked before any tensor data is read.

  with open_weights('uni.safetensors') as weights:  # headers only
      weights['pos_embed']  # TensorHeader(shape=(1, 197, 1024), dtype=float32)
      pos_embed = weights.read('pos_embed')  # the data of this one tensor

Callers check the headers against what they expect (`pretrained.check_vgg16`,
`vit_weights.check`) and then read only the tensors they use, so a file makes pathjax allocate
at most the bytes of the expected tensors: a .safetensors tensor is exactly its byte range, a
compressed .npz member is read up to its expected size and no further, and members nobody uses
are never read. Every way a file can be malformed raises `PretrainedWeightsError` naming it.
"""

import abc
import contextlib
import dataclasses
import json
import math
import os
import pathlib
import tokenize
import zipfile
import zlib
from collections.abc import Iterable, Iterator, Mapping

import ml_dtypes
import numpy as np

TORCH_SUFFIXES = ('.pth', '.pt', '.bin')
NPZ_SUFFIX = '.npz'
SAFETENSORS_SUFFIX = '.safetensors'

SAFETENSORS_DTYPES = {'F64': np.float64, 'F32': np.float32, 'F16': np.float16,
                      'BF16': ml_dtypes.bfloat16,
                      'I64': np.int64, 'I32': np.int32, 'I16': np.int16, 'I8': np.int8,
                      'U8': np.uint8, 'BOOL': np.bool_}
WIDENED_TO_FLOAT32 = ('BF16', 'F16')  # safetensors dtypes that `read` returns as float32
MAX_SAFETENSORS_HEADER = 16 << 20  # bytes of JSON: a ViT-g's is 60 kB; parsing costs ~24x this
MAX_NDIM = 64  # numpy's
MAX_NPY_HEADER = 10_000  # characters of an .npy header dict (numpy's own limit)
NPY_PREFIX = {(1, 0): 10, (2, 0): 12}  # .npy version -> bytes of magic, version and header length
READ_CHUNK = 1 << 24  # bytes decompressed or read per call


class PretrainedWeightsError(ValueError):
    """A pretrained-weights file that is missing, malformed, or not what the model expects."""


@dataclasses.dataclass(frozen=True)
class TensorHeader:
    """What a file says about one tensor before its data is read: its shape and the dtype of the
    array that `WeightsFile.read` returns."""

    shape: tuple[int, ...]
    dtype: np.dtype


class WeightsFile(Mapping[str, TensorHeader], abc.ABC):
    """An open weights file: key -> TensorHeader; `read(key)` reads one tensor. A 'module.'
    prefix ((Distributed)DataParallel's) is dropped from every key. Use it as a context manager."""

    description = ''  # 'cannot read as {description}'
    parser_errors: tuple[type[Exception], ...] = ()  # what its parsers raise for a bad file

    def __init__(self, path: pathlib.Path):
        self.path = path
        self._close = contextlib.ExitStack()  # what `close` closes
        try:
            self._open()
        except BaseException:
            self.close()
            raise

    @abc.abstractmethod
    def _open(self) -> None:
        """Reads and checks what the file says about its tensors."""

    def __enter__(self) -> 'WeightsFile':
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self._close.close()

    @abc.abstractmethod
    def read(self, key: str) -> np.ndarray:
        """The tensor `key` (KeyError if the file has none)."""

    def _refusal(self, problem: str) -> PretrainedWeightsError:
        return PretrainedWeightsError(f'{self.path}: cannot read as {self.description}: '
                                      f'{problem}')

    @contextlib.contextmanager
    def _parsing(self) -> Iterator[None]:
        """Turns the parsers' exceptions into PretrainedWeightsError naming the file."""
        try:
            yield
        except PretrainedWeightsError:
            raise
        except self.parser_errors as error:
            kind = type(error)
            name = (kind.__name__ if kind.__module__ == 'builtins'
                    else f'{kind.__module__}.{kind.__name__}')  # zlib.error, not error
            raise self._refusal(f'{name}: {error}') from error


def _unprefixed(keys: Iterable[str]) -> list[str]:
    """Keys without the 'module.' prefix; ValueError if two become the same."""
    seen, out = set(), []
    for key in keys:
        key = key.removeprefix('module.')
        if key in seen:
            raise ValueError(f'key {key!r} appears twice')
        seen.add(key)
        out.append(key)
    return out


def _read_exactly(stream, nbytes: int) -> np.ndarray:
    """The next `nbytes` bytes of `stream` as uint8 [nbytes], read in chunks (a stream that ends
    early raises EOFError; nothing past `nbytes` is read)."""
    out = np.empty(nbytes, np.uint8)
    filled = 0
    while filled < nbytes:
        chunk = stream.read(min(READ_CHUNK, nbytes - filled))
        if not chunk:
            raise EOFError(f'the data ends after {filled} of {nbytes} bytes')
        out[filled:filled + len(chunk)] = np.frombuffer(chunk, np.uint8)
        filled += len(chunk)
    return out


def _describe(shape: tuple[int, ...], dtype: np.dtype, nbytes: int) -> str:
    return f'shape {shape} {dtype} ({nbytes} bytes)'


# .safetensors: an 8-byte little-endian header size, a JSON header of dtype, shape and byte
# offsets (relative to the data section) per tensor, then the raw little-endian data.


@dataclasses.dataclass(frozen=True)
class _SafetensorsEntry:
    header: TensorHeader
    stored: np.dtype
    begin: int  # [begin, end) within the data section
    end: int


def _json_object(pairs: list[tuple[str, object]]) -> dict:
    """json.loads' object_pairs_hook: a dict, refusing duplicate keys."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f'the JSON header has key {key!r} twice')
        out[key] = value
    return out


def _is_int(value) -> bool:
    return type(value) is int  # pylint: disable=unidiomatic-typecheck  (JSON true is not 1)


class SafetensorsFile(WeightsFile):
    """A .safetensors file: the JSON header is parsed and checked whole on opening (dtypes
    known, shapes lists of non-negative ints, byte ranges inside the data section, of exactly
    the tensor's size and not overlapping); `read` copies one tensor's bytes (bfloat16 and
    float16 become float32)."""

    description = '.safetensors'
    parser_errors = (OSError, ValueError, RecursionError)  # ValueError: JSON, UTF-8, ours

    def _open(self) -> None:
        with self._parsing():
            self._file = self._close.enter_context(open(self.path, 'rb'))
            size = os.fstat(self._file.fileno()).st_size
            if size < 8:
                raise self._refusal(f'{size} bytes, shorter than the 8-byte header size')
            header_size = int.from_bytes(self._file.read(8), 'little')
            if header_size > min(MAX_SAFETENSORS_HEADER, size - 8):
                raise self._refusal(f'a header of {header_size} bytes in a file of {size} bytes '
                                   f'(at most {MAX_SAFETENSORS_HEADER} bytes)')
            header = json.loads(self._file.read(header_size).decode('utf-8'),
                                object_pairs_hook=_json_object)
            self._data_start = 8 + header_size
            self._entries = self._checked_entries(header, size - self._data_start)

    def _checked_entries(self, header, data_size: int) -> dict[str, _SafetensorsEntry]:
        if not isinstance(header, dict):
            raise self._refusal(f'the JSON header is a {type(header).__name__}, not an object')
        metadata = header.pop('__metadata__', {})
        if not (isinstance(metadata, dict)
                and all(isinstance(value, str) for value in metadata.values())):
            raise self._refusal('__metadata__ is not an object of strings')
        entries = {key: self._checked_entry(key, info)
                   for key, info in zip(_unprefixed(header), header.values(), strict=True)}
        for key, entry in entries.items():
            if entry.end > data_size:
                raise self._refusal(f'tensor {key!r}: bytes {entry.begin}-{entry.end} lie past the '
                                   f'end of the {data_size}-byte data section')
        ranges = sorted((entry.begin, entry.end, key) for key, entry in entries.items())
        for (_, end, key), (begin, _, next_key) in zip(ranges, ranges[1:]):
            if begin < end:
                raise self._refusal(f'tensors {key!r} and {next_key!r} overlap')
        return entries

    def _checked_entry(self, key: str, info) -> _SafetensorsEntry:
        fields = ('dtype', 'shape', 'data_offsets')
        if not (isinstance(info, dict) and all(field in info for field in fields)):
            raise self._refusal(f'tensor {key!r}: not an object with {", ".join(fields)}')
        dtype, shape, offsets = (info[field] for field in fields)
        if not (isinstance(dtype, str) and dtype in SAFETENSORS_DTYPES):
            raise self._refusal(f'tensor {key!r}: unknown dtype {dtype!r} (known: '
                               f'{", ".join(SAFETENSORS_DTYPES)})')
        if not (isinstance(shape, list) and len(shape) <= MAX_NDIM
                and all(_is_int(n) and n >= 0 for n in shape)):
            raise self._refusal(f'tensor {key!r}: shape {shape!r} is not a list of at most '
                               f'{MAX_NDIM} non-negative integers')
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_int, offsets))
                and 0 <= offsets[0] <= offsets[1]):
            raise self._refusal(f'tensor {key!r}: data_offsets {offsets!r} is not a pair '
                               f'[begin, end] of integers with 0 <= begin <= end')
        stored = np.dtype(SAFETENSORS_DTYPES[dtype])
        nbytes = math.prod(shape) * stored.itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise self._refusal(f'tensor {key!r}: bytes {offsets[0]}-{offsets[1]} do not hold '
                               f'{_describe(tuple(shape), stored, nbytes)}')
        read_as = np.dtype(np.float32) if dtype in WIDENED_TO_FLOAT32 else stored
        return _SafetensorsEntry(TensorHeader(tuple(shape), read_as), stored, *offsets)

    def __getitem__(self, key: str) -> TensorHeader:
        return self._entries[key].header

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def read(self, key: str) -> np.ndarray:
        entry = self._entries[key]
        with self._parsing():
            self._file.seek(self._data_start + entry.begin)
            data = _read_exactly(self._file, entry.end - entry.begin)
        array = data.view(entry.stored).reshape(entry.header.shape)
        return array.astype(entry.header.dtype, copy=False)


# .npz: a zip of .npy members (a magic string, a version, a Python-literal header dict of
# descr, fortran_order and shape, then the raw data), stored or deflated.


@dataclasses.dataclass(frozen=True)
class _NpyMember:
    header: TensorHeader
    offset: int  # bytes of magic, version and header before the data
    fortran_order: bool


class _Prefix:
    """The first `limit` bytes of a stream (reading past them gives b''), counting what is read."""

    def __init__(self, stream, limit: int):
        self._stream, self._left, self.consumed = stream, limit, 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(self._left if size < 0 else min(size, self._left))
        self._left -= len(data)
        self.consumed += len(data)
        return data


def _npz_dtype_problem(dtype: np.dtype) -> str | None:
    """Why an .npy dtype is refused (objects would need pickle; records, strings, dates and
    complex numbers are no weights), or None."""
    if dtype.kind not in 'biuf' or dtype.fields is not None or dtype.subdtype is not None:
        return f'dtype {dtype} is not a boolean, integer or floating-point type'
    return None


class NpzFile(WeightsFile):
    """An .npz file: member names from the zip's central directory on opening; a member's .npy
    header (shape, dtype; its uncompressed size must be exactly header + data) when its key is
    looked up; its data, in chunks and never past that size, by `read`. No pickle."""

    description = '.npz'
    parser_errors = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError,
                     NotImplementedError)  # NotImplementedError: zip features zipfile lacks

    def _open(self) -> None:
        with self._parsing():
            self._zip = self._close.enter_context(zipfile.ZipFile(self.path))
            infos = self._zip.infolist()
            for info in infos:
                if not info.filename.endswith('.npy'):
                    raise self._refusal(f'member {info.filename!r} is not an .npy array')
            keys = _unprefixed(info.filename.removesuffix('.npy') for info in infos)
        self._infos = dict(zip(keys, infos, strict=True))
        self._members: dict[str, _NpyMember] = {}

    def _member(self, key: str) -> _NpyMember:
        if key not in self._members:
            info = self._infos[key]
            with self._parsing():
                self._members[key] = self._parse_member(info)
        return self._members[key]

    def _parse_member(self, info: zipfile.ZipInfo) -> _NpyMember:
        name = info.filename
        if info.flag_bits & 0x1:
            raise self._refusal(f'member {name!r} is encrypted')
        if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            raise self._refusal(f'member {name!r} uses zip compression method '
                               f'{info.compress_type} (stored or deflated only)')
        with self._zip.open(info) as member:
            stream = _Prefix(member, max(NPY_PREFIX.values()) + MAX_NPY_HEADER)
            version = np.lib.format.read_magic(stream)
            if version not in NPY_PREFIX:
                raise self._refusal(f'member {name!r}: .npy version {version} (1.0 or 2.0 only)')
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            try:
                shape, fortran_order, dtype = read_header(stream, max_header_size=MAX_NPY_HEADER)
            except (RecursionError, MemoryError, tokenize.TokenError) as error:
                # Python's parser and tokenizer (numpy's header parsers) on a header of at most
                # MAX_NPY_HEADER characters: nested too deeply, or cut short.
                raise self._refusal(f'member {name!r}: unreadable .npy header') from error
        problem = _npz_dtype_problem(dtype)
        if problem:
            raise self._refusal(f'member {name!r}: {problem}')
        if len(shape) > MAX_NDIM or any(n < 0 for n in shape):
            raise self._refusal(f'member {name!r}: shape {shape} has negative sizes or more '
                               f'than {MAX_NDIM} dimensions')
        nbytes = math.prod(shape) * dtype.itemsize
        if info.file_size != stream.consumed + nbytes:
            raise self._refusal(f'member {name!r} holds {info.file_size} bytes, but its '
                               f'{stream.consumed}-byte .npy header describes '
                               f'{_describe(shape, dtype, nbytes)} after it')
        return _NpyMember(TensorHeader(shape, dtype), stream.consumed, fortran_order)

    def __getitem__(self, key: str) -> TensorHeader:
        return self._member(key).header

    def __contains__(self, key) -> bool:
        return key in self._infos  # without parsing the member

    def __iter__(self) -> Iterator[str]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def read(self, key: str) -> np.ndarray:
        member = self._member(key)
        shape, dtype = member.header.shape, member.header.dtype
        with self._parsing(), self._zip.open(self._infos[key]) as stream:
            stream.read(member.offset)
            data = _read_exactly(stream, math.prod(shape) * dtype.itemsize)
            if stream.read(1):  # the declared size ends here; this also checks the CRC
                raise self._refusal(f'member {self._infos[key].filename!r} is longer than its '
                                   f'declared size')
        if member.fortran_order:
            return data.view(dtype).reshape(shape[::-1]).T
        return data.view(dtype).reshape(shape)


# torch: torch.load(weights_only=True), memory-mapped (a zip-format file; legacy files are
# read whole), so looking at shapes reads no tensor data.


def _import_torch(path: pathlib.Path):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError as error:
        raise ImportError(
            f'{path}: reading a {path.suffix} file needs PyTorch; install the torch extra '
            f"(pip install -e '.[torch]') or convert the file to .npz where torch is installed "
            f'(python -m pathjax.models.patch.pretrained {path.name} {path.stem}.npz)') from error
    return torch


class TorchFile(WeightsFile):
    """A PyTorch state_dict (.pth/.pt/.bin; a dict wrapped under 'state_dict' too): its tensors
    with string keys; floating ones are read as float32, booleans and integers as they are,
    other entries are dropped."""

    description = 'a PyTorch state_dict (torch.load, weights_only=True)'
    # torch.load raises unpickling, zip, EOF, runtime and other errors on a bad file.
    parser_errors = (Exception,)

    def _open(self) -> None:
        path = self.path
        torch = _import_torch(path)
        with self._parsing():
            loaded = torch.load(path, map_location='cpu', weights_only=True,
                                mmap=zipfile.is_zipfile(path))
        if isinstance(loaded, Mapping) and isinstance(loaded.get('state_dict'), Mapping):
            loaded = loaded['state_dict']
        if not isinstance(loaded, Mapping):
            raise PretrainedWeightsError(
                f'{path}: holds a {type(loaded).__name__}, not a state_dict (a dict of tensors)')
        exact = {torch.bool: np.bool_, torch.uint8: np.uint8, torch.int8: np.int8,
                 torch.int16: np.int16, torch.int32: np.int32, torch.int64: np.int64}
        tensors = {key: value for key, value in loaded.items() if isinstance(key, str)
                   and isinstance(value, torch.Tensor)
                   and (value.is_floating_point() or value.dtype in exact)}
        with self._parsing():
            keys = _unprefixed(tensors)
        self._tensors = dict(zip(keys, tensors.values(), strict=True))
        self._headers = {key: TensorHeader(tuple(value.shape), np.dtype(
            np.float32 if value.is_floating_point() else exact[value.dtype]))
            for key, value in self._tensors.items()}
        self._torch = torch

    def __getitem__(self, key: str) -> TensorHeader:
        return self._headers[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._headers)

    def __len__(self) -> int:
        return len(self._headers)

    def read(self, key: str) -> np.ndarray:
        tensor = self._tensors[key].detach()
        with self._parsing():  # the data of a memory-mapped file is read here
            if tensor.is_floating_point():
                return tensor.to(self._torch.float32, copy=True).numpy()
            return tensor.clone().numpy()


READERS = {SAFETENSORS_SUFFIX: SafetensorsFile, NPZ_SUFFIX: NpzFile,
           **{suffix: TorchFile for suffix in TORCH_SUFFIXES}}


def open_weights(path: str | os.PathLike) -> WeightsFile:
    """Opens a `.safetensors`, `.npz` or `.pth`/`.pt`/`.bin` (needs torch) weights file, reading
    its headers only.

    Raises:
        PretrainedWeightsError: missing or malformed file, or an unknown suffix.
        ImportError: a torch file where torch is not installed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise PretrainedWeightsError(f'pretrained weights file not found: {path}')
    reader = READERS.get(path.suffix.lower())
    if reader is None:
        raise PretrainedWeightsError(
            f'{path}: unknown pretrained weights format {path.suffix.lower()!r}; expected one of '
            f'{", ".join(READERS)}')
    return reader(path)
