"""The persistent compilation cache: one folder per host instruction set in the workdir, so
hosts with different CPUs sharing a workdir never load each other's machine code, and a rerun
on the same host loads what the first run compiled."""

import subprocess
import sys

from pathjax.runtime import compilation_cache
from tests.conftest import REPO

ZEN5 = {'vendor_id': 'AuthenticAMD', 'flags': 'fpu sse2 avx avx2 fma avx512f avx512bw'}


def test_each_instruction_set_has_its_own_folder(tmp_path):
    folder = compilation_cache.folder(tmp_path, ZEN5)
    assert folder.parent == tmp_path / compilation_cache.FOLDER
    reordered = dict(ZEN5, flags=' '.join(reversed(ZEN5['flags'].split())) + ' avx2')
    assert compilation_cache.folder(tmp_path, reordered) == folder  # the same set of flags
    without_avx512 = dict(ZEN5, flags='fpu sse2 avx avx2 fma')
    assert compilation_cache.folder(tmp_path, without_avx512) != folder
    arm = {'Features': 'fp asimd sve'}, {'Features': 'fp asimd sve sve2'}
    assert compilation_cache.host_key(arm[0]) != compilation_cache.host_key(arm[1])


# Compiles one function with the cache enabled in argv[1] (every compile stored); prints the
# number of cache hits.
COMPILE = '''
import sys
import jax
import jax.numpy as jnp
from jax import monitoring
from pathjax.runtime import compilation_cache
hits = []
monitoring.register_event_listener(
    lambda event, **_: hits.append(event) if event.endswith('/cache_hits') else None)
compilation_cache.enable(sys.argv[1])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0)
jax.jit(lambda x: jnp.tanh(x @ x.T).sum())(jnp.ones((64, 64))).block_until_ready()
print(len(hits))
'''


def test_a_rerun_loads_what_the_first_run_compiled_from_this_hosts_folder(tmp_path):
    def run() -> int:
        done = subprocess.run([sys.executable, '-c', COMPILE, str(tmp_path)], cwd=REPO,
                              capture_output=True, text=True, timeout=120,
                              env={'JAX_PLATFORMS': 'cpu', 'PATH': ''})
        assert done.returncode == 0, done.stderr[-2000:]
        return int(done.stdout.split()[-1])

    assert run() == 0
    stored = [p.parent.name for p in (tmp_path / compilation_cache.FOLDER).glob('*/*')]
    assert stored and set(stored) == {compilation_cache.host_key()}
    assert run() >= 1
