"""Latent SD parts: tokenizer files, VAE codec factors, freezing, LoRA dtypes, instantiate-time checks, errors."""

import pytest
import torch
from hydra.utils import instantiate
from transformers import CLIPTokenizer

from diffusion_lab.testing import tiny
from diffusion_lab.components.pretrained import from_pretrained, load_scheduler
from diffusion_lab.components.vae import VAECodec
from diffusion_lab.utils.errors import ConfigError, DiffusionLabError

from tests.conftest import compose_cfg

GROUPS = ["model=latent_sd", "vae=tiny", "text_encoder=tiny", "backbone=sd_tiny", "process=vp_sd", "data=digits_captioned", "logger=csv"]


def user_error(excinfo) -> DiffusionLabError:
    """The DiffusionLabError behind a hydra InstantiationException."""
    e = excinfo.value
    while e is not None and not isinstance(e, DiffusionLabError):
        e = e.__cause__
    assert e is not None, f"no DiffusionLabError behind {excinfo.value!r}"
    return e


def test_tiny_pipeline_tokenizer_is_a_real_clip_tokenizer(tmp_path):
    out = tiny.build(tmp_path / "sd")
    from_folder = CLIPTokenizer.from_pretrained(out / "tokenizer")
    from_vocab = CLIPTokenizer(vocab=str(out / "tokenizer" / "vocab.json"), merges=str(out / "tokenizer" / "merges.txt"))
    text = "A handwritten digit SEVEN, with wings!"
    assert from_folder(text).input_ids == from_vocab(text).input_ids
    tokens = from_folder.convert_ids_to_tokens(from_folder("a handwritten digit seven").input_ids)
    assert tokens == ["<|startoftext|>", "a</w>", "handwritten</w>", "digit</w>", "seven</w>", "<|endoftext|>"]
    assert from_folder.model_max_length == 77
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (out / sub).is_dir()


def test_codec_reads_scaling_and_shift_from_the_vae_config():
    vae = tiny.tiny_vae(scaling_factor=0.5, shift_factor=0.1)
    codec = VAECodec(vae, sample_posterior=False)
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode(x)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mode()
        torch.testing.assert_close(z, (mean - 0.1) * 0.5)
        torch.testing.assert_close(codec.decode(z), vae.decode(z / 0.5 + 0.1).sample)
    assert codec.downsample_factor == 2 and codec.latent_channels == 4
    # a posterior sample uses the generator: same seed, same latents; differs from the mean
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    m = codec.moments(x)
    torch.testing.assert_close(codec.latents(m, True, g()), codec.latents(m, True, g()))
    assert not torch.allclose(codec.latents(m, True, g()), z)


def test_frozen_parts_stay_frozen_and_in_eval_mode(tmp_path):
    model = instantiate(compose_cfg("train", GROUPS, tmp_path).model)
    model.train()
    assert model.backbone.training and not model.codec.vae.training and not model.conditioner.text_encoder.training
    trainable = {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"backbone"}
    assert all(p.requires_grad for p in model.backbone.parameters())
    hp = dict(model.hparams)
    assert "codec" not in hp and "conditioner" not in hp and hp["resolution"] == 32


def test_text_encoder_trainable_switch(tmp_path):
    model = instantiate(compose_cfg("train", GROUPS + ["text_encoder.trainable=true"], tmp_path).model)
    model.train()
    assert model.conditioner.text_encoder.training
    assert {n.split(".")[0] for n, p in model.named_parameters() if p.requires_grad} == {"backbone", "conditioner"}


def test_lora_trains_only_fp32_adapters_on_a_half_precision_base(tmp_path):
    cfg = compose_cfg("train", GROUPS + ["adapter=lora", "adapter.base_dtype=bfloat16", "adapter.train_text_encoder=true", "adapter.rank=2"], tmp_path)
    model = instantiate(cfg.model)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n, _ in trainable)
    assert all(p.dtype == torch.float32 for _, p in trainable)  # fp16 loss scaling can unscale these
    assert {n.split(".")[0] for n, _ in trainable} == {"backbone", "conditioner"}
    frozen_unet = [p for n, p in model.backbone.named_parameters() if "lora_" not in n]
    assert all(p.dtype == torch.bfloat16 for p in frozen_unet)
    # rank 2 on the UNet's q/k/v/out projections
    assert all(p.shape[0] == 2 for n, p in trainable if "backbone" in n and "lora_A" in n)


@pytest.mark.parametrize(
    "override, keys",
    [
        ("backbone.in_channels=8", ["backbone.in_channels=8", "vae.latent_channels=4"]),
        ("backbone.cross_attention_dim=48", ["backbone.cross_attention_dim=48", "text_encoder.hidden_size=32"]),
        ("data.resolution=30", ["data.resolution=30", "vae", "backbone.down_block_types", "data.resolution=32"]),
        ("data=digits", ["data.channels=1", "vae.in_channels=3"]),
    ],
)
def test_shape_mismatch_fails_at_instantiate_naming_both_keys(tmp_path, override, keys):
    cfg = compose_cfg("train", GROUPS + [override], tmp_path)
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.model)
    err = user_error(excinfo)
    assert isinstance(err, ConfigError)
    for key in keys:
        assert key in str(err)


def test_pretrained_errors_say_what_to_do(tmp_path):
    with pytest.raises(ConfigError, match=r"model.pretrained, which is not set.*tiny_sd.*vae=tiny"):
        from_pretrained("diffusers.AutoencoderKL", None, subfolder="vae")
    with pytest.raises(ConfigError, match="is not a folder"):
        from_pretrained("diffusers.AutoencoderKL", str(tmp_path / "nope"), subfolder="vae")
    (tmp_path / "half" / "unet").mkdir(parents=True)
    with pytest.raises(ConfigError, match=r"has no vae/ folder \(found: \['unet'\]\).*vae=tiny"):
        from_pretrained("diffusers.AutoencoderKL", str(tmp_path / "half"), subfolder="vae")
    # a hub id with no network (tests run with HF_HUB_OFFLINE=1): how to point at a local folder
    with pytest.raises(ConfigError, match=r"hf download some-org/missing-model --local-dir DIR.*model.pretrained=DIR") as err:
        from_pretrained("diffusers.AutoencoderKL", "some-org/missing-model", subfolder="vae", local_files_only=True)
    assert ".." not in str(err.value)  # the library's sentence ends in a period of its own (#29)
    with pytest.raises(ConfigError, match="hf download"):
        load_scheduler("some-org/missing-model", local_files_only=True)


def test_scheduler_and_prediction_type_come_from_the_pipeline(tmp_path):
    out = tiny.build(tmp_path / "sd_v", prediction_type="v_prediction")
    sched = load_scheduler(str(out))
    assert type(sched).__name__ == "PNDMScheduler" and sched.config.prediction_type == "v_prediction"
    assert sched.config.beta_schedule == "scaled_linear"
    ddim = load_scheduler(str(out), class_name="ddim", prediction_type="epsilon")
    assert type(ddim).__name__ == "DDIMScheduler" and ddim.config.prediction_type == "epsilon"


def test_8bit_adam_needs_bitsandbytes():
    from diffusion_lab.components.optim import adamw_8bit

    params = [torch.nn.Parameter(torch.zeros(2))]
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match=r"bitsandbytes.*pip install -e '.\[bnb\]'.*torch.optim.AdamW"):
            adamw_8bit(params, lr=1e-4)
    else:
        assert type(adamw_8bit(params, lr=1e-4)).__name__ == "AdamW8bit"
