"""Atomic artifact writing: write under a temporary name in the same folder, then rename.

A killed run therefore never leaves a half-written file under an artifact's final name, so "the
file exists" means "the artifact is complete" everywhere in the pipeline.
"""

import contextlib
import json
import os
import pathlib
import tempfile
from typing import Any, Iterator

import numpy as np
from PIL import Image

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yields a temporary path next to `path`; renames it to `path` when the block succeeds."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f'.{path.name}.', suffix='.tmp')
    os.close(handle)
    os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes it private; artifacts are ordinary files
    try:
        yield pathlib.Path(temporary)
        os.replace(temporary, path)
    except OSError as error:
        if error.filename is None:  # a write's ENOSPC or EIO names no file: name the artifact
            raise OSError(error.errno, error.strerror or str(error), str(path)) from error
        raise
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)


def remove_stale_temporaries(folder: str | os.PathLike) -> int:
    """Deletes temporary files a killed run left in `folder` (only call it where no other
    process is writing); returns how many."""
    stale = list(pathlib.Path(folder).glob('.*.tmp'))
    for path in stale:
        path.unlink(missing_ok=True)
    return len(stale)


def save_npz(path: str | os.PathLike, **arrays: Any) -> None:
    """np.savez (uncompressed) atomically; arrays only, no pickled objects."""
    with atomic_path(path) as temporary:
        with open(temporary, 'wb') as f:
            np.savez(f, **arrays)


def load_npz(path: str | os.PathLike, keys: tuple[str, ...] | None = None) -> dict[str, np.ndarray]:
    """The arrays of an npz file, or only those named in keys (the others are not read)."""
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in (data.files if keys is None else keys)}


def save_json(path: str | os.PathLike, value: Any) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(value, indent=2, sort_keys=False) + '\n')


def save_png(path: str | os.PathLike, image: np.ndarray) -> None:
    with atomic_path(path) as temporary:
        Image.fromarray(image).save(temporary, format='PNG')


def save_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
