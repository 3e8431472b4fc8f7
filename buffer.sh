#!/usr/bin/env bash
# bash buffer.sh [PRESET] [extra buffer.py flags...]
#   no preset: the Digits quickstart (`python presets.py list` shows every preset)
set -euo pipefail
cd "$(dirname "$0")"
preset=default
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then preset=$1; shift; fi
flags=$(python presets.py buffer "$preset")
set -x
exec python buffer.py $flags "$@"
