"""Manifest validation and splits by case."""

import collections

import pytest

from pathjax import cohort

CLASSES = ('wild_type', 'mutant')


def write(tmp_path, text, name='manifest.csv'):
    path = tmp_path / name
    path.write_text(text)
    return path


def touch(tmp_path, *names):
    for name in names:
        (tmp_path / name).write_bytes(b'x')


def test_reads_rows_relative_paths_and_default_case(tmp_path):
    touch(tmp_path, 'a.svs', 'b.svs')
    manifest = write(tmp_path, 'slide_id,path,label,case_id\n'
                               'a,a.svs,mutant,p1\n'
                               '\n'
                               'b,b.svs,wild_type,\n')
    records = cohort.read_manifest(manifest, CLASSES)
    assert [(r.slide_id, r.case_id, r.line) for r in records] == [('a', 'p1', 2), ('b', 'b', 4)]
    assert records[0].path == str(tmp_path / 'a.svs')


def test_every_bad_row_is_named_with_its_line(tmp_path):
    manifest = write(tmp_path, 'slide_id,path,label,split\n'
                               'a,a.svs,mutant,train\n'
                               'b,b.svs,KRAS+,train\n'      # unknown label
                               'a,c.svs,mutant,test\n'      # duplicate id
                               'd,,mutant,train\n'          # empty path
                               'e,e.svs,mutant\n'           # missing field
                               'f,f.svs,mutant,holdout\n')  # unknown split
    with pytest.raises(cohort.ManifestError) as caught:
        cohort.read_manifest(manifest, CLASSES)
    problems = caught.value.problems
    assert len(problems) == 5
    for line, word in [(3, 'KRAS+'), (4, 'duplicate'), (5, 'empty path'), (6, 'fields'),
                       (7, 'holdout')]:
        assert any(p.startswith(f'line {line}:') and word in p for p in problems), (line, problems)


def test_case_in_two_splits_is_an_error(tmp_path):
    manifest = write(tmp_path, 'slide_id,path,label,case_id,split\n'
                               'a,a.svs,mutant,p1,train\n'
                               'b,b.svs,mutant,p1,test\n')
    with pytest.raises(cohort.ManifestError, match="line 3: case 'p1'"):
        cohort.read_manifest(manifest, CLASSES)


def test_missing_columns_and_missing_manifest(tmp_path):
    with pytest.raises(cohort.ManifestError, match='missing column'):
        cohort.read_manifest(write(tmp_path, 'slide,path\nx,y\n'), CLASSES)
    with pytest.raises(cohort.ManifestError, match='not found'):
        cohort.read_manifest(tmp_path / 'nope.csv', CLASSES)


def test_missing_file_is_skipped_not_fatal(tmp_path):
    touch(tmp_path, 'a.svs')
    manifest = write(tmp_path, 'slide_id,path,label\na,a.svs,mutant\nb,gone.svs,wild_type\n')
    loaded = cohort.load_cohort(manifest, CLASSES, fractions=(1, 0, 0), folds=0, fold=0, seed=0)
    assert [s.slide_id for s in loaded.slides] == ['a']
    (record, why), = loaded.skipped
    assert record.slide_id == 'b' and 'line 3' in why and 'not found' in why


def make_records(num_cases, seed=0):
    """Cases of one or two slides, 1/3 mutant."""
    records, line = [], 2
    for case in range(num_cases):
        label = CLASSES[case % 3 == 0]
        for slide in range(1 + case % 2):
            records.append(cohort.SlideRecord(f'c{case}s{slide}', f'/x/{case}_{slide}.svs', label,
                                              f'c{case}', '', line))
            line += 1
    return records


