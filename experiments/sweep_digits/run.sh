#!/usr/bin/env bash
# The sweep behind experiments/sweep_digits/README.md: prediction type x beta schedule on digits,
# 6 short CPU runs (tiny UNet, 300 steps each), offline W&B, then the table and plots.
#   bash experiments/sweep_digits/run.sh [sweep dir]
set -euo pipefail
cd "$(dirname "$0")/../.."
SWEEP=${1:-outputs/sweep_digits}
export HF_HUB_OFFLINE=1 WANDB_SILENT=true OMP_NUM_THREADS=1  # one thread: faster on 2 shared cores
.venv/bin/python -m diffusion_lab.train sweep=prediction_x_schedule experiment=ddpm_digits \
  task_name=sweep_digits model/unet=tiny data.resolution=8 data.batch_size=32 \
  model.optimizer.lr=2e-3 model.lr_scheduler.num_warmup_steps=30 \
  trainer.max_steps=300 trainer.val_check_interval=50 trainer.log_every_n_steps=10 \
  callbacks.model_checkpoint.every_n_train_steps=300 callbacks.sample_grid.every_n_steps=0 \
  callbacks.progress_bar=null logger=wandb "hydra.sweep.dir=$SWEEP"
.venv/bin/python experiments/sweep_digits/report.py --sweep "$SWEEP"
