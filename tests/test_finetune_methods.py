"""Textual inversion, DreamBooth (prior preservation) and the LoRA variants (DoRA, LoKr, LoHa):
each trains (fast_dev_run on the tiny SD pipeline), and each output reloads in plain diffusers /
peft through its standard loader, gives the trained module's images and changes the base's."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image
from safetensors.torch import load_file

from diffusion_lab.testing import tiny
from diffusion_lab.data.dreambooth import DreamBoothDataset
from diffusion_lab.data.transforms import ImageTransform
from diffusion_lab.export import build_pipeline
from diffusion_lab.components.embeddings import add_placeholder_tokens
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError, DataError
from tests.conftest import compose_cfg

FAST = ["debug=fast", "callbacks.progress_bar=null", "callbacks.sample_grid=null", "data.batch_size=4", "model.preview_steps=2"]
PROMPT = "a handwritten digit seven"


@pytest.fixture(scope="module")
def diffusers_folder(tmp_path_factory) -> str:
    """A tiny SD pipeline folder written by diffusers itself (``StableDiffusionPipeline.save_pretrained``)."""
    out = tmp_path_factory.mktemp("diffusers") / "tiny_sd"
    tiny.tiny_sd_pipeline().save_pretrained(out, safe_serialization=True)
    return str(out)


def fit(out, *overrides):
    cfg = compose_cfg("train", list(overrides) + FAST, out)
    _, objects = train(cfg)
    return objects["model"]


def base_pipeline(folder) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    return with_ddim(pipe, pipe)


def with_ddim(pipe, base):
    """The same sampler for every pipeline compared (the base folder's schedule, DDIM)."""
    pipe.scheduler = DDIMScheduler.from_config(base.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, prompt=PROMPT) -> np.ndarray:
    g = torch.Generator().manual_seed(0)
    return pipe(prompt, num_inference_steps=3, height=32, width=32, guidance_scale=3.0, output_type="np", generator=g).images


def trained_pipeline(module, base):
    """The trained module's own weights (live adapters / tokens) as a pipeline."""
    return with_ddim(build_pipeline(module), base)


# ---- textual inversion ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def ti_run(diffusers_folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("ti") / "run"
    module = fit(out, "experiment=textual_inversion_tiny", f"model.pretrained={diffusers_folder}", "model.optimizer.lr=0.5")
    return out, module


def test_textual_inversion_trains_only_the_new_token_and_loads_in_diffusers(ti_run, diffusers_folder):
    out, module = ti_run
    folder = out / "textual_inversion"
    base = base_pipeline(diffusers_folder)
    # only the placeholder's row moved: the UNet and every other embedding row are the base's
    base_rows = base.text_encoder.get_input_embeddings().weight
    rows = module.conditioner.text_encoder.get_input_embeddings().weight.detach()
    ids = module.text_embedding.ids_0.tolist()
    assert torch.equal(rows[: len(base_rows)], base_rows) and ids == [len(base_rows)]
    init = base.tokenizer.convert_tokens_to_ids("digit</w>")
    assert not torch.allclose(rows[ids[0]], base_rows[init])  # it trained away from the initializer
    assert all(torch.equal(a, b) for a, b in zip(module.base_backbone.state_dict().values(), base.unet.state_dict().values()))

    learned = load_file(folder / "learned_embeds.safetensors")
    assert list(learned) == ["<thick>"] and learned["<thick>"].shape == (1, 32)
    trained = images(trained_pipeline(module, base), f"{PROMPT} <thick>")
    before = images(base, f"{PROMPT} digit")  # the token's starting point
    base.load_textual_inversion(str(folder))
    assert np.allclose(images(base, f"{PROMPT} <thick>"), trained, atol=1e-5)
    assert np.abs(images(base, f"{PROMPT} <thick>") - before).max() > 1e-3  # the token changed the output
    assert np.allclose(images(base, PROMPT), images(base_pipeline(diffusers_folder), PROMPT))  # without it: the base

    # the A1111 / ComfyUI files hold the same vector and load in diffusers too
    assert torch.equal(load_file(folder / "thick.safetensors")["emb_params"], learned["<thick>"])
    for file, token in (("thick.safetensors", "<thick>"), ("thick.pt", None)):
        pipe = base_pipeline(diffusers_folder)
        pipe.load_textual_inversion(str(folder / file), **({"token": token} if token else {}))
        word = token or "thick"  # the .pt names its token (A1111: the file name)
        assert np.allclose(images(pipe, f"{PROMPT} {word}"), trained, atol=1e-5), file


def test_textual_inversion_errors_name_the_key():
    tokenizer = tiny.tiny_clip_tokenizer()
    encoder = tiny.tiny_text_encoder()
    with pytest.raises(ConfigError, match="adapter.initializer_token"):
        add_placeholder_tokens(tokenizer, encoder, "<new>", "not-one-token-at-all", 1)
    ids = add_placeholder_tokens(tokenizer, encoder, "<v>", "digit", 3)
    assert tokenizer.convert_ids_to_tokens(ids) == ["<v>", "<v>_1", "<v>_2"] and encoder.get_input_embeddings().weight.shape[0] == len(tokenizer)
    with pytest.raises(ConfigError, match="adapter.placeholder_token"):
        add_placeholder_tokens(tokenizer, encoder, "<v>", "digit", 1)


def test_textual_inversion_without_the_token_in_the_captions_is_a_data_error(diffusers_folder, tmp_path):
    with pytest.raises(DataError, match="placeholder_token"):
        fit(tmp_path / "run", "experiment=textual_inversion_tiny", f"model.pretrained={diffusers_folder}", "data.trigger=thick")


def test_textual_inversion_on_sdxl_learns_both_encoders_and_loads_in_diffusers(tmp_path):
    """adapter=textual_inversion is a part: on SDXL both CLIP encoders learn the token (diffusers'
    textual_inversion_sdxl.py); each file loads into its encoder with load_textual_inversion."""
    from diffusers import StableDiffusionXLPipeline

    folder = tiny.build(tmp_path / "sdxl", kind="sdxl")
    module = fit(tmp_path / "run", "experiment=textual_inversion_tiny", "model=latent_sdxl", f"model.pretrained={folder}", "model.optimizer.lr=0.5")
    out = tmp_path / "run" / "textual_inversion"
    learned = module.text_embedding.learned()
    assert list(learned) == ["text_encoder", "text_encoder_2"]
    base = StableDiffusionXLPipeline.from_pretrained(folder)
    for k, (file, encoder, tokenizer) in enumerate((("learned_embeds.safetensors", base.text_encoder, base.tokenizer), ("learned_embeds_2.safetensors", base.text_encoder_2, base.tokenizer_2))):
        start = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("digit</w>")].detach().clone()
        base.load_textual_inversion(str(out / file), token="<thick>", text_encoder=encoder, tokenizer=tokenizer)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids("<thick>")]
        torch.testing.assert_close(row, list(learned.values())[k][0])
        assert not torch.allclose(row, start)  # it trained away from the initializer, in both encoders
    assert set(load_file(out / "thick.safetensors")) == {"clip_l", "clip_g"}


