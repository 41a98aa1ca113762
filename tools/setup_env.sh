#!/usr/bin/env bash
# Creates the project's environment; idempotent, run by `make setup`.
#
#   1. A shared "stack" environment outside the clone (torch, torchvision, detectron2 with PointRend,
#      their requirements and the test tools), keyed by a hash of requirements/stack.txt and the
#      detectron2 route, so every clone on this machine reuses it instead of installing ~5 GB again.
#   2. The project-local `.venv` (Python 3.11): sees the stack through a .pth file and holds the
#      plugin in editable mode.
#
# Environment: PYTHON (interpreter, default python3.11), OBJGUIDED_STACK_ROOT (where stacks live,
# default ~/.cache/objguided_d2), OBJGUIDED_D2_ROUTE (auto | official | wheel; default auto).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-python3.11}"
STACK_ROOT="${OBJGUIDED_STACK_ROOT:-${XDG_CACHE_HOME:-$HOME/.cache}/objguided_d2}"
ROUTE="${OBJGUIDED_D2_ROUTE:-auto}"
D2_WHEEL="sal-detectron2==0.7.2"
D2_GIT="https://github.com/facebookresearch/detectron2.git"
VENV="$ROOT/.venv"
LOG_DIR="$STACK_ROOT/logs"

fail() {
  echo "setup failed: $1" >&2
  exit 1
}

# Runs a step quietly; on failure prints one sentence and where the full log is.
step() {
  local what="$1" advice="$2"
  shift 2
  local log="$LOG_DIR/$(date +%Y%m%d-%H%M%S)-${what// /_}.log"
  echo "  - $what"
  if ! "$@" >"$log" 2>&1; then
    tail -n 15 "$log" >&2
    fail "could not $what ($advice; full log: $log)."
  fi
}

command -v "$PYTHON" >/dev/null 2>&1 \
  || fail "no '$PYTHON' on PATH; install Python 3.11 or set PYTHON=/path/to/python3.11."
"$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))' \
  || fail "'$PYTHON' is not Python 3.11; set PYTHON=/path/to/python3.11."
mkdir -p "$LOG_DIR"

# The stack is keyed by what goes into it, so a change of requirements builds a new one.
KEY="$( (cat "$ROOT/requirements/stack.txt"; echo "$D2_WHEEL $ROUTE") | sha256sum | cut -c1-12)"
STACK="$STACK_ROOT/stack-py311-$KEY"
STACK_PY="$STACK/bin/python"

github_reachable() {
  timeout 8 git ls-remote --heads "$D2_GIT" main >/dev/null 2>&1
}

build_stack() {
  # .complete is written last, so an interrupted build is started over.
  rm -rf "$STACK"
  echo "Creating the shared stack environment in $STACK (one time per machine, a few minutes)"
  step "create the stack virtual environment" "check that '$PYTHON -m venv' works" \
    "$PYTHON" -m venv "$STACK"
  step "upgrade pip" "check access to the package registry" \
    "$STACK/bin/python" -m pip install --upgrade "pip>=24"
  step "install torch, torchvision and the requirements" \
    "check access to the package registry and free disk space (about 6 GB)" \
    "$STACK/bin/python" -m pip install -r "$ROOT/requirements/stack.txt"

  local route="$ROUTE"
  if [ "$route" = auto ]; then
    if github_reachable; then route=official; else route=wheel; fi
  fi
  if [ "$route" = official ]; then
    step "build detectron2 from the official source" \
      "set OBJGUIDED_D2_ROUTE=wheel to use the prebuilt pure-Python files instead" \
      "$STACK/bin/python" -m pip install --no-build-isolation "git+$D2_GIT"
    echo "official detectron2 source ($D2_GIT)" >"$STACK/detectron2-route.txt"
  else
    # The wheel is tagged for CPython 3.10 but its pure-Python code runs on 3.11; its 3.10-only
    # compiled _C is never loaded, and nothing here needs it.
    local purelib
    purelib="$("$STACK/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
    step "install the detectron2 files ($D2_WHEEL)" "check access to the package registry" \
      "$STACK/bin/python" -m pip install --no-deps --only-binary=:all: --python-version 3.10 \
      --target "$purelib" "$D2_WHEEL"
    # The wheel also carries detectron2's own tools/ scripts as a top-level package "tools", which
    # would shadow this project's tools/ folder.
    rm -rf "$purelib/tools"
    echo "PyPI wheel $D2_WHEEL (detectron2 main, pure Python, with PointRend)" >"$STACK/detectron2-route.txt"
  fi
  step "import detectron2 and PointRend" "the stack is inconsistent; delete $STACK and retry" \
    "$STACK/bin/python" -c "import detectron2.modeling, detectron2.engine, detectron2.projects.point_rend"
  touch "$STACK/.complete"
}

echo "objguided_d2 setup"
if [ -f "$STACK/.complete" ]; then
  echo "  - reusing the stack environment $STACK"
else
  build_stack
fi

STACK_SITE="$("$STACK_PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LOCAL_KEY="$KEY-$(sha256sum "$ROOT/setup.py" | cut -c1-12)"
if [ -f "$VENV/.objguided-stack" ] && [ "$(cat "$VENV/.objguided-stack")" = "$LOCAL_KEY" ]; then
  echo "  - reusing $VENV"
else
  rm -rf "$VENV"
  # No pip/setuptools of its own: the stack's (new enough for editable installs) are on its path.
  step "create the project environment .venv" "check that '$PYTHON -m venv' works" \
    "$PYTHON" -m venv --without-pip "$VENV"
  VENV_SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
  echo "$STACK_SITE" >"$VENV_SITE/_objguided_stack.pth"
  ln -sf "$STACK/bin/ruff" "$VENV/bin/ruff"
  step "install the plugin in editable mode" "see the log; setup.py may be broken" \
    "$VENV/bin/python" -m pip install --no-deps --no-build-isolation -e "$ROOT"
  echo "$LOCAL_KEY" >"$VENV/.objguided-stack"
fi

"$VENV/bin/python" - <<'EOF' || fail "the environment does not import; delete .venv and the stack and run make setup again."
import detectron2, torch, torchvision, objguided_d2
from objguided_d2.env import detectron2_route
print(f"  ready: torch {torch.__version__}, torchvision {torchvision.__version__}, "
      f"detectron2 {detectron2.__version__} ({detectron2_route()}), "
      f"objguided_d2 {objguided_d2.__version__}")
EOF
