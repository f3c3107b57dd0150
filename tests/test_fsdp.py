"""FSDP2 (``trainer=fsdp_cpu``) with real processes on CPU (gloo): each rank holds half of the
trained weights, the run follows the 2-process DDP run of the same seed and data, EMA is sharded,
checkpoints are sharded folders that resume bit-exactly after a SIGKILL and on another world size,
and the export is one ordinary diffusers folder."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.multiprocessing as mp

from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError

from tests.multiproc import CURVE, PROBE, STEPS, free_port, kill_all_ranks_after_step, load_probes, run_cli, tiny
from tests.wandb_offline import find_offline_runs

# val/loss of the FSDP run vs the DDP run, relative, at every check. Both reduce the same fp32
# gradients of the same images and noise (a sum of 2 in either order is the same number), so the
# curves agree to float rounding; measured: identical to 1e-6 over 30 steps.
FSDP_VS_DDP_RTOL = 1e-4
FSDP = ["trainer=fsdp_cpu", "logger=csv", *CURVE, *PROBE]


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory) -> Path:
    logs = tmp_path_factory.mktemp("fsdp")
    run_dir = logs / "run"
    proc = run_cli(tiny(*FSDP, f"hydra.run.dir={run_dir}"), logs)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir


def test_each_rank_holds_half_of_the_weights_and_the_ranks_agree(fsdp_run):
    r0, r1 = load_probes(fsdp_run)
    assert (r0["world_size"], r0["global_step"], r1["global_step"]) == (2, STEPS, STEPS)
    for r in (r0, r1):
        held = sum(r["local_numel"].values()) / sum(r["numel"].values())
        assert held == pytest.approx(0.5, abs=0.02), held  # dim-0 shards: an odd row count pads one rank
    # a parameter's shards are disjoint halves (dim 0), the gathered whole is the same on both ranks
    assert all(r0["local_numel"][k] + r1["local_numel"][k] == r0["numel"][k] for k in r0["numel"])
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])
    # EMA is sharded like the weights and has moved away from them
    assert all(r0["ema_is_sharded"]) and all(torch.equal(a, b) for a, b in zip(r0["ema"], r1["ema"]))
    assert any(not torch.equal(e, w) for e, w in zip(r0["ema"], r0["unet"].values()))


def test_fsdp_follows_the_ddp_run_of_the_same_seed(fsdp_run, ddp_run):
    ddp_curve = [v for _, v in find_offline_runs(ddp_run)[0].metric("val/loss")]
    fsdp_curve = pd.read_csv(fsdp_run / "csv" / "metrics.csv")["val/loss"].dropna().tolist()
    assert len(fsdp_curve) == len(ddp_curve) == STEPS // 10
    assert fsdp_curve[-1] < min(0.5, fsdp_curve[0])  # it learned (from ~1.0): not a comparison of flat lines
    assert fsdp_curve == pytest.approx(ddp_curve, rel=FSDP_VS_DDP_RTOL), (fsdp_curve, ddp_curve)
    (ddp,), (fsdp,) = load_probes(ddp_run)[:1], load_probes(fsdp_run)[:1]
    worst = max((ddp["unet"][k] - fsdp["unet"][k]).abs().max().item() for k in ddp["unet"])
    assert worst < 1e-4, worst


def test_checkpoints_are_sharded_folders_and_the_export_is_an_ordinary_pipeline(fsdp_run):
    from diffusers import DDPMPipeline

    ckpts = fsdp_run / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["last.ckpt", "step_000010.ckpt", "step_000020.ckpt", "step_000030.ckpt"]
    last = ckpts / "last.ckpt"
    assert last.is_dir() and (last / ".metadata").is_file() and (last / "meta.pt").is_file()
    assert sorted(p.name for p in last.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]  # one shard per rank
    assert sorted(p.name for p in fsdp_run.iterdir() if "pipeline" in p.name) == ["pipeline"]

    pipe = DDPMPipeline.from_pretrained(fsdp_run / "pipeline")  # plain diffusers, no diffusion_lab
    (probe,) = load_probes(fsdp_run)[:1]
    exported = dict(pipe.unet.named_parameters())
    assert list(exported) == probe["trainable"] or sorted(exported) == probe["trainable"]
    # the export holds the EMA weights, gathered whole from the shards
    names = [n for n, _ in sorted(exported.items(), key=lambda kv: list(probe["numel"]).index(kv[0]))]
    for name, ema in zip(names, probe["ema"], strict=True):
        assert torch.equal(exported[name].detach(), ema), name
    images = pipe(batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert images.shape[0] == 1


def test_sharded_checkpoint_resumes_on_one_process(fsdp_run, tmp_path):
    """A checkpoint written by 2 ranks, resumed by 1 (torch.distributed.checkpoint reshards):
    step, optimizer and EMA carry on, and it trains."""
    run_dir = tmp_path / "one"
    args = tiny(*FSDP, "trainer.devices=1", f"ckpt_path={fsdp_run / 'checkpoints' / 'step_000020.ckpt'}", f"hydra.run.dir={run_dir}")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (probe,) = load_probes(run_dir)
    assert probe["world_size"] == 1 and probe["global_step"] == STEPS
    assert sum(probe["local_numel"].values()) == sum(probe["numel"].values())  # 1 rank holds all of it
    (unbroken,) = load_probes(fsdp_run)[:1]
    # 10 more steps from the same state on other ranks' data split: close to, not equal to, the 2-rank run
    assert max((unbroken["unet"][k] - probe["unet"][k]).abs().max().item() for k in probe["unet"]) < 0.1
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert metrics["step"].max() >= STEPS - 1


def test_sharded_checkpoint_without_fsdp_is_a_clear_error(fsdp_run, train_cfg):
    cfg = train_cfg(f"ckpt_path={fsdp_run / 'checkpoints' / 'last.ckpt'}")
    with pytest.raises(ConfigError, match=r"sharded FSDP checkpoint .* trainer=fsdp / fsdp_cpu .* trainer.devices=1"):
        train(cfg)


def test_half_precision_weights_without_their_autocast_are_refused_before_training(tmp_path):
    """experiment=sd_finetune sets trainer.precision=16-mixed; with trainer=fsdp's bf16 weights that
    would be an fp16 autocast over bf16 weights: one paragraph naming both keys, before any step."""
    proc = run_cli(tiny("trainer=fsdp_cpu", "trainer.strategy.param_dtype=bfloat16", "trainer.precision=32-true", f"hydra.run.dir={tmp_path / 'run'}"), tmp_path)
    assert proc.returncode != 0
    assert "trainer.strategy.param_dtype=bfloat16" in proc.stderr and "set trainer.precision=bf16-mixed" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "run" / "checkpoints").exists()


def test_half_written_sharded_checkpoint_is_refused(tmp_path, train_cfg):
    half = tmp_path / "step_000010.ckpt"
    half.mkdir()
    (half / "__0_0.distcp").write_bytes(b"cut")
    with pytest.raises(ConfigError, match="not a whole sharded checkpoint"):
        train(train_cfg(f"ckpt_path={half}"))


@pytest.mark.slow  # minutes of multi-process work: make test-slow
def test_sigkilled_fsdp_run_resumes_bit_identical(fsdp_run, tmp_path):
    """Both ranks SIGKILLed after step 25 (last checkpoint: step 20, mid-epoch), resumed from it
    with 2 processes to step 30: every rank ends with the unbroken run's weights and EMA, bit for bit."""
    killed = tmp_path / "killed"
    kill_all_ranks_after_step(tiny(*FSDP, f"hydra.run.dir={killed}"), 25, tmp_path)
    ckpt = killed / "checkpoints" / "step_000020.ckpt"
    assert not list(ckpt.parent.glob(".*tmp*"))  # the kill came between saves: nothing half-written
    proc = run_cli(tiny(*FSDP, f"ckpt_path={ckpt}", f"hydra.run.dir={tmp_path / 'resumed'}"), tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    unbroken, resumed = load_probes(fsdp_run), load_probes(tmp_path / "resumed")
    assert [r["global_step"] for r in resumed] == [STEPS, STEPS]
    for a, b in zip(unbroken, resumed, strict=True):
        assert all(torch.equal(a["unet"][k], b["unet"][k]) for k in a["unet"]), a["rank"]
        assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"], strict=True))


@pytest.mark.slow  # minutes of multi-process work: make test-slow
def test_lora_trains_under_fsdp_and_its_export_loads_in_plain_diffusers(tmp_path):
    """The tiny Stable Diffusion LoRA fine-tune on 2 FSDP ranks: the frozen base and the LoRA
    weights are sharded, only the LoRA weights train, and <run>/lora loads into a plain
    StableDiffusionPipeline and changes its images."""
    from diffusers import StableDiffusionPipeline

    from diffusion_lab.testing.tiny import build

    pretrained = build(tmp_path / "tiny_sd")
    run_dir = tmp_path / "run"
    args = ["experiment=sd_finetune_tiny", "adapter=lora", "model.optimizer.lr=1e-2", f"model.pretrained={pretrained}", "trainer=fsdp_cpu",
            "data.batch_size=8", "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
            "callbacks.sample_grid.every_n_steps=0", "callbacks.model_checkpoint.every_n_train_steps=2", *PROBE, f"hydra.run.dir={run_dir}"]
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_probes(run_dir)
    assert r0["trainable"] and all("lora" in k for k in r0["trainable"])
    for r in (r0, r1):
        held = sum(r["local_numel"].values()) / sum(r["numel"].values())
        assert held == pytest.approx(0.5, abs=0.02)
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])

    pipe = StableDiffusionPipeline.from_pretrained(pretrained, safety_checker=None)
    kwargs = dict(prompt="a handwritten digit seven", num_inference_steps=2, output_type="np", height=32, width=32)
    before = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    pipe.load_lora_weights(run_dir / "lora")
    after = pipe(**kwargs, generator=torch.Generator().manual_seed(0)).images
    assert abs(after - before).max() > 1e-4


