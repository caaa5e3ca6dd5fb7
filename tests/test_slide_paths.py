"""Slide ids as file names: the rule, and the one helper that turns an id into a path."""

import pytest

from pathjax import slide_paths


@pytest.mark.parametrize('slide_id', ['syn0_0001', 'TCGA-AA-3511-01Z', '_x', 'a.b.c', '9',
                                      'x' * slide_paths.MAX_LENGTH])
def test_safe_ids_name_a_file_in_their_folder(tmp_path, slide_id):
    assert slide_paths.id_problem(slide_id) is None
    path = slide_paths.slide_file(tmp_path, 'tiles', slide_id, '.npz')
    assert path == tmp_path / 'tiles' / f'{slide_id}.npz'


@pytest.mark.parametrize('slide_id', ['', '../../escape', '/abs/dir/x', './syn0_0001', '.hidden',
                                      '..', '.', '-rf', 'a/b', 'a\\b', 'nul\0byte', 'sp ace',
                                      'x' * (slide_paths.MAX_LENGTH + 1), 'caf\u00e9', 'a\nb'])
def test_unsafe_ids_are_refused(tmp_path, slide_id):
    assert slide_paths.id_problem(slide_id)
    with pytest.raises(slide_paths.SlideIdError):
        slide_paths.slide_file(tmp_path, 'tiles', slide_id, '.npz')


def test_a_suffix_cannot_leave_the_folder(tmp_path):
    with pytest.raises(slide_paths.SlideIdError, match='would leave'):
        slide_paths.slide_file(tmp_path, 'tiles', 'a', '/../../x')


def test_ids_that_differ_only_in_case_collide():
    assert slide_paths.collision_key('Syn0_0001') == slide_paths.collision_key('syn0_0001')
    assert slide_paths.collision_key('syn0_0001') != slide_paths.collision_key('syn0_0002')
