"""Each adapter of ``diffusion_lab/compat/`` against the installed library, on tiny inputs: a failure
names the adapter and the library version that broke it, so an upgrade is fixed in one place."""

from __future__ import annotations

import importlib.metadata
import inspect
import random
from contextlib import contextmanager

import pytest
import torch

from tests.test_evaluate import tiny_clip  # noqa: F401  (fixture: a random CLIP folder, offline)


def _version(dist: str) -> str:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "(not installed)"


@contextmanager
def adapter(name: str, dist: str):
    """Any error inside (an assertion too) fails the test naming ``diffusion_lab.compat.<name>`` and ``dist``'s version."""
    try:
        yield
    except Exception as e:  # noqa: BLE001  (the point: whatever the library now raises)
        pytest.fail(
            f"diffusion_lab.compat.{name} no longer works with {dist} {_version(dist)} ({type(e).__name__}: {e}). "
            f"The private API it wraps changed: fix the adapter in diffusion_lab/compat/ (its docstring says what it "
            f"was checked against), or pin {dist}.",
            pytrace=False,
        )


# ---- Lightning ---------------------------------------------------------------------------------
def test_lightning_rng_states_round_trip():
    from diffusion_lab.compat.lightning import collect_rng_states, set_rng_states

    with adapter("lightning.collect_rng_states / set_rng_states", "pytorch-lightning"):
        state = collect_rng_states(include_cuda=False)
        first = (torch.rand(3), random.random())
        set_rng_states(state)
        assert torch.equal(torch.rand(3), first[0]) and random.random() == first[1], "restored states draw other numbers"


def test_lightning_trainer_timer_and_loop_internals():
    import pytorch_lightning as pl
    from pytorch_lightning.callbacks import Timer

    from diffusion_lab.compat.lightning import attached_trainer, batches_done_this_epoch, timer_limit_seconds

    class Tiny(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer, self.seen = torch.nn.Linear(2, 1), []

        def training_step(self, batch, batch_idx):
            return self.layer(batch[0]).sum()

        def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
            self.seen.append(batches_done_this_epoch(self.trainer))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Tiny()
    with adapter("lightning.attached_trainer", "pytorch-lightning"):
        assert attached_trainer(module) is None
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(6, 2)), batch_size=2)
    trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, data)
    with adapter("lightning.attached_trainer", "pytorch-lightning"):
        assert attached_trainer(module) is trainer
    with adapter("lightning.batches_done_this_epoch", "pytorch-lightning"):
        # ModelCheckpoint saves (and the datamodule counts) at a batch's end: that batch is done
        assert module.seen == [1, 2, 3], f"batches done at each batch end: {module.seen}, expected [1, 2, 3]"
    with adapter("lightning.timer_limit_seconds", "pytorch-lightning"):
        assert timer_limit_seconds(Timer(duration="00:00:02:30")) == 150.0
        assert timer_limit_seconds(Timer()) is None


def test_lightning_ddp_process_observer_is_swapped_and_restored():
    from pytorch_lightning.strategies.launchers import subprocess_script

    from diffusion_lab.compat.lightning import ddp_process_observer

    with adapter("lightning.ddp_process_observer", "pytorch-lightning"):
        original = subprocess_script._launch_process_observer
        assert "_launch_process_observer" in inspect.getsource(subprocess_script._SubprocessScriptLauncher), "the launcher no longer calls it"

        def watch(procs):
            return None

        with ddp_process_observer(watch):
            assert subprocess_script._launch_process_observer is watch
        assert subprocess_script._launch_process_observer is original


def test_lightning_rich_progress_bar_private_hooks():
    from pytorch_lightning.callbacks import RichProgressBar

    from diffusion_lab.compat.lightning import RichProgressBarHooks

    expected = {
        "_get_train_description": ["self", "current_epoch"],
        "_initialize_train_progress_bar_id": ["self"],
        "_update": ["self", "progress_bar_id", "current", "visible", "hard"],
        "_update_metrics": ["self", "trainer", "pl_module"],
    }
    with adapter("lightning.RichProgressBarHooks", "pytorch-lightning"):
        for name, params in expected.items():
            assert list(inspect.signature(getattr(RichProgressBar, name)).parameters) == params, f"RichProgressBar.{name} changed"
        assert "_get_train_description" in inspect.getsource(RichProgressBar), "RichProgressBar no longer asks _get_train_description"

        class Bar(RichProgressBarHooks):
            def train_description(self, current_epoch: int) -> str:
                return f"custom {current_epoch}"

        assert Bar()._get_train_description(3) == "custom 3"


