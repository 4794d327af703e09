#!/usr/bin/env bash
# Every live server test beside two CPU burners (nice 0): what the server's fault handling, edits,
# retention, soak and dashboard promise must hold on a busy machine, not only an idle one. Writes
# benchmarks/results/live_tests_burners.txt (the commit, the machine, each test's outcome, and the
# fault table of docs/server.md, measured: VQDM_FAULT_REPORT).
#   bash benchmarks/live_tests_burners.sh
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results/live_tests_burners.txt
report=$(mktemp)
python3 -c 'while True: pass' & b1=$!
python3 -c 'while True: pass' & b2=$!
trap 'kill $b1 $b2 2>/dev/null; rm -f "$report"' EXIT
{
echo "# Live tests beside two CPU burners (nice 0)"
echo "# commit: $(git rev-parse --short HEAD)$(git diff --quiet HEAD -- . ":!$out" || echo -dirty); $(nproc) cores, $(uname -m), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs)"
echo "# command: bash benchmarks/live_tests_burners.sh"
echo "burners: $b1 $b2; $(date -u); $(uptime)"
PYTHONPATH=$PWD HF_HUB_OFFLINE=1 VQDM_FAULT_REPORT=$report .venv/bin/python -m pytest -v -p no:cacheprovider \
  tests/server/test_faults_live.py tests/server/test_replicas_live.py tests/server/test_live_server.py \
  tests/server/test_edits_live.py tests/server/test_retention_live.py tests/server/test_soak.py \
  tests/deploy/test_dashboard_live.py 2>&1 | grep -E "PASSED|FAILED|ERROR|passed|failed|Error|assert"
echo "rc=${PIPESTATUS[0]}; $(date -u); $(uptime)"
echo
cat "$report"
} > "$out" 2>&1
