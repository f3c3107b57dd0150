"""Textual inversion (adapter=textual_inversion) on SD3 and FLUX.1: the new token's rows train in each CLIP encoder
(and in T5 with adapter.t5=true); the exported learned_embeds*.safetensors, loaded into a fresh pipeline of the base
folder by diffusers' own TextualInversionLoaderMixin code (export/embeddings.load_embeddings: StableDiffusion3Pipeline
has no load_textual_inversion), sample what the module samples; the ComfyUI file carries one key per encoder."""

from __future__ import annotations

import diffusers
import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file

from diffusion_lab.callbacks.ema import ema_weights
from diffusion_lab.export.embeddings import load_embeddings, save_textual_inversion
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.family_checks import tiny_folders

TOKEN = "<thick>"
PROMPT = f"a handwritten digit seven {TOKEN}"
GUIDANCE = 3.0  # SD3: classifier-free guidance; FLUX.1: the embedded guidance
TI = ["adapter=textual_inversion", f"adapter.placeholder_token='{TOKEN}'", "data=digits_concept", f"data.trigger='{TOKEN}'", "data.resolution=32"]
INITIALIZER = {False: "digit", True: "a"}  # one token in every tokenizer that learns (the tiny T5's vocabulary spells "digit" in 3)
# (model kind, adapter.t5) -> the encoders that learn the token and the ComfyUI key of each
CASES = {
    ("sd3", False): {"text_encoder": "clip_l", "text_encoder_2": "clip_g"},
    ("sd3", True): {"text_encoder": "clip_l", "text_encoder_2": "clip_g", "text_encoder_3": "t5xxl"},
    ("flux", False): {"text_encoder": "clip_l"},
    ("flux", True): {"text_encoder": "clip_l", "text_encoder_2": "t5xxl"},
}
IDS = [f"{k}-t5" if t5 else k for k, t5 in CASES]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    return tiny_folders(tmp_path_factory.mktemp("tiny"))


def overrides(kind: str, folder: str, t5: bool) -> list[str]:
    return [f"experiment={kind}_finetune_tiny", f"model.pretrained={folder}", *TI, f"adapter.initializer_token={INITIALIZER[t5]}", f"adapter.t5={str(t5).lower()}",
            "text_encoder.max_sequence_length=32"]