# ---- litdata -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_litdata(tmp_path_factory):
    """8 items ``{"i": i}`` in two chunks, written in this process (litdata's ``Cache`` writer, which
    ``optimize`` runs in its workers)."""
    pytest.importorskip("litdata")
    from litdata.streaming import Cache

    out = tmp_path_factory.mktemp("litdata") / "ints"
    cache = Cache(str(out), chunk_size=4)
    for i in range(8):
        cache[i] = {"i": i}
    cache.done()
    cache.merge()
    return out


def test_litdata_allow_http_endpoints():
    pytest.importorskip("litdata")
    from litdata.streaming import downloader

    from diffusion_lab.compat.litdata import allow_http_endpoints

    with adapter("litdata.allow_http_endpoints", "litdata"):
        options = downloader._OBSTORE_CLIENT_OPTIONS
        saved = dict(options)
        try:
            allow_http_endpoints()
            assert options["allow_http"] is True
        finally:
            options.clear()
            options.update(saved)
        assert "client_options=_OBSTORE_CLIENT_OPTIONS" in inspect.getsource(downloader), "litdata's stores no longer read the options dict"


def test_litdata_whole_chunks_and_public_resume_state(tiny_litdata):
    from litdata import StreamingDataLoader, StreamingDataset

    from diffusion_lab.compat.litdata import read_whole_chunks

    with adapter("litdata.read_whole_chunks", "litdata"):
        dataset = StreamingDataset(str(tiny_litdata), shuffle=False)
        assert hasattr(dataset, "_on_demand_bytes"), "StreamingDataset has no _on_demand_bytes"
        read_whole_chunks(dataset)
        assert dataset._on_demand_bytes is False and dataset[5]["i"] == 5
    # public API, relied on by ShardLoader: state_dict() taken mid-epoch (a copy of its dicts, since
    # litdata updates them in place), loaded into a fresh loader, continues after that batch
    with adapter("litdata StreamingDataLoader.state_dict / load_state_dict mid-epoch", "litdata"):
        loader = StreamingDataLoader(StreamingDataset(str(tiny_litdata), shuffle=False), batch_size=2, num_workers=0)
        batches = iter(loader)
        next(batches)
        state = {k: dict(v) if isinstance(v, dict) else v for k, v in loader.state_dict().items()}
        fresh = StreamingDataLoader(StreamingDataset(str(tiny_litdata), shuffle=False), batch_size=2, num_workers=0)
        fresh.load_state_dict(state)
        rest = [int(i) for batch in fresh for i in batch["i"]]
        assert rest == [2, 3, 4, 5, 6, 7], f"resumed after one batch of 2, litdata yielded {rest}"
        assert fresh.restore is False, "litdata's restore flag is not cleared at the end of the resumed epoch"


# ---- torchmetrics --------------------------------------------------------------------------------
def test_torchmetrics_clip_scores_per_image(tiny_clip):  # noqa: F811
    from diffusion_lab.compat.torchmetrics import clip_scores_per_image
    from diffusion_lab.metrics.clip import _TensorCLIP
    from diffusion_lab.metrics.features import load_clip

    model, processor = load_clip(str(tiny_clip))
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    prompts = ["a red square", "two cats"]
    with adapter("torchmetrics.clip_scores_per_image", "torchmetrics"), torch.no_grad():
        scores = clip_scores_per_image(images, prompts, _TensorCLIP(model), processor)
        tensors = _TensorCLIP(model)
        img = tensors.get_image_features(**processor(images=list(images), return_tensors="pt"))
        txt = tensors.get_text_features(**processor(text=prompts, return_tensors="pt", padding=True))
        expected = 100 * torch.nn.functional.cosine_similarity(img, txt, dim=-1)
        assert scores.shape == (2,) and torch.allclose(scores, expected, atol=1e-4), f"{scores} != 100 cos = {expected}"


# ---- diffusers -----------------------------------------------------------------------------------
def test_diffusers_flux_and_qwen_packing():
    from diffusion_lab.compat import diffusers as compat

    x = torch.randn(2, 3, 4, 6)
    with adapter("diffusers.flux_pack_latents / flux_unpack_latents", "diffusers"):
        tokens = compat.flux_pack_latents(x, 2, 3, 4, 6)
        assert tokens.shape == (2, 6, 12) and torch.equal(tokens[:, 0], x[:, :, :2, :2].reshape(2, 12))
        assert torch.equal(compat.flux_unpack_latents(tokens, 4, 6, 1), x)
    with adapter("diffusers.flux_latent_image_ids", "diffusers"):
        ids = compat.flux_latent_image_ids(1, 2, 3, "cpu", torch.float32)
        assert ids.tolist() == [[0, r, c] for r in range(2) for c in range(3)], ids
    with adapter("diffusers.qwen_pack_latents / qwen_unpack_latents", "diffusers"):
        tokens = compat.qwen_pack_latents(x, 2, 3, 4, 6)
        assert tokens.shape == (2, 6, 12) and torch.equal(tokens[:, 0], x[:, :, :2, :2].reshape(2, 12))
        assert torch.equal(compat.qwen_unpack_latents(tokens, 4, 6, 1)[:, :, 0], x)


