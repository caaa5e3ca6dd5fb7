"""XLA compile options for the convolutional network, per backend.

On CPU, jaxlib 0.10 hands every convolution to YNNPACK, which runs the weight gradient of a 3x3
convolution (a convolution whose window is the whole feature map) 3x to 5x slower than XLA's
Eigen path: VGG-16 trains at 0.4x PyTorch's speed by default and at 0.8x to 0.95x with
convolutions on Eigen (matrix products stay on YNNPACK). See BENCHMARKS.md, feature network.
"""

import functools

import jax
from absl import logging

CPU_CONVOLUTIONS_ON_EIGEN = {
    'xla_cpu_experimental_ynn_fusion_type': 'LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT'}


@functools.cache
def conv_compiler_options() -> dict[str, str]:
    """Options for `jax.jit(..., compiler_options=...)` of convolution-heavy steps: the CPU
    option above where this jaxlib accepts it, nothing elsewhere."""
    if jax.default_backend() != 'cpu':
        return {}
    try:
        jax.jit(lambda x: x + 1, compiler_options=CPU_CONVOLUTIONS_ON_EIGEN).lower(1.0).compile()
    except Exception as error:  # an XLA without the experimental option
        logging.info('XLA rejects %s (%s); using its defaults', CPU_CONVOLUTIONS_ON_EIGEN, error)
        return {}
    return dict(CPU_CONVOLUTIONS_ON_EIGEN)
