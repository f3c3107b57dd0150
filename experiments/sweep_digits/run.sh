#!/usr/bin/env bash
# The sweep behind experiments/sweep_digits/README.md: prediction type x beta schedule on digits,
# 6 short CPU runs (tiny UNet, 300 steps each), offline W&B, then the table and plots.
#   bash experiments/sweep_digits/run.sh                              # -> outputs/experiments/sweep_digits/<date>_<time>/
#   bash experiments/sweep_digits/run.sh --out experiments/sweep_digits   # the same, and the report refreshes the committed results
# The sweep's jobs always go to a new <run>/sweep/ (under $PROJECT_ROOT, else the current folder,
# like training runs); --out only moves the report (results.json, results.md, curves.png, samples.png).
# Extra arguments after the options are passed on to the training command (e.g. trainer.max_steps=20).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
PYTHON=${PYTHON:-$HERE/../../.venv/bin/python}
RUN="${PROJECT_ROOT:-.}/outputs/experiments/sweep_digits/$(date +%Y-%m-%d_%H-%M-%S)"
OUT=$RUN
if [[ "${1:-}" == "--out" ]]; then
  OUT=${2:?--out needs a folder}
  shift 2
fi
export HF_HUB_OFFLINE=1 WANDB_SILENT=true OMP_NUM_THREADS=1  # one thread: faster on 2 shared cores
"$PYTHON" -m diffusion_lab.train sweep=prediction_x_schedule experiment=ddpm_digits \
  task_name=sweep_digits model/unet=tiny data.resolution=8 data.batch_size=32 \
  model.optimizer.lr=2e-3 model.lr_scheduler.num_warmup_steps=30 \
  trainer.max_steps=300 trainer.val_check_interval=50 trainer.log_every_n_steps=10 \
  callbacks.model_checkpoint.every_n_train_steps=300 callbacks.sample_grid.every_n_steps=0 \
  callbacks.progress_bar=null logger=wandb "hydra.sweep.dir=$RUN/sweep" "$@"
"$PYTHON" "$HERE/report.py" --sweep "$RUN/sweep" --out "$OUT"
echo "sweep: $RUN/sweep"
echo "report: $OUT"
