"""XLA compile options for the patch networks' steps (VGG-16 or a ViT), per backend.

On CPU:
- jaxlib 0.10 hands every convolution to YNNPACK, which runs the weight gradient of a 3x3
  convolution (a convolution whose window is the whole feature map) 3x to 5x slower than XLA's
  Eigen path: VGG-16 trains at 0.4x PyTorch's speed by default and at 0.8x to 0.95x with
  convolutions on Eigen (matrix products stay on YNNPACK). The same option runs ViT-S/16 at 27
  images/s where XLA's default YNNPACK fusions give 22 (batch 64, 2 Zen 5 cores).
- On AMD CPUs with AVX-512 (Zen 4 and later run it at full clock), XLA's elementwise code uses
  512-bit vectors instead of its default 256: ViT-S/16 +4.6%, VGG-16 +2% on Zen 5. Intel CPUs keep
  the default (their AVX-512 can lower the clock; not measured here).
See BENCHMARKS.md, feature network and ViT encoders.
"""

import functools

import jax
from absl import logging

from pathjax.host_cpu import first_cpu_fields

CPU_CONVOLUTIONS_ON_EIGEN = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}
WIDE_VECTORS = {'xla_cpu_prefer_vector_width': 512}


@functools.cache
def patch_network_options() -> dict:
    """Options for `jax.jit(..., compiler_options=...)` of the patch networks' steps: the CPU
    options above that this host and jaxlib take, nothing on other backends."""
    if jax.default_backend() != 'cpu':
        return {}
    wanted = dict(CPU_CONVOLUTIONS_ON_EIGEN)
    if _amd_with_avx512():
        wanted.update(WIDE_VECTORS)
    try:
        jax.jit(lambda x: x + 1, compiler_options=wanted).lower(1.0).compile()
    except Exception as error:  # an XLA without the experimental options
        logging.info('XLA rejects %s (%s); using its defaults', wanted, error)
        return {}
    return wanted


def _amd_with_avx512() -> bool:
    """Whether this Linux host's CPU is AMD's with AVX-512 (False where /proc/cpuinfo is not)."""
    fields = first_cpu_fields()
    return fields.get('vendor_id') == 'AuthenticAMD' and 'avx512f' in fields.get('flags', '').split()
