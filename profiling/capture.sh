#!/usr/bin/env bash
# Captures an Nsight Systems timeline of a hicache replay (or of any command) with hicache's NVTX ranges.
#
#   profiling/capture.sh [-o OUTPUT] [-- COMMAND [ARGS...]]
#
# OUTPUT: report path without extension (default: hicache_replay); writes OUTPUT.nsys-rep and prints
# the summary of the NVTX ranges. COMMAND: default, a replay of the bundled trace that exercises every
# stage (see profiling/README.md for how to read the result). NSYS: the nsys binary (default: nsys on
# PATH); PYTHON: the interpreter of the default command (default: python).
set -euo pipefail

usage() {
  sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

output=hicache_replay
while [[ $# -gt 0 ]]; do
  case "$1" in
    -o | --output)
      [[ $# -ge 2 ]] || usage
      output=$2
      shift 2
      ;;
    --)
      shift
      break
      ;;
    -h | --help) usage ;;
    *)
      echo "capture.sh: unknown argument '$1' (put the command to profile after --)" >&2
      usage
      ;;
  esac
done

if [[ $# -eq 0 ]]; then
  set -- "${PYTHON:-python}" -m hicache.cli replay --limit 1000 --hicache-ratio 4 --device-ratio 0.05 --quiet
fi

nsys=${NSYS:-nsys}
if ! command -v "$nsys" >/dev/null 2>&1; then
  echo "capture.sh: '$nsys' (the Nsight Systems CLI) was not found: install Nsight Systems and put nsys on" \
    "PATH, or set NSYS=/path/to/nsys. Nothing was run. (Without Nsight, tests/profiling/nvtx_recorder.c" \
    "records the ranges to a text file: see profiling/README.md.)" >&2
  exit 127
fi

mkdir -p "$(dirname "$output")"
# cuda: launches, kernels, copies, events per stream; nvtx: the ranges; osrt: blocking waits.
# No CPU sampling or context switches: they would dwarf the ranges in the report.
"$nsys" profile --trace=cuda,nvtx,osrt --sample=none --cpuctxsw=none \
  --output="$output" --force-overwrite=true "$@"
"$nsys" stats --report nvtx_sum "$output.nsys-rep"
echo "capture.sh: wrote $output.nsys-rep (open it with nsys-ui; profiling/README.md says how to read it)"