def test_split_by_case_is_stratified_seeded_and_keeps_cases_whole():
    records = make_records(60)
    splits = cohort.assign_splits(records, fractions=(0.6, 0.2, 0.2), folds=0, fold=0, seed=1)
    by_case = collections.defaultdict(set)
    for r in splits:
        by_case[r.case_id].add(r.split)
    assert all(len(s) == 1 for s in by_case.values())
    case_split = {c: next(iter(s)) for c, s in by_case.items()}
    case_label = {r.case_id: r.label for r in records}
    for label in CLASSES:
        cases = [c for c in case_split if case_label[c] == label]
        counts = collections.Counter(case_split[c] for c in cases)
        for name, fraction in zip(cohort.SPLITS, (0.6, 0.2, 0.2)):
            assert abs(counts[name] - fraction * len(cases)) <= 1, (label, counts)
    again = cohort.assign_splits(records, fractions=(0.6, 0.2, 0.2), folds=0, fold=0, seed=1)
    other = cohort.assign_splits(records, fractions=(0.6, 0.2, 0.2), folds=0, fold=0, seed=2)
    assert again == splits and other != splits


def test_kfold_by_case():
    records = make_records(30)
    folds = cohort.kfold_by_case(records, 5, seed=0)
    assert set(folds) == {r.case_id for r in records}
    case_label = {r.case_id: r.label for r in records}
    for label in CLASSES:
        sizes = collections.Counter(f for c, f in folds.items() if case_label[c] == label)
        assert max(sizes.values()) - min(sizes.values()) <= 1
    tests = set()
    for fold in range(5):
        splits = cohort.assign_splits(records, fractions=(1, 0, 0), folds=5, fold=fold, seed=0)
        test_cases = {r.case_id for r in splits if r.split == 'test'}
        val_cases = {r.case_id for r in splits if r.split == 'val'}
        assert test_cases == {c for c, f in folds.items() if f == fold}
        assert val_cases == {c for c, f in folds.items() if f == (fold + 1) % 5}
        assert not tests & test_cases  # every case is tested exactly once over the folds
        tests |= test_cases
    assert tests == set(folds)


def test_manifest_split_column_wins(tmp_path):
    records = [cohort.SlideRecord('a', '/a', 'mutant', 'a', 'test', 2)]
    assert cohort.assign_splits(records, fractions=(1, 0, 0), folds=0, fold=0, seed=0) == records


def test_new_slides_may_leave_labels_empty_or_out(tmp_path):
    touch(tmp_path, 'a.svs', 'b.svs')
    labelled = write(tmp_path, 'slide_id,path,label\na,a.svs,mutant\nb,b.svs,\nc,c.svs,\n')
    new = cohort.load_new_slides(labelled, CLASSES)
    assert [(r.slide_id, r.label, r.split) for r in new.slides] == [
        ('a', 'mutant', cohort.PREDICT), ('b', '', cohort.PREDICT)]
    assert [r.slide_id for r, _ in new.skipped] == ['c']
    no_column = write(tmp_path, 'slide_id,path\na,a.svs\n', 'no_label.csv')
    assert [r.label for r in cohort.load_new_slides(no_column, CLASSES).slides] == ['']
    with pytest.raises(cohort.ManifestError, match="line 2: slide 'a' has unknown label 'KRAS'"):
        cohort.load_new_slides(write(tmp_path, 'slide_id,path,label\na,a.svs,KRAS\n', 'x.csv'),
                               CLASSES)
    with pytest.raises(cohort.ManifestError, match='line 3: empty label'):
        cohort.read_manifest(labelled, CLASSES)  # a training manifest needs every label


def test_ids_that_are_not_safe_file_names_are_refused_with_their_lines(tmp_path):
    long_id = 'x' * 240
    manifest = write(tmp_path, 'slide_id,path,label\n'
                               'syn0_0001,a.svs,mutant\n'
                               '../../escape,b.svs,mutant\n'
                               '/some/dir/x,c.svs,mutant\n'
                               './syn0_0001,d.svs,mutant\n'
                               'nul\0byte,e.svs,mutant\n'
                               f'{long_id},f.svs,mutant\n'
                               'SYN0_0001,g.svs,mutant\n'
                               '.hidden,h.svs,mutant\n'
                               'ok_id,i\0.svs,mutant\n')
    with pytest.raises(cohort.ManifestError) as caught:
        cohort.read_manifest(manifest, CLASSES)
    problems = caught.value.problems
    assert len(problems) == 8, problems
    for line, words in [(3, 'not a safe file name'), (4, 'not a safe file name'),
                        (5, 'not a safe file name'), (6, 'not a safe file name'),
                        (7, '240 characters'), (8, 'differ only in case'),
                        (9, 'not a safe file name'), (10, 'NUL')]:
        assert any(p.startswith(f'line {line}:') and words in p for p in problems), (line, problems)


