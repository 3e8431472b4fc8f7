#!/usr/bin/env bash
# bash buffer.sh [PRESET] [extra buffer.py flags...]
#   no preset: the Digits quickstart; `python presets.py list` shows every preset (all live in presets.py)
exec python "$(dirname "$0")/presets.py" run buffer "$@"
