"""A quantized frozen base (quantization=nf4|int8|int8_torchao|float8) under LoRA, DoRA and LoKr on tiny
SD / SDXL / SD3 / Flux pipelines written by save_pretrained; the export loaded on the unquantized base in
plain diffusers; the refusals; gradient checkpointing (same gradients) and offload_frozen."""

import csv
import importlib.util
import re

import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate

from diffusion_lab.testing import tiny
from diffusion_lab.components.quantization import is_quantized
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_latent import user_error

EXPERIMENTS = {"sd": "sd_finetune_tiny", "sdxl": "sdxl_finetune_tiny", "sd3": "sd3_finetune_tiny", "flux": "flux_finetune_tiny"}
OPTIONS = ("nf4", "int8", "int8_torchao", "float8")
# the quantized layer each option leaves in the backbone (bitsandbytes: module classes; torchao: weight tensor subclasses)
LAYERS = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "int8_torchao": "Int8Tensor", "float8": "Float8Tensor"}
# one family per option in the default suite; the rest of the 4 x 4 matrix is slow-marked
DEFAULT = {"nf4": "sd", "int8": "sdxl", "int8_torchao": "sd3", "float8": "flux"}
FAST = [
    "trainer.max_steps=3",
    "trainer.val_check_interval=3",
    "trainer.limit_val_batches=1",
    "trainer.log_every_n_steps=1",
    "data.batch_size=4",
    "model.preview_steps=2",
    "callbacks.sample_grid=null",
    "callbacks.noising_strip=null",
    "callbacks.progress_bar=null",
    "callbacks.model_checkpoint.every_n_train_steps=3",
]
# |loss(quantized base) - loss(unquantized base)| over the 3 steps of the same seed and data, measured on this
# stack (tiny random pipelines, fp32 compute): nf4 <= 0.006, bitsandbytes int8 <= 0.004, torchao int8/float8 <= 0.003
# on a loss of ~1.1 (SD/SDXL) to ~2 (SD3/Flux). A broken quantized layer (wrong scale, wrong dtype, zeros) moves it by
# far more than 0.05; a run that never quantized has a gap of exactly 0 (asserted apart, via the layer types).
LOSS_TOLERANCE = 0.05
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny random pipeline folders, built on first use (``python -m diffusion_lab.tiny_sd DIR --kind ...``)."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def folder(kind: str) -> str:
        if kind not in built:
            built[kind] = str(tiny.build(root / f"tiny_{kind}", kind=kind))
        return built[kind]

    return folder


@pytest.fixture(scope="module")
def baselines(folders, tmp_path_factory):
    """Losses of LoRA on the unquantized base, per family (computed once)."""
    done = {}

    def baseline(kind: str) -> list[float]:
        if kind not in done:
            out = tmp_path_factory.mktemp(f"base_{kind}") / "run"
            fit(out, kind, folders(kind))
            done[kind] = losses(out)
        return done[kind]

    return baseline


def fit(out, kind, pretrained, *overrides):
    cfg = compose_cfg("train", [f"experiment={EXPERIMENTS[kind]}", f"model.pretrained={pretrained}", "adapter=lora", *FAST, *overrides], out)
    _, objects = train(cfg)
    return objects


def losses(run_dir) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]


def quantized_layers(model: torch.nn.Module) -> set[str]:
    """Class names of the quantized linear layers / weights in ``model``."""
    names = {type(m).__name__ for m in model.modules()} | {type(m.weight).__name__ for m in model.modules() if hasattr(m, "weight")}
    return names & set(LAYERS.values())


MATRIX = [
    pytest.param(option, kind, marks=() if DEFAULT[option] == kind else pytest.mark.slow, id=f"{option}-{kind}")
    for option in OPTIONS
    for kind in EXPERIMENTS
]


@pytest.mark.parametrize("option,kind", MATRIX)
def test_lora_trains_on_each_quantized_base_near_the_unquantized_loss(option, kind, folders, baselines, tmp_path):
    objects = fit(tmp_path / "run", kind, folders(kind), f"quantization={option}")
    module = objects["model"]
    assert objects["trainer"].global_step == 3
    # the backbone and the frozen text encoders hold the option's quantized layers; the LoRA trains in fp32
    assert is_quantized(module.base_backbone) and quantized_layers(module.base_backbone) == {LAYERS[option]}
    assert all(is_quantized(e) and quantized_layers(e) == {LAYERS[option]} for e in module.conditioner.encoders)
    trained = [p for p in module.parameters() if p.requires_grad]
    assert trained and all(p.dtype == torch.float32 for p in trained)
    quantized, base = losses(tmp_path / "run"), baselines(kind)
    assert len(quantized) == 3 and all(loss == loss for loss in quantized)
    gap = max(abs(q - b) for q, b in zip(quantized, base))
    assert 0 < gap < LOSS_TOLERANCE, (quantized, base)


