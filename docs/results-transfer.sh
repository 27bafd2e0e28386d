#!/bin/sh
# docs/results-transfer.md: learned keys calibrated on WikiText-2 validation or on the first 90% of
# Tiny Shakespeare, each evaluated on WikiText-2 test and on the last 10% of Tiny Shakespeare.
#   sh docs/results-transfer.sh               HeadQ and GSRQ keys on the default model
#   sh docs/results-transfer.sh gemma3-270m   HeadQ keys (two ranks) on Gemma 3 270M
set -e
HEADQ='headq:rank=15,zbits=2,lead=1,scale=base,basis=joint'
if [ -n "${1:-}" ]; then
  MODEL="--model $1" SUITE=docs/results-transfer-gemma3.toml TAG="-$1"
  KEYS="--keys $HEADQ --keys headq:rank=60,zbits=2,lead=1,scale=base,basis=joint"
else
  MODEL="" SUITE=docs/results-transfer.toml TAG=""
  KEYS="--keys $HEADQ --keys gsrq:bits=2"
fi
for cal in wikitext-2-valid tinyshakespeare; do
  headq calibrate $MODEL --out "results/transfer$TAG-$cal.safetensors" --text "$cal" $KEYS
done
for text in wikitext-2-test tinyshakespeare; do
  for cal in wikitext-2-valid tinyshakespeare; do
    headq bench $MODEL --suite "$SUITE" --text "$text" --calibration "results/transfer$TAG-$cal.safetensors" \
      --skip prefill --skip speed --skip stream --out results --name "transfer$TAG-$text-from-$cal"
  done
done
