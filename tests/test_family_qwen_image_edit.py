"""Qwen-Image-Edit on a tiny random QwenImageEditPipeline (diffusion_lab/testing/qwen_image_edit.py): the processor
built without torchvision, the conditioner against the pipeline's encode_prompt with the source image, fits on
identity edits of the digits and on a paired folder, exports that diffusers loads (given the processor) and that
sample like the module, and a folder of the text-to-image family."""

import json

import diffusers.pipelines.qwenimage.pipeline_qwenimage_edit as edit_pipeline
import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, QwenImageEditPipeline, QwenImagePipeline
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.families.qwen_image_edit import (
    EDIT_DROP_IDX,
    EDIT_TEMPLATE,
    load_processor,
)
from diffusion_lab.testing import qwen_image as tiny_qwen
from diffusion_lab.testing import qwen_image_edit as tiny_edit
from diffusion_lab.train import train
from tests.conftest import compose_cfg
from tests.test_latent import user_error
from tests.test_latent_train import FAST as SD_FAST
from tests.test_latent_train import losses

PROMPT = "make it bold"
FAST = [o for o in SD_FAST if not o.startswith("experiment=")]
SOURCE = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """The tiny edit pipeline written by QwenImageEditPipeline's own save_pretrained (``tiny_sd --kind qwen_image_edit``)."""
    path = tmp_path_factory.mktemp("tiny") / "tiny_qwen_image_edit"
    tiny_edit.tiny_pipeline().save_pretrained(path)
    return str(path)


@pytest.fixture
def source_area_32(monkeypatch):
    """The pipeline resizes the source to ~1024 x 1024 (``calculate_dimensions(1024 * 1024, ratio)``); the tiny
    recipe keeps it at 32 x 32 (``model.family.condition_area=1024``), so the pipeline is given the same area."""
    original = edit_pipeline.calculate_dimensions
    monkeypatch.setattr(edit_pipeline, "calculate_dimensions", lambda area, ratio: original(32 * 32, ratio))


def fit(out, *overrides):
    cfg = compose_cfg("train", ["experiment=qwen_image_edit_finetune_tiny", *FAST, *overrides], out)
    return train(cfg)[1]


def load(path):
    """``QwenImageEditPipeline.from_pretrained`` with the processor from its parts (no torchvision here)."""
    return QwenImageEditPipeline.from_pretrained(path, processor=load_processor(str(path)))


def generate(pipe, steps=3):
    g = torch.Generator().manual_seed(0)
    return pipe(image=SOURCE, prompt=PROMPT, num_inference_steps=steps, height=32, width=32, output_type="np", generator=g, true_cfg_scale=1.0).images


def own_sampler(objects, steps=3):
    module, g = objects["model"], torch.Generator().manual_seed(0)
    source = torch.from_numpy(np.array(SOURCE)).permute(2, 0, 1)[None].float() / 127.5 - 1
    module.family.source_key = "source_pixel_values"
    with ema_weights(objects["trainer"], module):
        images = module.generate(1, num_inference_steps=steps, generator=g, cond_batch={"caption": [PROMPT], "source_pixel_values": source}, guidance_scale=1.0)
    return ((images + 1) / 2).permute(0, 2, 3, 1).numpy()


@pytest.fixture(scope="module")
def full_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("full") / "run"
    return out, fit(out, f"model.pretrained={folder}")


@pytest.fixture(scope="module")
def lora_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    return out, fit(out, f"model.pretrained={folder}", "adapter=lora", "model.optimizer.lr=1e-2")