def test_dora_trains_on_a_quantized_base(folders, tmp_path):
    """DoRA on torchao int8 (the pair peft's layers take; the others are refused below; LoKr on
    bitsandbytes int8 is the export test below)."""
    objects = fit(tmp_path / "run", "sd", folders("sd"), "quantization=int8_torchao", "adapter=dora", "adapter.export_fused=false")
    assert objects["trainer"].global_step == 3 and quantized_layers(objects["model"].base_backbone) == {LAYERS["int8_torchao"]}
    assert all(loss == loss for loss in losses(tmp_path / "run"))


def test_lokr_export_on_a_quantized_base_loads_on_the_unquantized_base_and_changes_it(folders, tmp_path):
    """LoKr on bitsandbytes int8: the export writes the adapter without touching the quantized base (diffusers'
    save_lora_adapter would re-cast it); diffusers' UNet loader and peft read it on the unquantized base."""
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import load_file

    objects = fit(tmp_path / "run", "sd", folders("sd"), "quantization=int8", "adapter=lokr", "adapter.export_fused=false", "model.optimizer.lr=0.05")
    unet = objects["model"].base_backbone
    assert quantized_layers(unet) == {LAYERS["int8"]}
    folder = tmp_path / "run" / "lokr"
    saved = load_file(folder / "pytorch_lora_weights.safetensors")
    assert saved.keys() == get_peft_model_state_dict(unet).keys() and any("lokr_w1" in k for k in saved)
    assert all(v.dtype == torch.float32 for v in saved.values())  # the adapter (EMA weights here), not the int8 base

    pipe = StableDiffusionPipeline.from_pretrained(folders("sd"), safety_checker=None)
    assert not is_quantized(pipe.unet)

    def generate():
        return pipe(PROMPT, num_inference_steps=3, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = generate()
    pipe.unet.load_lora_adapter(str(folder), prefix=None, weight_name="pytorch_lora_weights.safetensors")
    after = generate()
    assert abs(after - before).max() > 1e-3
    # peft's own folder gives the same UNet
    pipe = StableDiffusionPipeline.from_pretrained(folders("sd"), safety_checker=None)
    pipe.unet = PeftModel.from_pretrained(pipe.unet, str(folder / "unet")).merge_and_unload()
    assert abs(generate() - after).max() < 1e-4


def test_quanto_backend_trains(folders, tmp_path):
    objects = fit(tmp_path / "run", "sd", folders("sd"), "quantization=float8", "quantization.backend=quanto")
    assert objects["trainer"].global_step == 3
    assert {type(m).__name__ for m in objects["model"].base_backbone.modules()} & {"QLinear"}


def test_qlora_export_loads_on_the_unquantized_base_and_changes_it(folders, tmp_path):
    objects = fit(tmp_path / "run", "sd", folders("sd"), "quantization=nf4", "adapter.train_text_encoder=true", "model.optimizer.lr=1e-2")
    assert is_quantized(objects["model"].base_backbone)
    pipe = StableDiffusionPipeline.from_pretrained(folders("sd"), safety_checker=None)
    assert not any(is_quantized(m) for m in (pipe.unet, pipe.text_encoder))

    def generate():
        return pipe(PROMPT, num_inference_steps=3, height=32, width=32, output_type="np", generator=torch.Generator().manual_seed(0)).images

    before = generate()
    pipe.load_lora_weights(str(tmp_path / "run" / "lora"))
    after = generate()
    assert abs(after - before).max() > 1e-3


# ---- refusals, before training ---------------------------------------------------------------------
def compose(tmp_path, kind, pretrained, *overrides):
    return compose_cfg("train", [f"experiment={EXPERIMENTS[kind]}", f"model.pretrained={pretrained}", *FAST, *overrides], tmp_path / "run")


def test_full_finetuning_on_a_quantized_base_is_refused(folders, tmp_path):
    cfg = compose(tmp_path, "sd", folders("sd"), "quantization=int8_torchao")
    with pytest.raises(Exception) as excinfo:
        train(cfg)
    assert isinstance(user_error(excinfo), ConfigError)
    assert re.search(r"quantization=int8_torchao with adapter=none.*adapter=lora", str(user_error(excinfo)))
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["backbone=sd_tiny", "data.resolution=32"], r"backbone.*built in-process.*quantization=none"),
        (["adapter=lokr", "adapter.export_fused=false", "quantization=nf4"], r"adapter=lokr cannot train on quantization=nf4"),
        (["adapter=dora", "quantization=int8"], r"adapter=dora cannot train on quantization=int8"),
        (["adapter.export_fused=true"], r"adapter.export_fused=false"),
        (["text_encoder.trainable=true"], r"text_encoder.trainable=true with quantization=.*quantization.text_encoders=false"),
        (["model.group_offload=block_level"], r"model.group_offload=block_level.*does not train"),
    ],
)
def test_what_cannot_train_on_a_quantized_base_is_a_config_error(overrides, match, folders, tmp_path):
    cfg = compose(tmp_path, "sd", folders("sd"), "adapter=lora", "quantization=int8_torchao", *overrides)
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    assert isinstance(user_error(excinfo), ConfigError) and re.search(match, str(user_error(excinfo))), user_error(excinfo)