def test_diffusers_flux2_helpers():
    from diffusers import Flux2KleinPipeline

    from diffusion_lab.compat import diffusers as compat

    x = torch.randn(2, 3, 4, 6)
    with adapter("diffusers.flux2_patchify_latents / flux2_unpatchify_latents", "diffusers"):
        patches = compat.flux2_patchify_latents(x)
        assert patches.shape == (2, 12, 2, 3) and torch.equal(compat.flux2_unpatchify_latents(patches), x)
    with adapter("diffusers.flux2_pack_latents", "diffusers"):
        # the family unpacks by the transpose: tokens [N, hw, C] in row-major order
        assert torch.equal(compat.flux2_pack_latents(x), x.flatten(2).transpose(1, 2))
    with adapter("diffusers.flux2_text_ids / flux2_latent_ids", "diffusers"):
        assert compat.flux2_text_ids(torch.zeros(2, 5, 8)).shape == (2, 5, 4)
        assert compat.flux2_latent_ids(x).shape == (2, 24, 4)
    with adapter("diffusers.flux2_prompt_embeds", "diffusers"):
        params = inspect.signature(Flux2KleinPipeline._get_qwen3_prompt_embeds).parameters
        assert list(params)[:3] == ["text_encoder", "tokenizer", "prompt"] and {"max_sequence_length", "hidden_states_layers"} <= set(params), list(params)


@pytest.fixture(scope="module")
def tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8,), layers_per_block=1,
                       down_block_types=("DownBlock2D",), up_block_types=("UpBlock2D",), norm_num_groups=4)  # fmt: skip


def test_diffusers_model_attributes(tiny_unet, tmp_path):
    from diffusers import FluxTransformer2DModel, UNet2DModel

    from diffusion_lab.compat import diffusers as compat

    with adapter("diffusers.supports_gradient_checkpointing", "diffusers"):
        assert compat.supports_gradient_checkpointing(tiny_unet) and not compat.supports_gradient_checkpointing(torch.nn.Linear(1, 1))
    with adapter("diffusers.declared_no_split_modules", "diffusers"):
        assert "FluxTransformerBlock" in compat.declared_no_split_modules(FluxTransformer2DModel), compat.declared_no_split_modules(FluxTransformer2DModel)
        assert compat.declared_no_split_modules(torch.nn.Linear(1, 1)) == ()
    with adapter("diffusers.pretrained_name", "diffusers"):
        tiny_unet.save_pretrained(tmp_path / "unet")
        assert compat.pretrained_name(UNet2DModel.from_pretrained(tmp_path / "unet").config) == str(tmp_path / "unet")
        assert compat.pretrained_name(tiny_unet.config) == ""


def test_diffusers_forget_peft_config():
    from diffusers import FluxTransformer2DModel
    from diffusers.utils import recurse_remove_peft_layers
    from peft import LoraConfig

    from diffusion_lab.compat.diffusers import forget_peft_config

    model = FluxTransformer2DModel(patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
                                   joint_attention_dim=8, pooled_projection_dim=8, axes_dims_rope=(2, 2, 4))  # fmt: skip
    with adapter("diffusers.forget_peft_config", "diffusers"):
        model.add_adapter(LoraConfig(r=2, target_modules=["to_q"]))
        assert model._hf_peft_config_loaded is True, "add_adapter no longer sets _hf_peft_config_loaded"
        model = recurse_remove_peft_layers(model)
        del model.peft_config
        forget_peft_config(model)
        with pytest.raises(ValueError, match="No adapter loaded"):
            model.active_adapters()


# ---- torch ---------------------------------------------------------------------------------------
def test_torch_dispatch_mode_sees_aten_ops():
    from diffusion_lab.compat.torch import TorchDispatchMode

    class Seen(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    with adapter("torch.TorchDispatchMode", "torch"):
        with Seen() as seen:
            out = torch.ones(2) + 1
        assert torch.equal(out, torch.full((2,), 2.0)) and "aten.add.Tensor" in seen.ops, seen.ops
