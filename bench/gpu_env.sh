# Sourced by the GPU scripts: repository root, $OUT, $PY (the project's .venv, or a machine's own
# PyTorch plus the wheels in .whl/, installed without network).
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-bench/results}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
if [ -d .whl ] && ! $PY -c "import webdataset" 2>/dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site
fi
