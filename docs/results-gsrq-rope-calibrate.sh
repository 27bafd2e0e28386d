#!/bin/sh
# Codebooks for docs/results-gsrq-rope.toml (issue 17, item 1): 4,096 tokens of WikiText-2
# validation (8 windows of 512), keys before and after the rotary embedding.
set -e
# sh docs/results-gsrq-rope-calibrate.sh [MODEL]: the default model, or MODEL (e.g. gemma3-270m) into
# results/gsrq-rope-MODEL.safetensors
if [ -n "${1:-}" ]; then MODEL="--model $1" TAG="-$1"; else MODEL="" TAG=""; fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} headq calibrate $MODEL --out "results/gsrq-rope$TAG.safetensors" --tokens 4096 --length 512 \
  --keys 'gsrq:bits=1,scale=fisher' \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre' \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre,learner=kmeans' \
  --keys 'gsrq:bits=0.75,scale=fisher,rope=pre' \
  --keys 'gsrq:bits=0.75,scale=fisher,rope=pre,learner=kmeans' \
  --values 'gsrq:bits=1' \
  --values 'gsrq:bits=1,learner=kmeans'
