#!/bin/bash
# The one GPU run that trained the shipped shapes models (see docs/benchmarks/models.md).
# Expects: .whl/ (diffusers wheel + importlib_metadata), .minilm/ (the MiniLM, fp16), $OUT.
# Budgets (seconds of training loop): VAE and evaluator in parallel, then both denoisers in parallel.
VAE_S=${VAE_S:-95}
EVAL_S=${EVAL_S:-95}
UNET_S=${UNET_S:-215}
N=${N:-200000}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=$PWD/src:/tmp/site
R=/tmp/run
mkdir -p $R
T="python3 train/train_shapes.py"
t0=$(date +%s)
stamp() { echo "=== $(( $(date +%s) - t0 )) s: $*"; }
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
  python3 -c "import torch, transformers, diffusers; print('torch', torch.__version__, 'transformers', transformers.__version__, 'diffusers', diffusers.__version__)" || exit 1
  stamp data
  $T data --run $R --n $N --workers 16 || exit 1
  stamp "vae + evaluator"
  $T vae --run $R --max-seconds $VAE_S --no-progress > $R/vae.log 2>&1 &
  $T evaluator --run $R --max-seconds $EVAL_S --no-progress > $R/evaluator.log 2>&1 &
  wait
  grep -v Warning $R/vae.log $R/evaluator.log | grep -v "step [0-9]*[1-9]00 loss"
  cp $R/export/vae.safetensors $R/export/evaluator.safetensors $OUT/ 2>/dev/null
  stamp "unets"
  $T unet --run $R --kind vp --max-seconds $UNET_S --text-encoder .minilm --no-progress > $R/vp.log 2>&1 &
  P1=$!
  $T unet --run $R --kind flow --max-seconds $UNET_S --text-encoder .minilm --no-progress > $R/flow.log 2>&1 &
  P2=$!
  ( while sleep 20; do cp $R/export/unet-*.safetensors $OUT/ 2>/dev/null; done ) &
  P3=$!
  wait $P1 $P2
  kill $P3
  cp $R/export/unet-*.safetensors $OUT/ 2>/dev/null
  grep -v Warning $R/vp.log $R/flow.log | grep -v "step [0-9]*[1-9]00 loss"
  stamp samples
  $T samples --run $R --text-encoder .minilm --out $OUT/samples.png
  stamp done
} 2>&1 | tee $OUT/log.txt
python3 - <<EOF
import json, pathlib
e = pathlib.Path("$R/export")
meta = {p.stem: json.loads(p.read_text()) for p in sorted(e.glob("*.json"))}
pathlib.Path("$OUT/meta.json").write_text(json.dumps(meta, indent=1))
EOF
ls -la $OUT
