"""A slide file's identity: the same bytes are the same file (touched, copied, moved), other
bytes are another file (same name, same size too)."""

import os
import shutil

from pathjax.slides import source_file


def test_touched_copied_or_moved_is_the_same_file_other_bytes_are_not(tmp_path):
    path = tmp_path / 'a.svs'
    path.write_bytes(b'II*\0' + bytes(range(256)) * 20_000)  # 5 MB: head and tail fingerprinted
    recorded = source_file.identity(path)
    assert source_file.change(recorded, path) == ''
    os.utime(path, ns=(1, 1))  # touched
    assert source_file.change(recorded, path) == ''
    moved = tmp_path / 'elsewhere' / 'a.svs'
    moved.parent.mkdir()
    shutil.copy(path, moved)
    assert source_file.change(recorded, moved) == ''
    data = bytearray(path.read_bytes())
    data[100] ^= 1  # one bit in the header, same size
    path.write_bytes(bytes(data))
    assert 'same size, other contents' in source_file.change(recorded, path)
    path.write_bytes(bytes(data) + b'x')
    assert 'bytes, now' in source_file.change(recorded, path)
    assert source_file.change('', path) == ''  # nothing recorded: kept
