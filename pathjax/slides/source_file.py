"""The identity of a slide file, so that work made from an older file is found and redone.

A scan (and the tiles file made from it) records its slide file's path, size, modification time
and a fingerprint: a BLAKE2 digest of the file's size, first and last FINGERPRINT_BYTES (a TIFF's
header and directories, most formats' metadata). A rerun stats the file: the same size and
modification time mean the same file; otherwise the fingerprint decides, so a file that was
copied or touched (same bytes, a new time) is not redone, while one replaced by another scan is,
even under the same name. The file's path alone does not decide: a cohort moved to another disk
keeps its work.
"""

import hashlib
import json
import os

FINGERPRINT_BYTES = 1 << 20


def fingerprint(path: str | os.PathLike) -> str:
    """BLAKE2b (16 bytes, hex) of the file's size, its first and its last FINGERPRINT_BYTES."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, 'rb') as f:
        size = os.fstat(f.fileno()).st_size
        digest.update(size.to_bytes(8, 'little'))
        digest.update(f.read(FINGERPRINT_BYTES))
        if size > FINGERPRINT_BYTES:
            f.seek(max(FINGERPRINT_BYTES, size - FINGERPRINT_BYTES))
            digest.update(f.read(FINGERPRINT_BYTES))
    return digest.hexdigest()


def identity(path: str | os.PathLike) -> str:
    """The file's identity as JSON: path, size, mtime_ns, fingerprint."""
    stat = os.stat(path)
    return json.dumps({'path': os.fspath(path), 'size': stat.st_size,
                       'mtime_ns': stat.st_mtime_ns, 'fingerprint': fingerprint(path)},
                      sort_keys=True)


def change(recorded: str, path: str | os.PathLike) -> str:
    """How the file at `path` differs from the `recorded` identity: '' when it is the same file
    (or nothing was recorded: work made before pathjax recorded slide files is kept), else what
    changed."""
    try:
        was = json.loads(recorded)
        size, mtime_ns = was['size'], was['mtime_ns']
    except (ValueError, KeyError, TypeError):
        return ''
    stat = os.stat(path)
    if stat.st_size == size and stat.st_mtime_ns == mtime_ns:
        return ''
    if stat.st_size != size:
        return f'the slide file changed: {size} bytes, now {stat.st_size} ({path})'
    if fingerprint(path) != was.get('fingerprint'):
        return f'the slide file changed: same size, other contents ({path})'
    return ''
