#!/bin/sh
# Codebooks for docs/results-gsrq-shape.toml (issue 17, item 1): 1 index bit per element spent on
# sub-vectors of 4, 8 or 16 channels, or on two stages of 16 codewords, pre-RoPE keys, and values
# on 8 or 16 channels; 4,096 tokens of WikiText-2 validation (8 windows of 512), as
# docs/results-gsrq-rope-calibrate.sh.
set -e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} headq calibrate --out results/gsrq-shape.safetensors --tokens 4096 --length 512 \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre' \
  --keys 'gsrq:bits=1,dim=4,scale=fisher,rope=pre' \
  --keys 'gsrq:bits=1,dim=16,scale=fisher,rope=pre' \
  --keys 'gsrq:stages=16x16,scale=fisher,rope=pre' \
  --values 'gsrq:bits=1' \
  --values 'gsrq:bits=1,dim=16'
