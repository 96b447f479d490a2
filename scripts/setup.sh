#!/usr/bin/env bash
# Set up hw on this machine: system packages, a Python virtualenv with every dependency
# (cached under ~/.cache/hw, keyed on the dependency set, so a second run is fast), and the
# Rust extension built in release mode into it. Prints the venv path on the last line.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
# System packages the project needs (one Debian package per line in scripts/apt-packages.txt).
if [ -s scripts/apt-packages.txt ]; then
  missing=$(grep -v '^#' scripts/apt-packages.txt | while read -r p; do
    [ -n "$p" ] && ! dpkg -s "$p" >/dev/null 2>&1 && echo "$p"; done || true)
  if [ -n "$missing" ]; then
    echo "setup: installing system packages: $missing" >&2
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO=sudo
    $SUDO apt-get update -qq
    # shellcheck disable=SC2086
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  fi
fi

# The dependency set: pyproject's dependencies and extras, the Python version, the setup script.
key=$( { "$PY" --version; sed -n '/^\[project\]/,/^\[project.scripts\]/p' pyproject.toml; cat scripts/setup.sh; } \
      | sha256sum | cut -c1-16)
VENV=${HW_VENV:-$HOME/.cache/hw/venv-$key}
if [ ! -f "$VENV/.hw-ready" ]; then
  echo "setup: creating $VENV (first time for this dependency set)" >&2
  rm -rf "$VENV"
  "$PY" -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  deps=$("$VENV/bin/python" - <<'PYEOF'
import tomllib
p = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = list(p["dependencies"])
for extra in p.get("optional-dependencies", {}).values():
    deps += extra
print("\n".join(sorted(set(deps))))
PYEOF
)
  # shellcheck disable=SC2086
  echo "$deps" | tr '\n' '\0' | xargs -0 "$VENV/bin/pip" install -q "maturin>=1.7,<2"
  touch "$VENV/.hw-ready"
fi

# Build the Rust extension (release, LTO) and install hw into the venv, editable.
log=$(mktemp)
if ! VIRTUAL_ENV="$VENV" PATH="$VENV/bin:$PATH" "$VENV/bin/maturin" develop --release -q >"$log" 2>&1; then
  cat "$log" >&2; rm -f "$log"
  echo "setup: building the Rust extension failed (see above)" >&2
  exit 1
fi
grep -v -e '^Requirement already satisfied' -e '^Ignoring ' "$log" >&2 || true
rm -f "$log"
echo "$VENV"
