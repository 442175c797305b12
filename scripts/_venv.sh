# Shared by scripts/test and scripts/demo: create .venv and install gradwatch with the given extra.
# torch is installed first at a pinned version (GRADWATCH_TORCH, default 2.13.0) so pip does not pick
# a newer multi-gigabyte build; set GRADWATCH_TORCH=skip to keep whatever torch the venv has.
ensure_venv() {
  local extra=$1
  local py=${PYTHON:-}
  if [ -z "$py" ]; then
    py=$(command -v python3.11 || command -v python3)
  fi
  if [ ! -x .venv/bin/python ]; then
    echo "setting up .venv with $($py --version)..." >&2
    "$py" -m venv .venv
  fi
  local torch_pin=${GRADWATCH_TORCH:-2.13.0}
  if [ "$torch_pin" != skip ] && ! .venv/bin/python -c "import torch" >/dev/null 2>&1; then
    echo "installing torch==$torch_pin..." >&2
    .venv/bin/pip install -q --disable-pip-version-check "torch==$torch_pin"
  fi
  .venv/bin/pip install -q --disable-pip-version-check -e ".[$extra]" 2> >(grep -v "is ignored: it is neither" >&2)
}
