#!/usr/bin/env bash
# Download, here (where PyPI is reachable), the wheels that benchmarks/gpu_check.sh installs on the offline GPU
# machine (Python 3.12, x86-64). That machine already has torch, accelerate, pandas, pyarrow, xxhash, rich,
# psutil, tqdm, fsspec, huggingface-hub (1.33), requests, pyyaml, safetensors, typer, peft; it lacks trl, datasets,
# evaluate, tyro (and tyro's docstring-parser, typeguard), dill, multiprocess. transformers and tokenizers
# come along so the GPU run uses the pinned versions (5.24.0 / 0.23.3, not the image's 5.17 / 0.23.2);
# transformers 5.24 checks regex>=2025.10.22 at import, so regex comes too, and typing_extensions>=4.14 for
# typeguard. peft is on that machine in an unknown version and trl imports it whenever it is installed, so
# the version seen working with trl 0.11.4 + transformers 5.24 (REFERENCE.md) comes along. Every
# Requires-Dist of these wheels is either listed here or on that machine.
#
#     bash benchmarks/make_wheels.sh        # -> .whl/ (about 19 MiB), ignored by git via .git/info/exclude
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  transformers==5.24.0
  tokenizers==0.23.3
  trl==0.11.4
  datasets==5.2.0
  evaluate==0.4.6
  tyro==1.0.17
  docstring-parser==0.18.0
  typeguard==4.6.1
  typing_extensions==4.16.0
  dill==0.4.1
  multiprocess==0.70.19
  regex==2026.5.9
  peft==0.21.2
)

mkdir -p .whl
if [ -d .git ] && ! grep -qxF '/.whl/' .git/info/exclude 2>/dev/null; then
  echo '/.whl/' >> .git/info/exclude
fi
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl "${WHEELS[@]}"

# One version of each package only: two would stop the whole install on the GPU machine.
python3 - <<'EOF'
import collections, os, re, sys
names = collections.Counter(re.split(r"-\d", f, 1)[0].lower().replace("_", "-") for f in os.listdir(".whl") if f.endswith(".whl"))
dupes = [n for n, c in names.items() if c > 1]
if dupes:
    sys.exit(f"error: several versions in .whl/ of {dupes}; delete the old ones")
EOF
du -sh .whl
ls .whl
