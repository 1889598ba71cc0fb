#!/bin/bash
# The degree study's benchmarks (docs/results.md sections 3 and 7): every federation cut by
# benchmarks/make_federations.sh, 5 algorithms x 3 seeds x 400 rounds, into runs/bench/<federation>.
# Usage: bash benchmarks/degree_study.sh [FEDERATION ...]   (default: all fifteen, the twelve of section 3 first)
set -e
export FEDMDH_HOME=${FEDMDH_HOME:-/tmp/fedmdh_home_degree}
F=${FEDMDH:-.venv/bin/fedmdh}
FEDS=("$@")
[ ${#FEDS[@]} -eq 0 ] && FEDS=({wolverton,steels,gap}_{iid,low,medium,high} {wolverton,steels,gap}_h0)
for N in "${FEDS[@]}"; do
  D=runs/degree/$N/data
  [ -f runs/bench/$N/results.csv ] && { echo "skip $N (runs/bench/$N/results.csv exists)"; continue; }
  T=$(.venv/bin/python -c "import json; print(json.load(open('$D/federation.json'))['target'])")
  echo "== $N ($(date +%T))"
  $F benchmark --institutions $D/inst0.csv $D/inst1.csv $D/inst2.csv --test $D/test.csv --target "$T" \
      --algorithms local,pooled,fedavg,fedprox,fedmdh --seeds 3 --rounds 400 --ledger off --out runs/bench/$N
done
