#!/bin/bash
# Fine-tune the SHIPPED shapes-vp and shapes-flow on this 2-core CPU with more two-object scenes
# (issue 5: every remaining attribute error is in two-object prompts; docs/benchmarks/models_errors_regions.md).
# The run recorded in docs/benchmarks/models_finetune.md is exactly this script with its defaults
# (about 20 minutes of data preparation, then both denoisers in parallel, one torch thread each, for
# at most UNET_S seconds). The fine-tuned weights land in $RUN/export; `EXPORT=1` also writes them
# into the package (src/noisewise/weights), keeping the shipped VAE, evaluator and generation defaults.
#
#   bash train/cpu_finetune.sh                          # the recorded run
#   LR=5e-5 UNET_S=2100 SEED=2 bash train/cpu_finetune.sh   # the second recorded run (same data)
#   N=2000 UNET_S=60 RUN=/tmp/ft_try bash train/cpu_finetune.sh   # a quick look
set -e
N=${N:-40000}          # fresh training images, seed 1 (the shipped run used seed 0)
TWO=${TWO:-0.6}        # share of two-object scenes (the world's prior: 0.35)
BATCH=${BATCH:-256}
LR=${LR:-1.5e-4}       # peak; cosine to 10% over the schedule (the shipped run: 5e-4 from scratch at batch 512)
WARMUP=${WARMUP:-50}
UNET_S=${UNET_S:-4800} # seconds per denoiser; the step count is fitted to it after 30 steps
SEED=${SEED:-1}        # the denoisers' training seed (the data always use seed 1)
RUN=${RUN:-/tmp/ft}
W=src/noisewise/weights
T="python train/train_shapes.py"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
mkdir -p "$RUN"
$T data --run "$RUN" --n "$N" --heldout 500 --seed 1 --two-objects "$TWO" --workers 1
$T latents --run "$RUN" --vae $W/shapes-vae --evaluator $W/shapes-evaluator --device cpu &
P=$!
$T captions --run "$RUN" --device cpu   # the bundled MiniLM, once for both denoisers
wait $P
for kind in vp flow; do
  $T unet --run "$RUN" --kind $kind --init-from $W/shapes-$kind --batch-size "$BATCH" --lr "$LR" \
    --warmup "$WARMUP" --max-seconds "$UNET_S" --checkpoint-every 120 --seed "$SEED" --device cpu --no-progress \
    > "$RUN/$kind.log" 2>&1 &
done
wait
tail -n 3 "$RUN/vp.log" "$RUN/flow.log"
if [ "${EXPORT:-0}" = 1 ]; then
  for kind in vp flow; do
    cp "$RUN/export/unet-$kind.safetensors" "$W/shapes-$kind/unet/diffusion_pytorch_model.safetensors"
  done
  echo "fine-tuned denoisers written to $W/shapes-{vp,flow}/unet"
fi
