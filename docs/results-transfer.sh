#!/bin/sh
# docs/results-transfer.md: HeadQ and GSRQ keys calibrated on WikiText-2 validation or on the first
# 90% of Tiny Shakespeare, each evaluated on WikiText-2 test and on the last 10% of Tiny Shakespeare.
set -e
HEADQ='headq:rank=15,zbits=2,lead=1,scale=base,basis=joint'
for cal in wikitext-2-valid tinyshakespeare; do
  headq calibrate --out "results/transfer-$cal.safetensors" --text "$cal" --keys "$HEADQ" --keys 'gsrq:bits=2'
done
for text in wikitext-2-test tinyshakespeare; do
  for cal in wikitext-2-valid tinyshakespeare; do
    headq bench --suite docs/results-transfer.toml --text "$text" --calibration "results/transfer-$cal.safetensors" \
      --skip prefill --skip speed --skip stream --out results --name "transfer-$text-from-$cal"
  done
done
