"""Two "nodes" on this machine: README's torchrun command (one per node, rendezvous on 127.0.0.1)
started twice with one process each, for DDP and FSDP2. Both ranks train into one run folder
(rank 0 writes it), and a run resumed the same way from a mid-run checkpoint ends bit-identical."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.multiproc import PROBE, REPO, _cli, free_port, load_probes, tiny

STEPS = 6
RUN = ["logger=csv", "trainer.num_nodes=2", "trainer.devices=1", f"trainer.max_steps={STEPS}", "trainer.val_check_interval=3",
       "callbacks.model_checkpoint.every_n_train_steps=3", "callbacks.sample_grid.every_n_steps=3", *PROBE]


def two_nodes(args: list[str], log_dir: Path, timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """README's multi-node torchrun line, once per node, both on this machine (``$HEAD_NODE`` = 127.0.0.1)."""
    port = free_port()
    cmd, env = _cli(args, log_dir)
    train_args = cmd[cmd.index("diffusion_lab.train") + 1 :]
    procs = []
    for node in (0, 1):
        torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc-per-node=1", "--rdzv-backend=c10d",
                    f"--rdzv-endpoint=127.0.0.1:{port}", "-m", "diffusion_lab.train", *train_args]
        log = open(log_dir / f"node{node}.log", "w")
        procs.append((subprocess.Popen(torchrun, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT), log))
    results = []
    for proc, log in procs:
        try:
            proc.wait(timeout=timeout)
        finally:
            if proc.poll() is None:
                proc.kill()
            log.close()
        results.append(subprocess.CompletedProcess(proc.args, proc.returncode, Path(log.name).read_text(), ""))
    return results


@pytest.mark.slow  # minutes of multi-process work: make test-slow
@pytest.mark.parametrize("trainer", ["ddp_cpu", "fsdp_cpu"])
def test_two_nodes_train_into_one_folder_and_resume_bit_identical(trainer, tmp_path):
    unbroken = tmp_path / "unbroken"
    for node in two_nodes(tiny(f"trainer={trainer}", *RUN, f"hydra.run.dir={unbroken}"), tmp_path):
        assert node.returncode == 0, node.stdout[-3000:]
    r0, r1 = load_probes(unbroken)
    assert (r0["rank"], r1["rank"], r0["world_size"], r0["global_step"]) == (0, 1, 2, STEPS)
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])
    if trainer == "fsdp_cpu":  # each node holds half of the weights
        assert sum(r0["local_numel"].values()) == pytest.approx(sum(r0["numel"].values()) / 2, rel=0.02)
    # one run folder, written once: rank 0's files, plus rank 1's own log beside them
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["unbroken"]
    assert sorted(p.name for p in (unbroken / "checkpoints").iterdir()) == ["last.ckpt", "step_000003.ckpt", "step_000006.ckpt"]
    assert (unbroken / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (unbroken / "train.log").is_file() and (unbroken / "train_rank1.log").is_file()
    assert "GLOBAL_RANK: 1" in (unbroken / "train_rank1.log").read_text() + (tmp_path / "node0.log").read_text() + (tmp_path / "node1.log").read_text()

    resumed = tmp_path / "resumed"
    ckpt = unbroken / "checkpoints" / "step_000003.ckpt"
    for node in two_nodes(tiny(f"trainer={trainer}", *RUN, f"ckpt_path={ckpt}", f"hydra.run.dir={resumed}"), tmp_path):
        assert node.returncode == 0, node.stdout[-3000:]
    for a, b in zip(load_probes(unbroken), load_probes(resumed), strict=True):
        assert b["global_step"] == STEPS
        assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"]), (trainer, a["rank"])
        assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"], strict=True))
