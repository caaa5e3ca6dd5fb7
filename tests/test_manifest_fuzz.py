"""The manifest reader on mutated and random input: every outcome is a validated list of slides or
ManifestError naming the problems, never another exception, and memory stays bounded."""

import csv
import io
import tracemalloc

import hypothesis
import pytest
from hypothesis import strategies as st

from pathjax import cohort, slide_paths

CLASSES = ('wild_type', 'mutant')
VALID = ('slide_id,path,label,case_id,split\n'
         'TCGA-AA-3511-01Z,/data/a.svs,mutant,TCGA-AA-3511,train\n'
         'syn0_0001,b.svs,wild_type,,val\n'
         'syn0_0002,~/c.svs,mutant,p2,test\n')
PEAK_BYTES = 32 << 20  # a few hundred bytes of manifest never cost more than this
CELLS = st.one_of(st.sampled_from(['', '..', '../../x', '/abs', '.h', '-a', 'a' * 200, '=1+1',
                                   '\0', '"', ',', '\n', '\r', 'mutant', 'wild_type', 'train',
                                   'val', 'test', '~nobody_here/x', 'syn0_0001', 'SYN0_0001']),
                  st.text(max_size=40))


def read(tmp_path, data: bytes, labels_required=True):
    """read_manifest on `data`: the records, or the ManifestError's problems."""
    path = tmp_path / 'manifest.csv'
    path.write_bytes(data)
    tracemalloc.start()
    try:
        return cohort.read_manifest(path, CLASSES, labels_required=labels_required)
    except cohort.ManifestError as error:
        assert error.problems and all(isinstance(p, str) for p in error.problems)
        return error.problems
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        assert peak < PEAK_BYTES, peak


def check_records(outcome):
    if outcome and not isinstance(outcome[0], str):
        ids = [r.slide_id for r in outcome]
        assert all(slide_paths.id_problem(i) is None for i in ids)
        assert len({slide_paths.collision_key(i) for i in ids}) == len(ids)
        assert all(r.label in CLASSES for r in outcome)


FUZZ = hypothesis.settings(max_examples=300, deadline=None, derandomize=True,
                           suppress_health_check=[hypothesis.HealthCheck.function_scoped_fixture])


@FUZZ
@hypothesis.given(edits=st.lists(st.tuples(st.integers(0, len(VALID) - 1),
                                           st.sampled_from(['flip', 'delete', 'insert']),
                                           st.integers(0, 255)), min_size=1, max_size=12))
def test_mutated_bytes(tmp_path, edits):
    data = bytearray(VALID.encode())
    for position, kind, value in edits:
        position %= max(len(data), 1)
        if kind == 'flip' and data:
            data[position] ^= 1 << (value % 8)
        elif kind == 'delete' and data:
            del data[position]
        else:
            data.insert(position, value)
    check_records(read(tmp_path, bytes(data)))


@FUZZ
@hypothesis.given(header=st.lists(st.sampled_from(['slide_id', 'path', 'label', 'case_id',
                                                  'split', 'x', '']), min_size=1, max_size=6),
                  rows=st.lists(st.lists(CELLS, max_size=7), max_size=8),
                  labels_required=st.booleans())
def test_random_rows(tmp_path, header, rows, labels_required):
    text = io.StringIO()
    csv.writer(text).writerows([header, *rows])
    check_records(read(tmp_path, text.getvalue().encode(), labels_required))


def test_a_huge_file_is_refused_before_it_is_read(tmp_path):
    path = tmp_path / 'manifest.csv'
    with open(path, 'wb') as f:
        f.truncate(cohort.MAX_MANIFEST_BYTES + 1)  # sparse: no disk used
    tracemalloc.start()
    try:
        with pytest.raises(cohort.ManifestError, match='bytes, more than'):
            cohort.read_manifest(path, CLASSES)
    finally:
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    assert peak < 1 << 20
