#!/usr/bin/env bash
# Creates (once) and activates the project's virtual environment in .venv, with the pinned
# CPU stack and embdim installed in editable mode. Source it: `. scripts/env.sh`.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
stamp="$venv/.embdim-deps"
want="$(cat "$root/requirements-cpu.txt" "$root/requirements-torchrec.txt" "$root/setup.py" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[embdim] setting up $venv (first run takes a minute or two)" >&2
  python3 -m venv "$venv" || return 1 2>/dev/null || exit 1
  "$venv/bin/python" -m pip install -q --upgrade pip >/dev/null 2>&1
  "$venv/bin/python" -m pip install -q -r "$root/requirements-cpu.txt" || { return 1 2>/dev/null || exit 1; }
  "$venv/bin/python" -m pip install -q --no-deps -r "$root/requirements-torchrec.txt" || { return 1 2>/dev/null || exit 1; }
  "$venv/bin/python" -m pip install -q --no-deps -e "$root" || { return 1 2>/dev/null || exit 1; }
  echo "$want" > "$stamp"
fi
. "$venv/bin/activate"
