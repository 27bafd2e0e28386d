#!/bin/sh
# More codebooks for docs/results-gsrq-rope-seeds.toml (issue 17, item 1): two more learner seeds
# of the pre-RoPE keys, 2 index bits, and 0.75-bit values; same text and length as
# docs/results-gsrq-rope-calibrate.sh.
set -e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} headq calibrate --out results/gsrq-rope-seeds.safetensors --tokens 4096 --length 512 \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre,seed=1' \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre,seed=2' \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre,learner=kmeans,seed=1' \
  --keys 'gsrq:bits=1,scale=fisher,rope=pre,learner=kmeans,seed=2' \
  --keys 'gsrq:bits=0.75,scale=fisher,rope=pre,seed=1' \
  --keys 'gsrq:bits=0.75,scale=fisher,rope=pre,learner=kmeans,seed=1' \
  --keys 'gsrq:bits=2,scale=fisher,rope=pre' \
  --values 'gsrq:bits=0.75' \
  --values 'gsrq:bits=0.75,learner=kmeans'
