#!/bin/sh
# Pretrain a patch-2 ShapesWorld transformer (64 image tokens) on the GPU machine, on the shipped pipeline's VAE
# and text encoders (issue 16: "base capacity"; about 35 min on 2 idle CPU cores, minutes on one GPU).
# The shipped transformer is itself patch 2 now, so this continues it on clean captions (the model card's stage 2
# continued; it undoes stage 3's incomplete-caption flaw); a pipeline of another patch size as --init-from
# (e.g. git show 0b7f432's patch-4 pipeline) would start a fresh transformer instead.
#
# On the device, after the wheel install of BENCHMARKS.md's GPU suite command:
#   sh benchmarks/gpu_pretrain_shapes.sh     (STEPS=20000 BATCH=32 SNAPSHOT=2500 LIMIT=480 seconds by default)
# Writes to $OUT: the transformer (config.json + weights, the only part that changes), pretrain.json (losses,
# times, held-out accuracy per task) and pretrain.log. If pretraining outruns LIMIT, the newest snapshot's
# transformer comes back instead (its step is in $OUT/transformer/STEP). Back here, build the pipeline with
#   cp -r tempflow/shapes/pipeline /tmp/shapes-p2 && cp <files_at>/transformer/* /tmp/shapes-p2/transformer/
# and score it with `tempflow eval --model /tmp/shapes-p2 --samples-per-prompt 4`.
set -eu
STEPS=${STEPS:-20000}
BATCH=${BATCH:-32}
SNAPSHOT=${SNAPSHOT:-2500}
LIMIT=${LIMIT:-480}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-outputs/gpu-pretrain}
WORK=${WORK:-/tmp/shapes-p2}
mkdir -p "$OUT/transformer"
export PYTHONUNBUFFERED=1
timeout "$LIMIT" python3 -m tempflow.cli pretrain-shapes --init-from tempflow/shapes/pipeline --patch-size 2 --device "$DEVICE" \
    --transformer-steps "$STEPS" --batch-size "$BATCH" --snapshot-every "$SNAPSHOT" --output-dir "$WORK" ${EXTRA:-} \
    2> "$OUT/pretrain.log" | tee "$OUT/pretrain.json" || true
if [ -f "$WORK/model_index.json" ]; then
    DONE="$WORK"; echo "$STEPS" > "$OUT/transformer/STEP"
else
    DONE=$(ls -d "$WORK"-step* 2>/dev/null | sort -V | tail -n 1)
    [ -n "$DONE" ] || { echo "no snapshot within $LIMIT s" >&2; exit 1; }
    echo "${DONE##*-step}" > "$OUT/transformer/STEP"
fi
cp "$DONE/transformer/config.json" "$DONE/transformer/diffusion_pytorch_model.safetensors" "$OUT/transformer/"
