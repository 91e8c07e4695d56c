#!/usr/bin/env bash
# The bone-density GPU checks, on a machine with a CUDA GPU, from the repository root: the CUDA
# tests, GPU against CPU on the same phantoms (HU and seconds per CT), and bench_bone on CUDA and
# on that machine's CPU. Wheels in .whl/ (a machine without the project's dependencies; see
# scripts/gpu_wheels.txt) are installed first into /tmp/site. Figures are printed, not asserted.
#
#     scripts/gpu_check.sh [SLICES]   # bench_bone's series: SLICES x 512 x 512 (default 400)
set -u
SLICES=${1:-400}
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
nproc
python3 -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name(0))" || exit 1
echo "== CUDA tests"
python3 -m pytest -q -p no:cacheprovider -p no:xdist -k "gpu or cuda" \
  tests/test_bone_density.py tests/test_processing_pipeline.py tests/test_bone_one_tensor.py \
  tests/test_bone_learned.py
echo "== GPU against CPU, the same phantoms"
python3 benchmarks/bone_gpu_cpu.py --n 3 --big 2
echo "== bench_bone, CUDA"
python3 benchmarks/bench_bone.py --device cuda --slices "$SLICES" --series 0
echo "== bench_bone, CPU"
python3 benchmarks/bench_bone.py --device cpu --slices "$SLICES" --series 0 --repeat 1
