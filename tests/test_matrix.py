"""The family x method table (#25): every pair either trains two steps and exports what its standard
loader takes, or is refused before training with a ConfigError naming the family and the reason;
docs/guides/methods.md shows the table ``diffusion_lab.families.matrix`` generates. Training every pair is slow (11 tiny
families x 8 methods); the default suite trains the SD 1.x row and checks every refusal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffusion_lab.testing import tiny
from diffusion_lab.families.matrix import METHODS, families, support, table
from diffusion_lab.train import train
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = families()
PAIRS = [(f, m) for f in FAMILIES for m in METHODS]
SUPPORTED = [p for p in PAIRS if support(FAMILIES[p[0]], p[1]) is None]
REFUSED = [p for p in PAIRS if support(FAMILIES[p[0]], p[1]) is not None]
TWO_STEPS = ["trainer.max_steps=2", "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "data.batch_size=2", "model.preview_steps=2",
             "callbacks.sample_grid=null", "callbacks.progress_bar=null", "callbacks.noising_strip=null", "callbacks.model_checkpoint.every_n_train_steps=2",
             "logger=csv", "trainer=cpu"]
# what each method needs beyond METHODS' overrides to run on the tiny stack
EXTRA = {
    "dreambooth": ["data.num_class_images=2", "data.max_instances=2", "data.class_steps=2", "data.resolution=32"],
    "textual_inversion": ["adapter.placeholder_token='<thick>'", "adapter.initializer_token=digit", "data=digits_concept", "data.trigger='<thick>'", "data.resolution=32"],
    "controlnet": [],
    "edit": [],
}


def kind(option: str) -> str:
    return option.removeprefix("latent_")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny pipeline folders, built once per family on first use."""
    root, built = tmp_path_factory.mktemp("tiny"), {}

    def get(option: str) -> str:
        if option not in built:
            built[option] = str(tiny.build(root / kind(option), kind=kind(option)))
        return built[option]

    return get


