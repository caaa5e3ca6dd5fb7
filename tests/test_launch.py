"""launch.py as a user meets it: exit statuses and one clear message per problem, no tracebacks."""

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO


def launch(*flags, config='configs/test.py', workdir):
    command = [sys.executable, str(REPO / 'launch.py'), '--config', str(REPO / config),
               '--workdir', str(workdir), '--stages=tile', *flags]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=REPO)


def test_misspelt_override_names_the_field(tmp_path):
    result = launch('--config.tile.mppp=0.5', workdir=tmp_path)
    assert result.returncode == 2
    assert 'mppp' in result.stderr and 'Did you mean' in result.stderr
    assert 'Traceback' not in result.stderr


def test_wrong_type_and_bad_values_are_all_reported(tmp_path):
    result = launch('--config.tile.mpp=fast', workdir=tmp_path)
    assert result.returncode == 2 and 'tile.mpp' in result.stderr and 'Traceback' not in result.stderr
    result = launch('--config.tissue.channel_rule=most', '--config.tile.patch_size=-1',
                    '--config.stain.method=vahadane', workdir=tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    for field in ('tissue.channel_rule', 'tile.patch_size', 'stain.method'):
        assert field in result.stderr


def test_missing_config_file_and_unknown_stage(tmp_path):
    result = launch(config='configs/nope.py', workdir=tmp_path)
    assert result.returncode == 2 and 'nope.py' in result.stderr and 'Traceback' not in result.stderr
    result = launch('--stages=train_everything', workdir=tmp_path)
    assert result.returncode == 2 and 'train_everything' in result.stderr


def test_bad_manifest_stops_before_any_work(tmp_path):
    manifest = tmp_path / 'manifest.csv'
    manifest.write_text('slide_id,path,label\na,a.svs,positive\na,b.svs,negative\nc,c.svs,KRAS\n')
    result = launch(f'--config.data.manifest={manifest}', workdir=tmp_path / 'work')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'line 3' in result.stderr and 'line 4' in result.stderr
    assert not (tmp_path / 'work' / 'reports').exists()


def test_no_usable_slide_exits_non_zero_with_the_report(tmp_path):
    manifest = tmp_path / 'manifest.csv'
    (tmp_path / 'x.svs').write_text('not a slide')
    manifest.write_text('slide_id,path,label\nx,x.svs,positive\ny,gone.svs,negative\n')
    result = launch(f'--config.data.manifest={manifest}', workdir=tmp_path / 'work')
    assert result.returncode == 1 and 'Traceback' not in result.stderr
    assert 'no slide could be processed' in result.stderr
    assert (tmp_path / 'work' / 'reports' / 'tile.json').exists()


def test_rerun_with_other_settings_is_refused_naming_the_fields(tmp_path):
    small = ['--config.data.synthetic.num_slides=2', '--config.data.synthetic.width=1024',
             '--config.data.synthetic.height=1024']
    assert launch(*small, workdir=tmp_path).returncode == 0
    tiles = {p: p.stat().st_mtime_ns for p in (tmp_path / 'tiles').glob('*.npz')}
    result = launch(*small, '--config.tile.mpp=1.0', '--config.tissue.threshold=210',
                    workdir=tmp_path)
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'tile.mpp was 2.0, now 1.0' in result.stderr
    assert 'tissue.threshold was 200, now 210' in result.stderr
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / 'tiles').glob('*.npz')} == tiles
    assert launch(*small, '--config.workers=1', workdir=tmp_path).returncode == 0  # not a setting


def test_spawned_workers_do_not_load_jax_or_tfds():
    """Slide workers are spawned: each imports launch.py again as '__mp_main__' (what runpy does
    here), which must not cost them jax, TFDS and every stage."""
    probe = ("import runpy, sys; runpy.run_path('launch.py', run_name='__mp_main__'); "
             "print(sorted(m for m in ('jax', 'tensorflow_datasets', 'pathjax.pipeline') "
             "if m in sys.modules))")
    result = subprocess.run([sys.executable, '-c', probe], capture_output=True, text=True,
                            timeout=60, cwd=REPO)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == '[]'


def test_unreadable_stain_template_stops_before_any_work(tmp_path):
    template = tmp_path / 'template.png'
    template.write_text('not an image')
    result = launch(f'--config.stain.reference={template}', workdir=tmp_path / 'work')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    assert 'stain.reference' in result.stderr and 'template.png' in result.stderr
    assert not (tmp_path / 'work' / 'tiles').exists()


