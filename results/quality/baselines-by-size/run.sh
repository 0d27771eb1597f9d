set -e
P=/work/main/.venv/bin/prefrec
for spec in "1x 2 1 popularity,itemknn,bpr" "4x 8 4 popularity,itemknn,bpr" "16x 32 16 popularity,itemknn" "64x 128 64 popularity,itemknn"; do
  set -- $spec
  d=/work/bl/data-$1
  [ -f $d/ml100k_eval_ranking.json ] || $P data build --raw /work/shared/data/ml-100k --format ml100k --protocol dmpo --out $d --prefix ml100k --seed 0 --max-interactions 0 --sft-users 602 --dpo-users 602 --valid-users 100 --eval-users 200 --pairs-per-user $2 --groups-per-user $3 --eval-pairs-per-user 6 --max-history 10
  for split in valid eval; do
    $P baselines --train $d/ml100k_sft_ranking.json $d/ml100k_dpo_ranking_5.json --eval $d/ml100k_${split}_ranking.json --methods $4 --seed 0 --out /work/bl/s0-$1-$split --n-boot 1000
  done
done
# then BPR-MF on the 16x build (710-721 s each, the two in parallel):
d=/work/bl/data-16x
for split in valid eval; do
  $P baselines --train $d/ml100k_sft_ranking.json $d/ml100k_dpo_ranking_5.json --eval $d/ml100k_${split}_ranking.json --methods bpr --seed 0 --out /work/bl/s0-16x-$split --n-boot 1000
done
