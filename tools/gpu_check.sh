#!/usr/bin/env bash
# The GPU check on a lent CUDA machine that has torch & co but not kt's storage/retrieval dependencies and no
# internet: install the wheels of .whl/ (zarr, numcodecs, webdataset, faiss-cpu, open_clip_torch, ... for
# CPython 3.12, manylinux x86_64) into /tmp/site, then run every gpu-marked test and the GPU benchmark.
#
#     bash tools/gpu_check.sh            # from the repository root; logs and bench_gpu.json go to $OUT when set
#
# On a machine with the project's venv, `make gpu-check` runs the same two steps without the wheel install.
set -uo pipefail

OUT_DIR=${OUT:-/tmp/kt-gpu-check}
mkdir -p "$OUT_DIR"
PY=${PYTHON:-python3}
fail() { echo "gpu_check: $*" | tee -a "$OUT_DIR/gpu_check.log" >&2; exit 2; }

[ -f pyproject.toml ] && [ -d kt ] || fail "run from the repository root (no pyproject.toml / kt here)"
shopt -s nullglob
wheels=(.whl/*.whl)
[ ${#wheels[@]} -gt 0 ] || fail "no wheels in .whl/ (carry .whl to this machine, or use 'make gpu-check' with the venv)"
"$PY" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' ||
    fail "the wheels in .whl/ are for CPython 3.12; $PY is $("$PY" -V 2>&1)"

"$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}" \
    >"$OUT_DIR/pip.log" 2>&1 || { cat "$OUT_DIR/pip.log" >&2; fail "installing .whl/*.whl into /tmp/site failed"; }
export PYTHONPATH=/tmp/site:$PWD

# every module kt imports from the wheels, and the versions they need from the machine, before any test starts
"$PY" - <<'EOF' 2>&1 | tee "$OUT_DIR/imports.log" || fail "a dependency is missing or broken (see imports.log)"
import importlib, sys
import numpy, torch
mods = ["zarr", "numcodecs", "google_crc32c", "donfig", "webdataset", "braceexpand", "faiss", "open_clip",
        "ftfy", "wcwidth", "regex", "timm", "accelerate", "safetensors", "torchvision", "PIL", "yaml", "tqdm",
        "fsspec", "sklearn", "skimage", "pytest", "hypothesis"]
bad = []
for m in mods:
    try:
        mod = importlib.import_module(m)
        print(f"{m} {getattr(mod, '__version__', '')} {getattr(mod, '__file__', '')}")
    except Exception as e:  # noqa: BLE001 -- report every failure, then stop
        bad.append(f"{m}: {type(e).__name__}: {e}")
if int(numpy.__version__.split(".")[0]) < 2:
    bad.append(f"numpy {numpy.__version__}: zarr 3 needs numpy >= 2")
if not torch.cuda.is_available():
    bad.append("torch.cuda.is_available() is False")
import kt.student.cli, kt.teacher_cache.cli, kt.retrieval.cli  # noqa: E401,F401 -- the package imports too
print("torch", torch.__version__, "cuda", torch.version.cuda)
try:  # optional: kt.render's warps fall back to PIL without it (its wheel is too large to carry in .whl/)
    import cv2
    print("cv2", cv2.__version__)
except ImportError:
    print("cv2: not installed; kt.render warps with PIL")
if bad:
    print("MISSING:\n  " + "\n  ".join(bad))
    sys.exit(1)
EOF

nvidia-smi 2>&1 | tee "$OUT_DIR/nvidia-smi.txt"

status=0
# every gpu-marked test file (tests/test_gpu.py and any other), so that files needing what this machine
# lacks are not even collected
mapfile -t gpu_tests < <(grep -l "mark.gpu" tests/test_*.py)
"$PY" -m pytest -q -m gpu -p no:cacheprovider "${gpu_tests[@]}" -s 2>&1 | tee "$OUT_DIR/pytest.log"
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1

# BENCH_ARGS: extra arguments of the benchmark, e.g. BENCH_ARGS=--no-seg or --build-only
"$PY" -m tools.bench gpu --json ${BENCH_ARGS:-} >"$OUT_DIR/bench_gpu.json" 2>"$OUT_DIR/bench_gpu.log"
rc=$?
tail -n 5 "$OUT_DIR/bench_gpu.log" | tr '\r' '\n' | tail -n 5 >&2
cat "$OUT_DIR/bench_gpu.json"
[ $rc -eq 0 ] || { echo "gpu_check: benchmark failed (exit $rc), see bench_gpu.log" >&2; status=1; }
# PIPELINE_ARGS, when set: also the data-path benchmark on this host, e.g. PIPELINE_ARGS="--skip render,writer,stream
# --workers 8 --images 1024" (build_zero_teacher: the build with 8 PIL workers and a zero-cost teacher on the GPU;
# build_replay: the build's loop and writer alone, the ceiling they put on a GPU build)
if [ -n "${PIPELINE_ARGS:-}" ]; then
    "$PY" -m tools.bench pipeline --json $PIPELINE_ARGS >"$OUT_DIR/bench_pipeline.json" 2>"$OUT_DIR/bench_pipeline.log" ||
        { echo "gpu_check: pipeline benchmark failed, see bench_pipeline.log" >&2; status=1; }
    cat "$OUT_DIR/bench_pipeline.json"
fi
exit $status