def test_a_missing_backend_says_what_to_pip_install(folders, tmp_path, monkeypatch):
    """The import machinery itself reports torchao as absent (as on a machine without it)."""
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("torchao") else find_spec(name, *a))
    cfg = compose(tmp_path, "sd", folders("sd"), "adapter=lora", "quantization=float8")
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    assert isinstance(user_error(excinfo), ConfigError)
    assert re.search(r"quantization=float8 .* torchao, which is not installed.*pip install 'torchao", str(user_error(excinfo)))


# ---- gradient checkpointing and offload -----------------------------------------------------------------
def gradients(cfg) -> dict[str, torch.Tensor]:
    """Gradients of one training loss (fixed seed) of the module ``cfg`` builds."""
    torch.manual_seed(0)
    module = instantiate(cfg.model)
    datamodule = instantiate(cfg.data.datamodule)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    torch.manual_seed(1)
    module.diffusion_loss(batch, train=True).backward()
    return {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    "family",
    [
        pytest.param(["model=pixel_ddpm", "backbone=tiny"], id="pixel-unet2d"),
        pytest.param(["experiment=dit_digits"], id="dit"),
        pytest.param("flux", id="flux"),
    ],
)
def test_gradient_checkpointing_gives_the_same_gradients(family, folders, tmp_path):
    if family == "flux":
        family = [f"experiment={EXPERIMENTS['flux']}", f"model.pretrained={folders('flux')}", "adapter=lora"]
    base = [*family, "data.batch_size=2", "model.caption_dropout=0.0"] if "flux" in str(family) else [*family, "data.batch_size=2"]
    plain = gradients(compose_cfg("train", base, tmp_path / "a"))
    checkpointed_cfg = compose_cfg("train", [*base, "model.gradient_checkpointing=true"], tmp_path / "b")
    checkpointed = gradients(checkpointed_cfg)
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-4, atol=1e-6, msg=name)
    assert instantiate(checkpointed_cfg.model).base_backbone.is_gradient_checkpointing


@pytest.mark.parametrize("cache", [False, True])
def test_offload_frozen_trains_with_the_frozen_parts_on_the_cpu(cache, folders, tmp_path):
    objects = fit(tmp_path / "run", "sd", folders("sd"), "model.offload_frozen=true", f"model.cache={str(cache).lower()}")
    module = objects["model"]
    assert objects["trainer"].global_step == 3 and all(loss == loss for loss in losses(tmp_path / "run"))
    module.to("meta")  # a move the frozen parts skip: they stay on the CPU, the backbone goes
    assert all(p.device.type == "cpu" for p in [*module.codec.parameters(), *module.conditioner.parameters()])
    assert all(p.device.type == "meta" for p in module.base_backbone.parameters() if p.requires_grad)
    assert "codec.vae.encoder.conv_in.weight" in module.state_dict()  # still registered: checkpoints hold them


@pytest.mark.parametrize("model", ["pixel_ddpm", "autoencoder"])
def test_quantization_of_a_family_without_a_pretrained_base_is_refused(model, train_cfg):
    """A pixel model or the autoencoder, trained from scratch, has no frozen base: quantization= would
    silently do nothing. Refused before anything is built."""
    from diffusion_lab.train import train

    with pytest.raises(ConfigError, match=rf"quantization=nf4 .* model={model} has no such base"):
        train(train_cfg(f"model={model}", "quantization=nf4", "trainer=cpu", "logger=csv", tiny=False))
