#!/bin/bash
# the degree study's federations (docs/results.md section 3) plus the H = 0 ones (issue 12)
set -e
export FEDMDH_HOME=/tmp/fedmdh_home_wt
F=.venv/bin/fedmdh
W=../shared/datasets/wolverton_oxides/wolverton_oxides.csv
S=../shared/datasets/matbench_steels/matbench_steels.csv
.venv/bin/python -c "import pandas as pd; d = pd.read_csv('../shared/datasets/matbench_expt_gap/matbench_expt_gap.csv'); d[d.target > 0].to_csv('/tmp/expt_gap_positive.csv', index=False)"
WX=(--formula-column formula --featurizers magpie,deml,megnet_el --exclude "atom a" --exclude "atom b" --exclude "lowest distortion" --exclude e_hull --exclude "gap pbe" --exclude "e_form oxygen")
for D in iid low medium high; do
  [ -f runs/degree/wolverton_$D/data/test.csv ] || $F partition --data $W --target e_form --institutions 3 --degree $D --seed 0 "${WX[@]}" --out runs/degree/wolverton_$D/data
done
[ -f runs/degree/wolverton_h0/data/test.csv ] || $F partition --data $W --target e_form --institutions 3 --degree high --H 0 --seed 0 "${WX[@]}" --out runs/degree/wolverton_h0/data
for D in iid low medium high h0; do
  X=(); DD=$D
  [ $D = iid ] && X=(--kl 0.08)
  [ $D = high ] && X=(--test-fraction 0.15)
  [ $D = h0 ] && X=(--test-fraction 0.15 --H 0) && DD=high
  [ -f runs/degree/steels_$D/data/test.csv ] || $F partition --data $S --target target --institutions 3 --degree $DD "${X[@]}" --seed 0 --formula-column formula \
      --featurizers magpie,deml,megnet_el --shared-featurizer matminer --out runs/degree/steels_$D/data
done
for D in iid low medium high h0; do
  X=(); DD=$D
  [ $D = h0 ] && X=(--H 0) && DD=high
  [ -f runs/degree/gap_$D/data/test.csv ] || $F partition --data /tmp/expt_gap_positive.csv --target target --institutions 3 --degree $DD "${X[@]}" --seed 0 \
      --formula-column formula --featurizers magpie,deml,megnet_el --shared-featurizer matminer --out runs/degree/gap_$D/data
done