def assert_loaded_embeddings_sample_like_the_module(module, folder: str, export_dir, encoders: dict[str, str]) -> None:
    """The export holds one diffusers file per learning encoder and the ComfyUI file; loaded into a fresh base pipeline,
    each encoder's new rows are the module's, and the pipeline samples the module's images for the token's prompt."""
    learned = module.text_embedding.learned()
    assert set(learned) == set(encoders)
    comfy = load_file(export_dir / "thick.safetensors")
    assert set(comfy) == set(encoders.values())
    pipe = getattr(diffusers, module.family.pipeline_class).from_pretrained(folder)
    assert sorted(load_embeddings(pipe, export_dir)) == sorted(encoders)
    for component, key in encoders.items():
        tokenizer, encoder = getattr(pipe, component.replace("text_encoder", "tokenizer")), getattr(pipe, component)
        row = encoder.get_input_embeddings().weight[tokenizer.convert_tokens_to_ids(TOKEN)]
        torch.testing.assert_close(row[None], learned[component], rtol=0, atol=0)
        torch.testing.assert_close(comfy[key], learned[component], rtol=0, atol=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        own = module.generate(1, num_inference_steps=3, generator=g, cond_batch={"caption": [PROMPT]}, guidance_scale=GUIDANCE)
    own = ((own + 1) / 2).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    call = dict(num_inference_steps=3, guidance_scale=GUIDANCE, height=32, width=32, output_type="np", max_sequence_length=32)
    theirs = pipe(PROMPT, generator=torch.Generator().manual_seed(0), **call).images
    np.testing.assert_allclose(theirs, own, atol=1e-5)
    base = getattr(diffusers, module.family.pipeline_class).from_pretrained(folder)  # without the embedding: "<thick>" is plain text
    assert np.abs(base(PROMPT, generator=torch.Generator().manual_seed(0), **call).images - theirs).max() > 1e-3


@pytest.mark.parametrize("kind,t5", list(CASES), ids=IDS)
def test_learned_rows_export_and_load_into_the_pipeline(kind, t5, folders, tmp_path):
    """Without training: the placeholder rows moved away from the initializer (what training does), exported, loaded."""
    folder = folders(kind)
    module = instantiate(compose_cfg("train", overrides(kind, folder, t5), tmp_path / "c").model)
    trainable = {id(p) for p in module.parameters() if p.requires_grad}  # the learning encoders' token tables, nothing else
    assert trainable == {id(e.get_input_embeddings().weight) for e in module.text_embedding.encoders} and len(trainable) == len(CASES[(kind, t5)])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, encoder in enumerate(module.text_embedding.encoders):
            weight = encoder.get_input_embeddings().weight
            ids = getattr(module.text_embedding, f"ids_{k}")
            weight[ids] += weight[ids].std() * 3 * torch.randn(weight[ids].shape, generator=g)
    module.eval()
    save_textual_inversion(module, tmp_path / "textual_inversion")
    assert_loaded_embeddings_sample_like_the_module(module, folder, tmp_path / "textual_inversion", CASES[(kind, t5)])


def test_multi_vector_tokens_need_t5_to_learn_them_too(folders, tmp_path):
    """FluxPipeline expands <tok> into <tok> <tok>_1 only for tokenizers that know it: with T5 not learning the token
    its prompt would differ from training's."""
    with pytest.raises(Exception) as raised:
        instantiate(compose_cfg("train", overrides("flux", folders("flux"), False) + ["adapter.num_vectors=2"], tmp_path / "c").model)
    error = raised.value
    while error is not None and not isinstance(error, ConfigError):
        error = error.__cause__
    assert error is not None and "adapter.num_vectors=2 with adapter.t5=false" in str(error) and "text_encoder_2" in str(error)


@pytest.mark.slow
@pytest.mark.parametrize("kind,t5", list(CASES), ids=IDS)
def test_a_trained_embedding_reproduces_the_runs_images(kind, t5, folders, tmp_path):
    """Four steps of textual inversion: only the placeholder rows moved (every other row bit-identical to the base);
    <run>/textual_inversion, loaded into the base pipeline, samples the trained module's images."""
    folder, run = folders(kind), tmp_path / "run"
    quick = ["model.optimizer.lr=5e-2", "trainer.max_steps=4", "trainer.val_check_interval=4", "trainer.limit_val_batches=1", "data.batch_size=2",
             "model.preview_steps=2", "callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null",
             "callbacks.model_checkpoint.every_n_train_steps=4", "logger=csv", "trainer=cpu"]
    _, objects = train(compose_cfg("train", overrides(kind, folder, t5) + quick, run))
    module = objects["model"]
    base = getattr(diffusers, module.family.pipeline_class).from_pretrained(folder)
    for k, (component, encoder) in enumerate(zip(module.text_embedding.names, module.text_embedding.encoders)):
        weight, ids = encoder.get_input_embeddings().weight.detach(), getattr(module.text_embedding, f"ids_{k}")
        original = getattr(base, component).get_input_embeddings().weight.detach()
        n = min(len(weight), len(original))
        keep = torch.ones(n, dtype=torch.bool)
        keep[ids[ids < n]] = False
        torch.testing.assert_close(weight[:n][keep], original[:n][keep], rtol=0, atol=0)
        init = original[getattr(base, component.replace("text_encoder", "tokenizer")).encode(INITIALIZER[t5], add_special_tokens=False)[0]]
        assert (weight[ids] - init).abs().max() > 0  # the token's rows trained away from the initializer's
    module.eval()
    with ema_weights(objects["trainer"], module):
        assert_loaded_embeddings_sample_like_the_module(module, folder, run / "textual_inversion", CASES[(kind, t5)])