# ---- every backbone family is wrapped block by block -----------------------------------------------------
def _backbones() -> dict[str, torch.nn.Module]:
    from diffusion_lab.testing import tiny, tiny_mmdit
    from diffusion_lab.components.backbones import dit_transformer
    from diffusers import UNet2DModel

    return {
        "UNet2DModel": UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), norm_num_groups=8,
                                   down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D")),
        "UNet2DConditionModel": tiny.tiny_unet(),
        "DiT": dit_transformer(num_class_embeds=10, sample_size=8, in_channels=1, out_channels=1, patch_size=2, num_layers=2,
                               num_attention_heads=2, attention_head_dim=8, norm_num_groups=8),
        "SD3Transformer2DModel": tiny_mmdit.tiny_sd3_transformer(),
        "FluxTransformer2DModel": tiny_mmdit.tiny_flux_transformer(),
    }


def _shard_every_family(rank: int, port: int, out: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, OffloadPolicy

    from diffusion_lab.components.fsdp import BLOCK_CLASSES, local_fraction, shard_module

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("data_parallel",))
    report = {}
    for name, net in _backbones().items():
        holder = torch.nn.Module()
        holder.net = net
        shard_module(holder, mesh, MixedPrecisionPolicy(), OffloadPolicy())
        blocks = [m for m in net.modules() if type(m).__name__.removeprefix("FSDP") in BLOCK_CLASSES]  # fully_shard renames the class
        report[name] = {"blocks": len(blocks), "wrapped": all(isinstance(m, FSDPModule) for m in blocks), "fraction": local_fraction(net)}
    unknown = torch.nn.Module()
    unknown.net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    try:
        shard_module(unknown, mesh, MixedPrecisionPolicy(), OffloadPolicy())
        report["unknown"] = None
    except ConfigError as e:
        report["unknown"] = str(e)
    if rank == 0:
        torch.save(report, out)
    dist.destroy_process_group()


