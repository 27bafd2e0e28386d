#!/bin/sh
# Codebooks for docs/results-gsrq.toml: 4,096 tokens of WikiText-2 validation (8 windows of 512).
set -e
# sh docs/results-gsrq-calibrate.sh [MODEL]: the default model, or MODEL (e.g. gemma3-270m) into
# results/gsrq-MODEL.safetensors
if [ -n "${1:-}" ]; then MODEL="--model $1" TAG="-$1"; else MODEL="" TAG=""; fi
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} headq calibrate $MODEL --out "results/gsrq$TAG.safetensors" --tokens 4096 --length 512 \
  --keys 'gsrq:bits=0.5,dim=16,scale=fisher' \
  --keys 'gsrq:bits=0.5,dim=16,scale=fisher,learner=kmeans' \
  --keys 'gsrq:bits=0.5,dim=16,scale=fisher,weighted=false' \
  --keys 'gsrq:bits=0.75,scale=fisher' \
  --keys 'gsrq:bits=0.75,scale=fisher,learner=kmeans' \
  --keys 'gsrq:bits=0.75,scale=fisher,weighted=false' \
  --keys 'gsrq:bits=1' \
  --keys 'gsrq:bits=1,scale=fisher' \
  --keys 'gsrq:bits=1,scale=fisher,learner=kmeans' \
  --keys 'gsrq:bits=1,scale=fisher,weighted=false' \
  --keys 'gsrq:bits=2,scale=fisher' \
  --keys 'gsrq:bits=2,scale=fisher,learner=kmeans' \
  --keys 'gsrq:bits=2,scale=fisher,weighted=false' \
  --values 'gsrq:bits=0.5,dim=16' \
  --values 'gsrq:bits=0.5,dim=16,learner=kmeans' \
  --values 'gsrq:bits=0.5,dim=16,weighted=false' \
  --values 'gsrq:bits=0.75' \
  --values 'gsrq:bits=0.75,learner=kmeans' \
  --values 'gsrq:bits=0.75,weighted=false' \
  --values 'gsrq:bits=1' \
  --values 'gsrq:bits=1,learner=kmeans' \
  --values 'gsrq:bits=1,weighted=false' \
  --values 'gsrq:bits=2' \
  --values 'gsrq:bits=2,learner=kmeans' \
  --values 'gsrq:bits=2,weighted=false'
