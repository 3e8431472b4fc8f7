#!/usr/bin/env bash
# bash distill.sh [PRESET] [extra distill.py flags...]
#   no preset: the Digits quickstart (`python presets.py list` shows every preset)
set -euo pipefail
cd "$(dirname "$0")"
preset=default
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then preset=$1; shift; fi
flags=$(python presets.py distill "$preset")
set -x
exec python distill.py $flags "$@"
