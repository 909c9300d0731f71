#!/usr/bin/env bash
# Fetch, into .whl/, the wheels the GPU image lacks, and nothing else: idempotent (a wheel already there is
# kept, another version of the same project is removed: two versions stop the whole install there).
#
#   bash benchmarks/fetch_wheels.sh           # here, before the first device call; then carry=[".whl"]
#   DRY_RUN=1 bash benchmarks/fetch_wheels.sh # only say what is missing and what would be fetched
#
# What the image holds is the device tool's KINDS.md package list for nvidia-h200 ("Python packages already
# there", read 2026-11-17), copied below; where /work/.library/device/KINDS.md exists the script reads the
# list from there instead and names any difference from this copy. Starting from WANTED (the peer the
# benchmarks and the diffusers tests need), every requirement of every fetched wheel (its Requires-Dist
# without extras, markers evaluated for the image's Python 3.12 on Linux x86-64) that the image lacks is
# fetched too, so a session cannot forget one. pip only:  for
# CPython 3.12, manylinux x86-64 (or pure-Python) wheels, as the device tool's README prescribes.
# run_gpu.sh installs every wheel it finds in .whl/ into /tmp/site on the machine.
set -euo pipefail
cd "$(dirname "$0")/.."

WANTED=(${WANTED:-diffusers==0.42.1})
PY="${PYTHON:-python3}"
KINDS="${KINDS_MD:-/work/.library/device/KINDS.md}"
# KINDS.md, nvidia-h200, "Python packages already there" (2026-11-17)
IMAGE_PACKAGES="
    absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
    build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage
    cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops
    equinox etils execnet filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch
    grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize hypothesis idna imageio iniconfig
    interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver
    lazy-loader lightning lightning-utilities linear-operator lineax llvmlite lxml markdown
    markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes mpi4py mpmath msgpack multidict
    multipledispatch mypy-extensions nanobind narwhals networkx ninja numba numba-cuda numpy numpyro
    nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13
    nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13
    nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir
    onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
    orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker
    prometheus-client propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing
    pyproject-hooks pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout
    pytest-xdist python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors
    scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece sentence-transformers
    setuptools shellingham simplejson six sortedcontainers statsmodels sympy tabulate tensorboard
    tensorboard-data-server tensorstore threadpoolctl tifffile tiktoken timm tokenizers toolz torch
    torchaudio torchdiffeq torch-geometric torchmetrics torchvision tqdm transformers treescope triton
    typer typing-extensions typing-inspect urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray
    xxhash yarl zipp
"
if [[ -r "$KINDS" ]]; then
    listed=$(grep -o 'Packages: .*' "$KINDS" | head -n 1 | sed 's/^Packages: //; s/\.$//' | tr -d ',') || listed=""
    if [[ -n "$listed" ]]; then
        diff <(tr ' ' '\n' <<<"$IMAGE_PACKAGES" | grep . | sort) <(tr ' ' '\n' <<<"$listed" | grep . | sort)             >/dev/null || echo "fetch_wheels: $KINDS lists other packages than this script's copy: using KINDS.md's"
        IMAGE_PACKAGES="$listed"
    fi
fi
mkdir -p .whl
exclude=$(git rev-parse --git-path info/exclude 2>/dev/null || true)
if [[ -n "$exclude" ]] && ! grep -qx '/.whl/' "$exclude" 2>/dev/null && ! git check-ignore -q .whl 2>/dev/null; then
    echo '/.whl/' >>"$exclude"
fi

IMAGE_PACKAGES="$IMAGE_PACKAGES" DRY_RUN="${DRY_RUN:-0}" "$PY" - "${WANTED[@]}" <<'PYTHON'
import os, re, subprocess, sys, zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

WHL = Path(".whl")
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
image = {canonicalize_name(n) for n in os.environ["IMAGE_PACKAGES"].split()}
dry = os.environ.get("DRY_RUN") == "1"
env = {**default_environment(), "python_version": "3.12", "python_full_version": "3.12.3",
       "implementation_name": "cpython", "platform_python_implementation": "CPython", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}


def wheels():
    return {canonicalize_name(parse_wheel_filename(p.name)[0]): p for p in sorted(WHL.glob("*.whl"))}


def requires(path):
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req = Requirement(line.split(":", 1)[1].strip())
            if req.marker is None or req.marker.evaluate(env):
                out.append(req)
    return out


def fetch(spec):
    req = Requirement(spec)
    name = canonicalize_name(req.name)
    have = wheels().get(name)
    if have is not None and (not req.specifier or parse_wheel_filename(have.name)[1] in req.specifier):
        print(f"fetch_wheels: have {have.name}")
        return have
    if dry:
        print(f"fetch_wheels: would fetch {spec}")
        return None
    if have is not None:
        have.unlink()  # one version of each
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:", "--python-version",
           "3.12", "--implementation", "cp", "-d", str(WHL), spec]
    for p in PLATFORMS:
        cmd[-1:-1] = ["--platform", p]
    subprocess.run(cmd, check=True)
    got = wheels()[name]
    print(f"fetch_wheels: fetched {got.name}")
    return got


queue, seen = list(sys.argv[1:]), set()
while queue:
    spec = queue.pop(0)
    name = canonicalize_name(Requirement(spec).name)
    if name in seen:
        continue
    seen.add(name)
    path = fetch(spec)
    if path is None:
        continue
    for req in requires(path):
        dep = canonicalize_name(req.name)
        if dep in image:
            print(f"fetch_wheels:   {path.name} needs {req}: in the image")
        elif dep not in seen:
            queue.append(str(req).split(";")[0].strip())
extra = sorted(set(wheels()) - seen)
for name in extra:
    print(f"fetch_wheels: removing {wheels()[name].name} (not needed)")
    if not dry:
        wheels()[name].unlink()
total = sum(p.stat().st_size for p in WHL.glob("*.whl"))
print(f"fetch_wheels: .whl/ holds {', '.join(p.name for p in sorted(WHL.glob('*.whl')))} ({total / 2**20:.1f} MiB)")
PYTHON