def test_every_backbone_family_is_sharded_block_by_block(tmp_path):
    out = tmp_path / "report.pt"
    mp.spawn(_shard_every_family, args=(free_port(), str(out)), nprocs=2, join=True)
    report = torch.load(out)
    # a trained module with no block FSDP knows is refused before training, naming the fix
    assert "trainer=fsdp cannot wrap net (Sequential)" in report.pop("unknown")
    assert set(report) == {"UNet2DModel", "UNet2DConditionModel", "DiT", "SD3Transformer2DModel", "FluxTransformer2DModel"}
    for name, r in report.items():
        assert r["blocks"] >= 2 and r["wrapped"], (name, r)
        assert r["fraction"] == pytest.approx(0.5, abs=0.03), (name, r)


@pytest.mark.slow  # minutes of multi-process work: make test-slow
def test_bf16_blocks_with_cpu_offload_train_and_keep_fp32_master_weights(tmp_path):
    """trainer=fsdp's GPU settings on CPU: bf16 weights gathered per block (FSDP's mixed-precision
    policy) under bf16 autocast, shards in host memory (CPUOffloadPolicy); the loss falls and the
    exported weights are fp32."""
    from diffusers import UNet2DModel

    run_dir = tmp_path / "run"
    args = tiny("trainer=fsdp_cpu", "trainer.strategy.param_dtype=bfloat16", "trainer.precision=bf16-mixed", "trainer.strategy.cpu_offload=true", *CURVE[:3],
                "trainer.max_steps=12", "trainer.val_check_interval=6", "callbacks.sample_grid.every_n_steps=6", *PROBE, f"hydra.run.dir={run_dir}")
    proc = run_cli(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r0, r1 = load_probes(run_dir)
    assert all(v.dtype == torch.float32 for v in r0["unet"].values())
    assert all(torch.equal(r0["unet"][k], r1["unet"][k]) for k in r0["unet"])
    losses = pd.read_csv(run_dir / "csv" / "metrics.csv")["val/loss"].dropna().tolist()
    assert len(losses) == 2 and losses[1] < losses[0]
    assert UNet2DModel.from_pretrained(run_dir / "pipeline" / "unet").dtype == torch.float32
