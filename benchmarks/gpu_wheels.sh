#!/usr/bin/env bash
# Downloads into .whl/ the wheels benchmarks/gpu.sh needs on a GPU machine without network:
# pathjax's dependencies that its image lacks (it has jax[cuda], flax, optax, orbax-checkpoint,
# numpy, scipy, scikit-image, tifffile, pillow, matplotlib, absl-py, etils, protobuf, h5py,
# opencv-python-headless, timm, torchvision, ...), with every requirement of theirs it lacks too,
# for CPython 3.12 on manylinux x86_64. One version of each (two would stop the install).
# googleapis-common-protos and tensorflow-metadata are older releases whose generated code carries
# no protobuf runtime check, so they load under whatever protobuf >= 4 the image has; promise is
# published as a source archive only and is built here.
#
#   bash benchmarks/gpu_wheels.sh      # where pip reaches PyPI; about 40 MB
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
WHEELS=(
  array-record==0.8.6 dm-tree==0.1.10 docstring-parser==0.18.0 googleapis-common-protos==1.66.0
  grain==0.2.18 imagecodecs==2026.3.6 immutabledict==4.3.1 importlib-resources==7.1.0
  jraph==0.0.6.dev0 ml-collections==1.1.0 openslide-bin==4.0.1.2 openslide-python==1.4.7
  portpicker==1.6.0 shapely==2.2.0 simple-parsing==0.1.9 tensorflow-datasets==4.9.10
  tensorflow-metadata==1.16.1 termcolor==3.3.0 toml==0.10.2
)
mkdir -p .whl
"$PYTHON" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
"$PYTHON" -m pip wheel -q --no-deps -w .whl promise==2.3
ls -l .whl
du -ch .whl/*.whl | tail -1