def test_backbone_settings_are_checked_before_any_work(tmp_path):
    result = launch('--config.feature_net.backbone=vit_tiny', workdir=tmp_path)
    assert result.returncode == 2 and 'feature_net.backbone must be one of vgg16, ' in result.stderr
    result = launch('--config.feature_net.backbone=vit_small_patch16_224',
                    '--config.feature_net.embed_dim=16', '--config.feature_net.weights=nope.pth',
                    workdir=tmp_path)
    assert result.returncode == 2
    for message in ('feature_net.embed_dim adds a layer to VGG-16 only',
                    'feature_net.weights: file not found: nope.pth', 'takes 224 px patches'):
        assert message in result.stderr, result.stderr
    assert not (tmp_path / 'tiles').exists()


def test_an_unsafe_slide_id_stops_before_any_work_and_writes_nothing_outside(tmp_path):
    (tmp_path / 'a.svs').write_text('x')
    manifest = tmp_path / 'manifest.csv'
    manifest.write_text('slide_id,path,label\n'
                        'syn0_0001,a.svs,positive\n'
                        '../../escape,a.svs,negative\n'
                        f'{tmp_path / "abs"},a.svs,negative\n'
                        './syn0_0001,a.svs,negative\n')
    result = launch(f'--config.data.manifest={manifest}', workdir=tmp_path / 'a' / 'work')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    for line in (3, 4, 5):
        assert f'line {line}: slide id' in result.stderr and 'not a safe file name' in result.stderr
    assert sorted(p.name for p in tmp_path.rglob('*') if p.is_file()) == [
        '.lock.0', 'a.svs', 'config.json', 'manifest.csv']


@pytest.fixture
def small_file_system(tmp_path):
    """mount(size, read_only) -> a folder on a tmpfs of that size (skips where mount is not
    permitted: tests run as root on the CI machines)."""
    mounted = []

    def mount(size: str, read_only: bool = False):
        folder = tmp_path / f'fs{len(mounted)}'
        folder.mkdir()
        options = f'size={size}' + (',ro' if read_only else '')
        result = subprocess.run(['mount', '-t', 'tmpfs', '-o', options, 'tmpfs', str(folder)],
                                capture_output=True, text=True)
        if result.returncode:
            pytest.skip(f'cannot mount a tmpfs here ({result.stderr.strip()})')
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(['umount', str(folder)], check=False)


def test_an_unwritable_or_full_workdir_at_start_up_is_one_line_naming_it(tmp_path,
                                                                          small_file_system):
    (tmp_path / 'file').write_text('a file where a folder should be')
    cases = [tmp_path / 'file' / 'work', small_file_system('64k', read_only=True) / 'work']
    full = small_file_system('64k')
    (full / 'work').mkdir()
    filler = os.open(full / 'filler', os.O_WRONLY | os.O_CREAT)
    try:
        while os.write(filler, b'\0' * 4096):  # until the disk is full
            pass
    except OSError:
        pass
    os.close(filler)
    cases.append(full / 'work')
    for workdir in cases:
        result = launch(workdir=workdir)
        assert result.returncode == 2, (workdir, result.stderr)
        assert 'Traceback' not in result.stderr
        assert f'cannot write to the workdir {workdir}' in result.stderr, result.stderr


def test_a_full_disk_mid_run_names_the_file(tmp_path, small_file_system):
    from pathjax.slides import synthetic_cohort
    manifest = synthetic_cohort.make_cohort(tmp_path / 'slides', 2, ('negative', 'positive'),
                                            width=1024, height=1024)
    workdir = small_file_system('24k') / 'work'
    result = launch(f'--config.data.manifest={manifest}', '--config.workers=1', workdir=workdir)
    assert result.returncode == 1 and 'Traceback' not in result.stderr, result.stderr
    assert f'tile: {workdir}' in result.stderr and 'No space left on device' in result.stderr


def test_a_hostile_weights_file_is_refused_before_the_first_stage(tmp_path):
    """A 4 TiB tensor claimed by a few hundred bytes of .npz: checked from its headers in the
    config check, one line naming the file, exit 2, no stage run."""
    import io
    import zipfile
    import numpy as np
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {'descr': '<f4', 'fortran_order': False,
                                                  'shape': (1 << 40,)})
    weights = tmp_path / 'claims_4_tib.npz'
    with zipfile.ZipFile(weights, 'w') as archive:
        archive.writestr('pos_embed.npy', header.getvalue())
    result = launch('--config.feature_net.backbone=vit_small_patch16_224',
                    f'--config.feature_net.weights={weights}', workdir=tmp_path / 'work')
    assert result.returncode == 2 and 'Traceback' not in result.stderr, result.stderr
    assert f'feature_net.weights: {weights}' in result.stderr
    assert not (tmp_path / 'work' / 'tiles').exists()