def test_textual_inversion_trains_from_an_uncaptioned_concept_folder_with_templates(diffusers_folder, tmp_path):
    """A few concept images without captions (the paper's and diffusers' textual_inversion.py setting): each
    gets an object template filled with the placeholder; the token trains; without templates it is refused."""
    from diffusion_lab.data.digits import DigitsDataset

    root = tmp_path / "concept"
    root.mkdir()
    ds = DigitsDataset(ImageTransform(32, mode="RGB", warn_upscale=False))
    for i in range(4):
        Image.fromarray(((ds[i]["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)).save(root / f"{i}.png")
    common = ["experiment=textual_inversion_tiny", f"model.pretrained={diffusers_folder}", "data=image_folder", f"data.root={root}",
              "data.caption_column=null", "data.resolution=32", "data.val_fraction=0", "data.num_workers=0"]
    module = fit(tmp_path / "run", *common, "data.caption_templates=object", "model.optimizer.lr=0.5")
    captions = {module.trainer.datamodule.train_set[i]["caption"] for i in range(4)}
    assert all("<thick>" in c for c in captions) and len({c.replace("<thick>", "") for c in captions}) >= 1
    assert not torch.allclose(module.text_embedding.learned()["text_encoder"][0], module.text_embedding.original_0[module.text_embedding.ids_0[0]])
    with pytest.raises(DataError, match="data has no captions"):
        fit(tmp_path / "run2", *common)


# ---- LoRA variants ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def variant_run(diffusers_folder, tmp_path_factory):
    """``variant_run(v)`` -> (run dir, module) of ``adapter=v`` on sd_finetune_tiny, trained once per module."""
    runs = {}

    def run(variant):
        if variant not in runs:
            out = tmp_path_factory.mktemp(variant) / "run"
            runs[variant] = out, fit(out, "experiment=sd_finetune_tiny", f"model.pretrained={diffusers_folder}", f"adapter={variant}", "model.optimizer.lr=0.05")
        return runs[variant]

    return run


def test_dora_loads_with_load_lora_weights(variant_run, diffusers_folder):
    out, module = variant_run("dora")
    files = sorted(p.name for p in (out / "dora").iterdir())
    assert files == ["pytorch_lora_weights.safetensors"]  # no kohya file: its DoRA layout is not checked
    state = load_file(out / "dora" / "pytorch_lora_weights.safetensors")
    assert any("lora_magnitude_vector" in k for k in state)
    base = base_pipeline(diffusers_folder)
    before = images(base)
    trained = images(trained_pipeline(module, base))
    base.load_lora_weights(str(out / "dora"))
    assert base.unet.peft_config[next(iter(base.unet.peft_config))].use_dora
    assert np.allclose(images(base), trained, atol=1e-5)
    assert np.abs(trained - before).max() > 1e-3


@pytest.mark.parametrize("variant", ["lokr", pytest.param("loha", marks=pytest.mark.slow)])
def test_lokr_loha_load_through_peft_and_fused(variant_run, diffusers_folder, variant):
    from peft import PeftModel

    out, module = variant_run(variant)
    folder = out / variant
    base = base_pipeline(diffusers_folder)
    before = images(base)
    trained = images(trained_pipeline(module, base))
    assert np.abs(trained - before).max() > 1e-3
    # peft's own folder
    base.unet = PeftModel.from_pretrained(base.unet, str(folder / "unet")).merge_and_unload()
    assert np.allclose(images(base), trained, atol=1e-4)
    # the fused pipeline
    fused = StableDiffusionPipeline.from_pretrained(folder / "fused")
    assert np.allclose(images(with_ddim(fused, base)), trained, atol=1e-4)
    if variant == "lokr":  # diffusers' UNet loader reads LoKr; the pipeline's load_lora_weights does not
        pipe = base_pipeline(diffusers_folder)
        pipe.unet.load_lora_adapter(str(folder), prefix=None, weight_name="pytorch_lora_weights.safetensors")
        assert np.allclose(images(pipe), trained, atol=1e-5)
        with pytest.raises(ValueError):
            base_pipeline(diffusers_folder).load_lora_weights(str(folder))


# ---- DreamBooth ------------------------------------------------------------------------------
def test_dreambooth_generates_class_images_once_and_exports(diffusers_folder, tmp_path):
    class_dir = tmp_path / "class_images"
    common = ["experiment=dreambooth_tiny", f"model.pretrained={diffusers_folder}", f"data.class_dir={class_dir}", "data.num_class_images=4",
              "data.class_steps=2"]
    module = fit(tmp_path / "run", *common)
    files = sorted(class_dir.glob("class_*.png"))
    assert len(files) == 4 and Image.open(files[0]).size == (32, 32)
    base = base_pipeline(diffusers_folder)
    before = images(base, f"{PROMPT} sks")
    pipe = with_ddim(StableDiffusionPipeline.from_pretrained(tmp_path / "run" / "pipeline"), base)
    assert np.allclose(images(pipe, f"{PROMPT} sks"), images(trained_pipeline(module, base), f"{PROMPT} sks"), atol=1e-5)
    assert np.abs(images(pipe, f"{PROMPT} sks") - before).max() > 1e-3
    # a rerun pointing at the same class_dir reuses the images (none rewritten), here with LoRA
    stamps = [f.stat().st_mtime_ns for f in files]
    fit(tmp_path / "rerun", *common, "adapter=lora")
    assert [f.stat().st_mtime_ns for f in files] == stamps
    lora = base_pipeline(diffusers_folder)
    lora.load_lora_weights(str(tmp_path / "rerun" / "lora"))
    assert np.isfinite(images(lora)).all()


def test_dreambooth_loss_is_instance_plus_weighted_prior(diffusers_folder, tmp_path):
    from hydra.utils import instantiate

    cfg = compose_cfg("train", ["experiment=dreambooth_tiny", f"model.pretrained={diffusers_folder}", "model.prior_loss_weight=0.25"], tmp_path)
    module = instantiate(cfg.model)
    x = torch.rand(4, 3, 32, 32) * 2 - 1
    batch = {"pixel_values": x, "caption": [f"{PROMPT} sks", PROMPT, f"{PROMPT} sks", PROMPT], "is_prior": torch.tensor([0, 1, 0, 1])}
    torch.manual_seed(0)
    loss = module.training_step(batch, 0)
    torch.manual_seed(0)
    instance = module.diffusion_loss({k: v[::2] for k, v in batch.items()})
    prior = module.diffusion_loss({k: v[1::2] for k, v in batch.items()})
    assert torch.allclose(loss, instance + 0.25 * prior) and not torch.allclose(loss, instance + prior)


def test_dreambooth_data_pairs_instance_and_class_and_checks_the_class_dir(tmp_path):
    instance = [{"pixel_values": torch.zeros(3, 8, 8), "caption": "ignored"}] * 3
    ds = DreamBoothDataset(instance, ["a dog", "a cat"], str(tmp_path / "c"), 5, ImageTransform(8, mode="RGB"), instance_prompt="a sks dog")
    assert len(ds) == 10 and ds[0]["caption"] == "a sks dog" and int(ds[0]["is_prior"]) == 0
    with pytest.raises(DataError, match="class_00000.png is missing"):
        ds[5]
    made = ds.generate_class_images(lambda prompts: torch.zeros(len(prompts), 3, 8, 8), batch_size=2, progress=False)
    assert made == 5 and ds[6]["caption"] == "a cat" and int(ds[6]["is_prior"]) == 1 and ds[6]["pixel_values"].shape == (3, 8, 8)
    assert ds.generate_class_images(lambda prompts: 1 / 0, progress=False) == 0  # nothing missing: nothing generated
    other = DreamBoothDataset(instance, "a bird", str(tmp_path / "c"), 5, ImageTransform(8, mode="RGB"), instance_prompt="a sks dog")
    with pytest.raises(DataError, match="data.class_dir"):
        other.missing_class_images()


def test_dreambooth_sd15_recipe_runs_one_step_on_tiny_parts(diffusers_folder, tmp_path):
    instance = tmp_path / "dog"
    instance.mkdir()
    for i in range(3):
        Image.fromarray(np.random.default_rng(i).integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(instance / f"{i}.png")
    cfg = compose_cfg("train", ["experiment=dreambooth_sd15", f"model.pretrained={diffusers_folder}", f"data.instance_dir={instance}",
                                "data.instance_prompt=a photo of sks dog", "data.class_prompt=a photo of dog", "data.resolution=32",
                                "data.num_class_images=2", "data.num_workers=0", "data.class_steps=2", "trainer=cpu",
                                "trainer.precision=32-true", "logger=csv", "debug=fast", "callbacks.progress_bar=null"], tmp_path / "run")
    assert cfg.model.prior_loss_weight == 1.0 and cfg.data.num_class_images == 2 and cfg.model.gradient_checkpointing
    _, objects = train(cfg)
    assert objects["trainer"].global_step == 1 and len(list((tmp_path / "run" / "class_images").glob("*.png"))) == 2


def test_dreambooth_missing_instance_dir_names_data_instance_dir(tmp_path):
    """#29 item 8: data.instance_dir=/data/dog missing said "data.root='/data/dog' is not a
    directory", a key the DreamBooth user never set."""
    from hydra.utils import instantiate

    missing = tmp_path / "dog"
    cfg = compose_cfg("train", ["data=dreambooth", f"data.instance_dir={missing}", "data.instance_prompt=a photo of sks dog",
                                "data.class_prompt=a photo of dog"], tmp_path / "run")
    with pytest.raises(Exception) as raised:
        instantiate(cfg.data.datamodule)
    e = raised.value
    while e is not None and not isinstance(e, DataError):
        e = e.__cause__
    assert e is not None and str(e).startswith(f"data.instance_dir={str(missing)!r} is not a directory. Point data.instance_dir at")
    assert "data.root" not in str(e)