def test_tiny_edit_pipeline_round_trips_with_a_processor_built_without_torchvision(folder, source_area_32):
    from transformers import Qwen2VLProcessor
    from transformers.utils import is_torchvision_available

    processor = load_processor(folder)
    assert type(processor) is Qwen2VLProcessor and type(processor.image_processor).__name__ == "Qwen2VLImageProcessorPil"
    saved = json.loads((__import__("pathlib").Path(folder) / "processor" / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2VLProcessor" and saved["image_processor"]["image_processor_type"] == "Qwen2VLImageProcessor"
    ids = processor.tokenizer(EDIT_TEMPLATE.format(PROMPT)).input_ids
    assert processor.tokenizer.convert_ids_to_tokens(ids)[EDIT_DROP_IDX - 2 : EDIT_DROP_IDX + 1] == ["user", "Ċ", "<|vision_start|>"]  # the 64-token prefix
    pipe = load(folder)
    assert pipe.prompt_template_encode == EDIT_TEMPLATE and pipe.prompt_template_encode_start_idx == EDIT_DROP_IDX
    image = generate(pipe, steps=2)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()
    if not is_torchvision_available():  # why load() passes the processor: the full one needs a video processor
        with pytest.raises(OSError, match="video processor"):
            DiffusionPipeline.from_pretrained(folder)


def test_conditioner_matches_the_pipeline_encode_prompt_with_the_source(folder, tmp_path):
    cfg = compose_cfg("train", ["experiment=qwen_image_edit_finetune_tiny", f"model.pretrained={folder}"], tmp_path)
    conditioner = instantiate(cfg.text_encoder)
    pipe = load(folder)
    other = SOURCE.transpose(Image.FLIP_LEFT_RIGHT)
    prompts = [PROMPT, "a handwritten digit seven with a red background"]
    with torch.no_grad():
        states = conditioner(prompts, images=[SOURCE, other])
        expected, mask = pipe.encode_prompt(prompts, image=[SOURCE, other], device="cpu")
    lengths = mask.sum(1).tolist()
    assert states["encoder_hidden_states"].shape == (2, 48, 32) and states["encoder_hidden_states_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):  # image tokens + instruction + 5, exactly as the pipeline; zeros after
        torch.testing.assert_close(states["encoder_hidden_states"][i, :n], expected[i, :n], rtol=0, atol=0)
        assert states["encoder_hidden_states"][i, n:].abs().max() == 0
    with pytest.raises(Exception, match="text_encoder.max_sequence_length=8"):  # never truncated, as the pipeline
        conditioner.max_sequence_length = 8
        conditioner(prompts, images=[SOURCE, other])


def test_identity_edit_fit_exports_a_pipeline_that_samples_like_the_module(full_run, folder, source_area_32):
    out, objects = full_run
    assert np.isfinite(losses(out)).all() and len(losses(out)) == 4
    assert (out / "samples" / "step_000004.png").exists()  # previews edit the first training sources
    pipe, base = load(out / "pipeline"), load(folder)
    assert type(pipe) is QwenImageEditPipeline
    assert any(not torch.equal(a, b) for a, b in zip(pipe.transformer.parameters(), base.transformer.parameters()))
    image = generate(pipe)
    assert np.abs(image - generate(base)).max() > 1e-3
    np.testing.assert_allclose(image, own_sampler(objects), atol=1e-5)


def test_lora_loads_with_load_lora_weights_and_samples_like_the_module(lora_run, folder, source_area_32):
    out, objects = lora_run
    weights = load_file(out / "lora" / "pytorch_lora_weights.safetensors")
    assert {k.split(".")[0] for k in weights} == {"transformer"}
    base = load(folder)
    before = generate(base)
    base.load_lora_weights(out / "lora")
    with_lora = generate(base)
    assert np.abs(with_lora - before).max() > 1e-4
    np.testing.assert_allclose(with_lora, own_sampler(objects), atol=1e-5)


def test_a_paired_folder_trains_on_source_target_pairs(folder, tmp_path):
    """data=image_folder with a ``source_image`` metadata column mapped to ``source_pixel_values`` (the recipe's
    default source key): each target's source is the digit inverted."""
    from sklearn.datasets import load_digits

    root, digits, rows = tmp_path / "pairs", load_digits(), []
    (root / "sources").mkdir(parents=True)
    for i in range(8):
        pixels = (digits.images[i] * 255 / 16).astype("uint8")
        Image.fromarray(pixels).convert("RGB").resize((32, 32)).save(root / f"{i}.png")
        Image.fromarray(255 - pixels).convert("RGB").resize((32, 32)).save(root / "sources" / f"{i}.png")
        rows.append({"file_name": f"{i}.png", "source_image": f"sources/{i}.png", "text": "make it dark on light"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    objects = fit(out, f"model.pretrained={folder}", "data=image_folder", f"data.root={root}", "data.resolution=32", "data.caption_column=text",
                  "data.paired_images={source_image: source_pixel_values}", "model.family.source_key=source_pixel_values", "data.batch_size=4",
                  "data.val_fraction=0.25", "data.num_workers=0", "trainer.max_steps=2", "callbacks.progress_bar=null")
    assert np.isfinite(losses(out)).all() and objects["trainer"].global_step == 2 and (out / "pipeline" / "processor").is_dir()
    example = objects["datamodule"].train_set[0]
    assert example["source_pixel_values"].shape == example["pixel_values"].shape == (3, 32, 32)
    torch.testing.assert_close(example["source_pixel_values"], -example["pixel_values"], rtol=0, atol=0.02)  # the inverted digit


def test_a_text_to_image_folder_is_a_config_error_naming_its_model(tmp_path):
    t2i = tmp_path / "tiny_qwen_image"
    tiny_qwen.tiny_pipeline().save_pretrained(t2i)
    cfg = compose_cfg("train", ["experiment=qwen_image_edit_finetune_tiny", f"model.pretrained={t2i}"], tmp_path / "run")
    with pytest.raises(Exception) as excinfo:
        instantiate(cfg.backbone)
    message = str(user_error(excinfo))
    assert f"model.pretrained='{t2i}' is a QwenImagePipeline folder" in message and "model=latent_qwen_image_edit trains a QwenImageEditPipeline" in message
    assert "use model=latent_qwen_image" in message and "--kind qwen_image_edit" in message
    backbone = instantiate(compose_cfg("train", ["model=latent_qwen_image", f"model.pretrained={t2i}"], tmp_path / "ok").backbone)
    assert type(backbone) is type(QwenImagePipeline.from_pretrained(t2i).transformer)  # the folder the message points to


@pytest.mark.slow
def test_gpu_lora_recipe_runs_a_step_on_the_tiny_pipeline(folder, tmp_path):
    """experiment=qwen_image_edit_lora's settings (latent cache with the sources along, bf16 frozen parts, bf16-mixed,
    checkpointing, LoRA) for one CPU step on a paired folder; torch's AdamW stands in for the 8-bit one."""
    recipe = compose_cfg("train", ["experiment=qwen_image_edit_lora", "data.root=x"], tmp_path / "composed")
    assert recipe.model.pretrained == "Qwen/Qwen-Image-Edit" and recipe.data.resolution == 1024 and recipe.model.family.condition_area == 1024 * 1024
    root = tmp_path / "pairs"
    root.mkdir()
    rows = []
    for i in range(4):
        Image.fromarray((np.random.RandomState(i).rand(32, 32, 3) * 255).astype("uint8")).save(root / f"{i}.png")
        Image.fromarray((np.random.RandomState(10 + i).rand(32, 32, 3) * 255).astype("uint8")).save(root / f"s{i}.png")
        rows.append({"file_name": f"{i}.png", "source_image": f"s{i}.png", "text": PROMPT})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose_cfg("train", ["experiment=qwen_image_edit_lora", f"data.root={root}", f"model.pretrained={folder}", "model.local_files_only=true", "data.resolution=32",
                                "data.batch_size=2", "data.val_fraction=0.5", "data.num_workers=0", "model.family.condition_area=1024", "text_encoder.max_sequence_length=48",
                                "optimizer@model.optimizer=adamw", "trainer=cpu", "debug=fast", "logger=csv", "callbacks.sample_grid=null", "callbacks.progress_bar=null",
                                "callbacks.noising_strip=null"], tmp_path / "run")
    _, objects = train(cfg)
    module = objects["model"]
    assert module.base_backbone.is_gradient_checkpointing and module.base_backbone.dtype == torch.bfloat16
    example = objects["datamodule"].train_set[0]
    assert type(objects["datamodule"].train_set).__name__ == "CachedLatentDataset" and "source_pixel_values" in example
    assert example["encoder_hidden_states"].shape == (1, 32)  # a placeholder: the real states need the source, every step
    assert objects["trainer"].global_step == 1 and (tmp_path / "run" / "lora" / "pytorch_lora_weights.safetensors").exists()


@pytest.mark.slow
def test_the_tiny_recipe_runs_in_a_fresh_process(folder, tmp_path):
    """``python -m diffusion_lab.train experiment=qwen_image_edit_finetune_tiny`` as README shows it, shortened: a fresh
    interpreter, where Hydra builds the edit backbone before anything imports families/qwen_image_edit.py."""
    import subprocess
    import sys
    from pathlib import Path

    out = tmp_path / "run"
    command = [sys.executable, "-m", "diffusion_lab.train", "experiment=qwen_image_edit_finetune_tiny", f"model.pretrained={folder}", f"paths.output_dir={out}",
               "trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "callbacks.sample_grid=null", "callbacks.model_checkpoint.every_n_train_steps=2"]
    subprocess.run(command, check=True, cwd=Path(__file__).parents[1], capture_output=True, timeout=600)
    assert (out / "pipeline" / "processor" / "processor_config.json").exists()
