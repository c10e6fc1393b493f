#!/usr/bin/env bash
# Refresh requirements/lock.txt: resolve vtcbench's declared ranges afresh (the newest releases
# they admit, beside the CPU torch of requirements/cpu.txt) in a throwaway venv, and freeze it.
#     bash requirements/refresh-lock.sh        (from anywhere; rewrites requirements/lock.txt)
# Then run .ci/run, and commit the new lock only if CI is green.
set -euo pipefail
cd "$(dirname "$0")/.."
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
python3 -m venv "$work/venv"
pip="$work/venv/bin/python -m pip"
$pip install -q "$(grep '^torch==' requirements/cpu.txt)"
$pip install -q -e ".[test]" "$(grep '^torch==' requirements/cpu.txt)"
{
  sed -n '1,/^# --- pins/p' requirements/lock.txt
  $pip freeze --exclude-editable | grep -viE '^(torch|torchvision)=='
} > "$work/lock.txt"
mv "$work/lock.txt" requirements/lock.txt
echo "requirements/lock.txt: $(grep -c '==' requirements/lock.txt) pins"