def test_a_prediction_manifest_follows_the_same_rule(tmp_path):
    manifest = write(tmp_path, 'slide_id,path\n../x,a.svs\n')
    with pytest.raises(cohort.ManifestError, match='line 2: .*not a safe file name'):
        cohort.load_new_slides(manifest, CLASSES)


def site_records(sites, slides_per_case=2):
    """Records of cases at the given sites (one entry per case), two slides per case."""
    records = []
    for case, site in enumerate(sites):
        for slide in range(slides_per_case):
            records.append(cohort.SlideRecord(f'c{case}s{slide}', f'/x/{case}_{slide}.svs',
                                              CLASSES[case % 2], f'c{case}', '',
                                              len(records) + 2, site=site))
    return records


def test_site_preserved_folds_keep_every_site_in_one_fold():
    sites = ['A'] * 7 + ['B'] * 5 + ['C'] * 4 + ['D'] * 3 + ['E'] * 2 + ['F']
    records = site_records(sites)
    fold_of = cohort.kfold_by_site(records, 3, seed=0)
    folds_of_site = collections.defaultdict(set)
    for record in records:
        folds_of_site[record.site].add(fold_of[record.case_id])
    assert all(len(folds) == 1 for folds in folds_of_site.values())
    sizes = collections.Counter(fold_of[r.case_id] for r in records)
    assert sorted(sizes) == [0, 1, 2]
    # Greedy dealing, largest site first: 14 | 10 + 6 | 8 + 4 + 2 slides: within a site's size.
    assert max(sizes.values()) - min(sizes.values()) <= 2 * 7
    for fold in range(3):
        splits = cohort.assign_splits(records, fractions=(1, 0, 0), folds=3, fold=fold, seed=0,
                                      fold_by='site')
        by_split = collections.defaultdict(set)
        for record in splits:
            by_split[record.split].add(record.site)
        assert not by_split['test'] & (by_split['train'] | by_split['val'])
        assert not by_split['val'] & by_split['train']


def test_site_preserved_folds_refuse_what_cannot_be_kept_apart():
    with pytest.raises(cohort.ManifestError, match=r"2 site\(s\) \(A, B\) for data.folds=3"):
        cohort.kfold_by_site(site_records(['A', 'A', 'B']), 3, seed=0)
    missing = site_records(['A', '', 'B', 'C'])
    with pytest.raises(cohort.ManifestError, match="slide 'c1s0' has no site"):
        cohort.kfold_by_site(missing, 3, seed=0)
    two_sites = site_records(['A', 'B', 'C'])
    two_sites[1] = cohort.SlideRecord(**{**two_sites[1].__dict__, 'site': 'C'})
    with pytest.raises(cohort.ManifestError, match="case 'c0' is at site 'C' and at 'A'"):
        cohort.kfold_by_site(two_sites, 3, seed=0)


@pytest.mark.parametrize('overrides, field', [
    ({'data.fold_by': 'hospital'}, 'data.fold_by'),
    ({'data.fold_by': 'site'}, "data.fold_by='site' makes folds"),
    ({'data.synthetic.motif_fraction': (0.3, 0.1)}, 'data.synthetic.motif_fraction'),
    ({'slide_net.model': 'resnet'}, 'slide_net.model'),
    ({'slide_net.bag_weight': 1.5}, 'slide_net.bag_weight'),
    ({'feature_net.mean': (0.5, 0.5)}, 'feature_net.mean'),
])
def test_new_config_fields_are_checked_naming_the_field(overrides, field):
    from pathjax import pipeline
    from tests.conftest import make_config
    problems = pipeline.check_config(make_config(**overrides))
    assert any(field in p for p in problems), problems
