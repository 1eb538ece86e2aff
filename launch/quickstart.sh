#!/usr/bin/env bash
# The README's two commands. Sets up what they need on a fresh machine (Python 3, pip and a
# C++ compiler): a virtual environment, torch==2.13.0 when none is installed (OFFLOAD_ENGINE_TORCH
# names another requirement, e.g. a CPU-only build from your package index),
# and this package with its native ops built; then runs the main job or the tests.
#
#   bash launch/quickstart.sh train [args for python -m offload_engine.train]
#   bash launch/quickstart.sh test  [args for pytest]   (the fast suite: -m "not slow"; pass
#                                                        -m slow for the rest, or -m "" for all)
#
# OFFLOAD_ENGINE_VENV picks the environment (default: .venv in the repository);
# OFFLOAD_ENGINE_TORCH the torch requirement installed when torch is missing.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${OFFLOAD_ENGINE_VENV:-$ROOT/.venv}"
TORCH_REQ="${OFFLOAD_ENGINE_TORCH:-torch==2.13.0}"
cmd="${1:-}"
[ $# -gt 0 ] && shift
case "$cmd" in
  train|test) ;;
  *) echo "usage: bash launch/quickstart.sh train|test [args...]" >&2; exit 2 ;;
esac

if [ ! -x "$VENV/bin/python" ]; then
  echo "quickstart: creating virtual environment $VENV" >&2
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

if ! python -c "import torch" >/dev/null 2>&1; then
  echo "quickstart: installing $TORCH_REQ" >&2
  python -m pip install -q "$TORCH_REQ"
fi

# (Re)install when the package is missing or setup.py / ops sources changed since the last build.
stamp="$VENV/.offload_engine_build_stamp"
if [ ! -f "$stamp" ] || ! python -c "import offload_engine" >/dev/null 2>&1 \
   || [ -n "$(find "$ROOT/setup.py" "$ROOT/ops/csrc" "$ROOT/offload_engine/_build.py" -newer "$stamp" -print -quit)" ]; then
  echo "quickstart: installing offload_engine and building its native ops (about a minute)" >&2
  python -m pip install -q --upgrade pip "setuptools>=64" wheel
  # --no-build-isolation: compile against the torch installed above, never fetch another one.
  python -m pip install -q --no-build-isolation -e "$ROOT[test]"
  touch "$stamp"
fi

cd "$ROOT"
if [ "$cmd" = train ]; then
  exec python -m offload_engine.train "$@"
fi
# The fast suite by default; a later -m in "$@" replaces this one (pytest keeps the last).
exec python -m pytest -q tests -m "not slow" "$@"