@pytest.fixture(scope="module")
def paired(tmp_path_factory) -> str:
    """An image folder of edit pairs: each target digit with its source (the digit mirrored) and a caption."""
    from diffusion_lab.data.digits import DigitsDataset
    from diffusion_lab.data.transforms import ImageTransform

    root = tmp_path_factory.mktemp("pairs")
    ds, rows = DigitsDataset(ImageTransform(32, mode="RGB", warn_upscale=False)), []
    for i in range(4):
        x = ((ds[i]["pixel_values"].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8)
        Image.fromarray(x).save(root / f"{i}.png")
        Image.fromarray(x[:, ::-1].copy()).save(root / f"{i}_src.png")
        rows.append({"file_name": f"{i}.png", "source_image": f"{i}_src.png", "text": "mirror the digit"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(root)


def overrides(option: str, method: str, folder: str, paired: str) -> list[str]:
    out = [f"experiment={kind(option)}_finetune_tiny", f"model.pretrained={folder}", *METHODS[method][1], *EXTRA.get(method, [])]
    if method == "edit":
        out += [f"data.root={paired}", "data.caption_column=text", "data.resolution=32", "data.val_fraction=0", "data.num_workers=0"]
    return out + TWO_STEPS


def user_error(e: BaseException) -> BaseException | None:
    while e is not None and not isinstance(e, ConfigError):
        e = e.__cause__
    return e


def test_methods_guide_shows_the_generated_table():
    assert table() in (ROOT / "docs" / "guides" / "methods.md").read_text(), "docs/guides/methods.md's family x method table is stale: paste `python -m diffusion_lab.families.matrix`"


def test_every_family_and_method_has_an_answer():
    assert len(FAMILIES) >= 11 and {"latent_sd", "latent_sdxl", "latent_sd3", "latent_flux"} <= set(FAMILIES)
    assert all(support(FAMILIES[f], "full") is None and support(FAMILIES[f], "lora") is None for f in FAMILIES)


@pytest.mark.parametrize("option,method", REFUSED, ids=[f"{f}-{m}" for f, m in REFUSED])
def test_a_refused_pair_is_a_config_error_before_training(option, method, folders, paired, tmp_path):
    reason = support(FAMILIES[option], method)
    with pytest.raises(Exception) as raised:
        train(compose_cfg("train", overrides(option, method, folders(option), paired), tmp_path / "run"))
    error = user_error(raised.value)
    assert error is not None, raised.value
    assert f"model={option}" in str(error) and reason in str(error), str(error)
    assert not (tmp_path / "run" / "checkpoints").exists()  # nothing trained


def check_export(option: str, method: str, run: Path, folder: str) -> None:
    """What the run exported loads with the standard loader of its kind."""
    import diffusers
    from diffusers import DiffusionPipeline

    cls = getattr(diffusers, FAMILIES[option].pipeline_class)
    name = cls.__name__
    if option == "latent_qwen_image_edit":  # its processor loads without torchvision only through the family's loader
        from diffusion_lab.families.qwen_image_edit import load_processor

        loader = cls.from_pretrained
        cls = type("Loader", (), {"from_pretrained": staticmethod(lambda d: loader(d, processor=load_processor(d)))})
        DiffusionPipeline = cls  # noqa: N806
    if METHODS[method][2] == "<run>/pipeline":
        assert type(DiffusionPipeline.from_pretrained(run / "pipeline")).__name__ == name
    elif method in ("lora", "dora"):
        pipe = cls.from_pretrained(folder)
        pipe.load_lora_weights(str(run / method))
        assert pipe.get_list_adapters()
    elif method == "lokr":
        from peft import PeftModel

        name = FAMILIES[option].backbone_name  # a peft folder per part, named as the pipeline's component
        PeftModel.from_pretrained(getattr(cls.from_pretrained(folder), name), run / "lokr" / name)
    elif method == "controlnet":
        config = json.loads((run / "controlnet" / "config.json").read_text())
        net = getattr(diffusers, config["_class_name"]).from_pretrained(run / "controlnet")
        base = cls.from_pretrained(folder)
        getattr(diffusers, FAMILIES[option].controlnet_pipeline_class)(**base.components, controlnet=net)
    elif method == "textual_inversion":  # diffusers' loader, on each encoder that learned the token (SD3's pipeline has no load_textual_inversion)
        from diffusion_lab.export.embeddings import load_embeddings

        pipe = cls.from_pretrained(folder)
        assert "text_encoder" in load_embeddings(pipe, run / "textual_inversion") and "<thick>" in pipe.tokenizer.get_vocab()


def _fit(option, method, folders, paired, tmp_path):
    run = tmp_path / "run"
    _, objects = train(compose_cfg("train", overrides(option, method, folders(option), paired), run))
    assert objects["trainer"].global_step == 2
    check_export(option, method, run, folders(option))


SD_ROW = [p for p in SUPPORTED if p[0] == "latent_sd"]


@pytest.mark.parametrize("option,method", SD_ROW, ids=[f"{f}-{m}" for f, m in SD_ROW])
def test_sd_row_trains_two_steps_and_exports(option, method, folders, paired, tmp_path):
    _fit(option, method, folders, paired, tmp_path)


# full fine-tune and LoRA of every family are trained, exported and reloaded by its own tests (test_family_*.py,
# test_sd3_flux.py, test_sdxl_train.py); here the methods that compose with it
OTHERS = [p for p in SUPPORTED if p[0] != "latent_sd" and p[1] not in ("full", "lora")]


@pytest.mark.slow
@pytest.mark.parametrize("option,method", OTHERS, ids=[f"{f}-{m}" for f, m in OTHERS])
def test_a_supported_pair_trains_two_steps_and_exports(option, method, folders, paired, tmp_path):
    _fit(option, method, folders, paired, tmp_path)
