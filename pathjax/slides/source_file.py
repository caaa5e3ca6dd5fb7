"""The identity of a slide file, so that work made from an older file is found and redone.

A scan (and the tiles file made from it) records its slide file's path, size, modification time
and a fingerprint: a BLAKE2 digest of the file's size, first and last FINGERPRINT_BYTES (a TIFF's
header and directories, most formats' metadata). A rerun stats the file: the same size and
modification time mean the same file; otherwise the fingerprint decides, so a file that was
copied or touched (same bytes, a new time) is not redone, while one replaced by another scan is,
even under the same name. The file's path alone does not decide: a cohort moved to another disk
keeps its work. What a manifest row adds to the slide (`mpp`, a `roi` file) is part of a scan's
source too (`scan_source`, `scan_change`): changing either redoes the slide.
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


def scan_source(path: str, mpp: float | None, roi: str) -> str:
    """JSON of what a scan is made from: the slide file's identity, and the manifest's mpp and
    roi file's identity when given."""
    source = json.loads(identity(path))
    if mpp:
        source['mpp'] = mpp
    if roi:
        source['roi'] = json.loads(identity(roi))
    return json.dumps(source, sort_keys=True)


def scan_change(recorded: str, path: str, mpp: float | None, roi: str) -> str:
    """How a slide's sources differ from the `recorded` `scan_source` ('' when they do not)."""
    why = change(recorded, path)
    try:
        was = json.loads(recorded)
    except ValueError:
        return why
    if why or not isinstance(was, dict):
        return why
    if was.get('mpp') != mpp:
        return f"the manifest's mpp changed from {was.get('mpp')} to {mpp}"
    if bool(roi) != ('roi' in was):
        return 'a roi file was added' if roi else 'the roi file was removed'
    why = roi and change(json.dumps(was['roi']), roi)
    return why.replace('slide file', 'roi file') if why else ''
