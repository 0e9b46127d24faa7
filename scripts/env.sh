# Sourced by scripts/demo.sh and scripts/test.sh: make (once) and activate the project's virtual environment.
# RINGTRAIN_VENV picks its folder (default .venv); TORCH_SPEC picks the torch build to install.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${RINGTRAIN_VENV:-$ROOT/.venv}"
if [ ! -x "$VENV/bin/python" ]; then
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.ringtrain-installed"
if [ ! -f "$stamp" ] || [ "$ROOT/pyproject.toml" -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  if [ -z "${TORCH_SPEC:-}" ]; then
    # Without a GPU, the CPU build (2.13.0 is the one CI and the docs were measured with).
    if command -v nvidia-smi >/dev/null 2>&1; then TORCH_SPEC="torch>=2.6"; else TORCH_SPEC="torch==2.13.0"; fi
  fi
  python -m pip install -q "$TORCH_SPEC"
  python -m pip install -q -e "$ROOT[dev]"
  touch "$stamp"
fi
cd "$ROOT"
