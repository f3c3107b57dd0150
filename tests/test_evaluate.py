"""Evaluation: digit classifier, FID/KID/IS, CLIP score, the evaluate CLI, sampler comparison,
the FID callback. Real torchmetrics, a real trained (tiny) DDPM, a real (tiny, random) CLIP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffusion_lab.evaluate import run as run_evaluate
from diffusion_lab.metrics.digits import DigitClassifier, class_scores, labels_from_captions, real_digits, score_digit_samples
from diffusion_lab.metrics.distribution import distribution_metrics, fid, kid
from diffusion_lab.metrics.features import ClipFeatures, DigitFeatures, InceptionFeatures
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digit_features():
    return DigitFeatures()  # the cached classifier (trained on first use, ~20 s)


@pytest.fixture(scope="module")
def trained_pipeline(tmp_path_factory):
    """A tiny pixel DDPM trained ~1 minute on 8 px digits with the real train entry; its
    exported pipeline folder."""
    from diffusion_lab.train import train

    out = tmp_path_factory.mktemp("ddpm8")
    cfg = compose_cfg(
        "train",
        [
            "backbone=tiny",
            "trainer=cpu",
            "logger=none",
            "data.resolution=8",
            "data.batch_size=64",
            "data.val_fraction=0",
            "trainer.max_steps=350",
            "trainer.limit_val_batches=0",
            "model.optimizer.lr=2e-3",
            "model.lr_scheduler.num_warmup_steps=50",
            "callbacks.ema.decay=0.999",
            "callbacks.sample_grid=null",
            "callbacks.noising_strip=null",
            "callbacks.progress_bar=null",
            "callbacks.model_checkpoint=null",
            "callbacks.lr_monitor=null",
        ],
        out / "run",
    )
    train(cfg)
    return out / "run" / "pipeline"


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    """A random CLIPModel + CLIPProcessor with a real (tiny) CLIP tokenizer, saved to a folder."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    from diffusion_lab.testing.tiny import tiny_clip_tokenizer

    tok = tiny_clip_tokenizer()
    text = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                max_position_embeddings=77, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4, image_size=32, patch_size=8)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16))
    out = tmp_path_factory.mktemp("clip") / "tiny_clip"
    model.save_pretrained(out)
    CLIPProcessor(image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}), tokenizer=tok).save_pretrained(out)
    return out


# ---- digit classifier -----------------------------------------------------------------------
def test_digit_classifier_is_accurate_on_held_out_digits_at_any_resolution(digit_features, tmp_path):
    clf = digit_features.classifier
    for resolution in (8, 16, 32):
        images, labels = real_digits("heldout", resolution)
        acc = (clf.predict_proba(images).argmax(-1) == labels).float().mean().item()
        assert acc >= 0.97, (resolution, acc)
    # RGB input is read as grey; the cache round-trips the weights exactly
    images, _ = real_digits("heldout", 16)
    torch.testing.assert_close(clf.predict_proba(images.expand(-1, 3, -1, -1)), clf.predict_proba(images))
    again = DigitClassifier.load_or_train()
    torch.testing.assert_close(again.predict_proba(images), clf.predict_proba(images))


def test_digit_scores_separate_digits_from_noise(digit_features):
    images, labels = real_digits("all", 16)
    clf = digit_features.classifier
    real = score_digit_samples(images[:300], labels[:300], classifier=clf)
    assert set(real) >= {"n", "class_histogram", "confidence", "marginal_entropy", "accuracy", "real_heldout"}
    assert sum(real["class_histogram"]) == 300 and len(real["class_histogram"]) == 10
    assert real["accuracy"] > 0.97 and real["confidence"] > 0.9
    assert real["marginal_entropy"] > 0.95 * real["max_entropy"]  # all ten classes
    sevens = score_digit_samples(images[labels == 7], classifier=clf, reference=False)
    assert sevens["marginal_entropy"] < 0.3  # one class: the "mode collapse" signal
    noise = class_scores(clf.predict_proba(torch.rand(300, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1))
    assert noise["confidence"] < real["confidence"]


def test_labels_from_captions():
    assert labels_from_captions(["a handwritten digit seven", "a handwritten digit zero"]) == [7, 0]
    assert labels_from_captions(["digit 3"], template="digit {digit}") == [3]
    with pytest.raises(ConfigError, match="template"):
        labels_from_captions(["a cat"])


# ---- FID / KID / IS -------------------------------------------------------------------------
def test_fid_of_identical_sets_is_near_zero_and_of_noise_is_large(digit_features):
    images, _ = real_digits("all", 16)
    a, logits_a = digit_features.extract(images[0::2])
    b, _ = digit_features.extract(images[1::2])
    noise, logits_n = digit_features.extract(torch.rand(600, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert abs(fid(a, a)) < 1e-3
    same_data = fid(a, b)  # two halves of the same data set: small
    assert 0 < same_data < 20
    assert fid(a, noise) > 20 * same_data
    assert kid(a, noise, subsets=10)[0] > 20 * abs(kid(a, b, subsets=10)[0])
    m_real = distribution_metrics(a, b, logits_a, kid_subsets=5)
    m_noise = distribution_metrics(a, noise, logits_n, kid_subsets=5)
    assert m_real["is_mean"] > 8 > 2 > m_noise["is_mean"]  # ten confident classes vs. nearly one


def test_inception_without_weights_says_which_file_goes_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    with pytest.raises(ConfigError) as e:
        InceptionFeatures()
    msg = str(e.value)
    assert "weights-inception-2015-12-05-6726825d.pth" in msg and str(tmp_path / "torch" / "hub" / "checkpoints") in msg
    assert "features=digits" in msg


def test_clip_features_and_clip_score_match_the_model(tiny_clip):
    from diffusion_lab.metrics.clip import clip_score
    from diffusion_lab.metrics.features import load_clip, to_uint8_rgb

    images, _ = real_digits("heldout", 32)
    images = images[:12]
    feats = ClipFeatures(str(tiny_clip))
    f, logits = feats.extract(images)
    assert f.shape == (12, 16) and logits is None
    assert abs(fid(f, f)) < 1e-3
    prompts = [f"a handwritten digit {w}" for w in ("one", "two", "three")] * 4
    model, processor = load_clip(str(tiny_clip))
    with torch.no_grad():
        batch = processor(text=prompts, images=list(to_uint8_rgb(images)), return_tensors="pt", padding=True)
        out = model(**batch)
    expected = (100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds)).clamp(min=0).mean()
    assert clip_score(images, prompts, str(tiny_clip)) == pytest.approx(float(expected), abs=1e-3)
    with pytest.raises(ConfigError, match="does not exist"):
        ClipFeatures(str(tiny_clip.parent / "missing"))


# ---- evaluate CLI ---------------------------------------------------------------------------
def _eval_cfg(tmp_path, *overrides):
    return compose_cfg("evaluate", ["device=cpu", "logger=none", "kid_subsets=10", *overrides], tmp_path)


def test_evaluate_pipeline_writes_json_logs_wandb_and_scores_its_own_folder(trained_pipeline, tmp_path):
    cfg = _eval_cfg(tmp_path / "gen", f"pipeline={trained_pipeline}", "sampler=ddim", "num_inference_steps=20", "num_images=200", "logger=wandb")
    result = run_evaluate(cfg)
    saved = json.loads((tmp_path / "gen" / "metrics.json").read_text())
    assert saved == json.loads(json.dumps(result))
    assert saved["schema_version"] == 1 and saved["features"] == "digits"
    assert saved["num_generated"] == 200 and saved["num_reference"] == 1797 and saved["resolution"] == 8
    for key in ("fid", "kid_mean", "kid_std", "is_mean", "is_std", "digit_confidence", "digit_marginal_entropy"):
        assert isinstance(saved["metrics"][key], float), key
    assert saved["generated"]["scheduler"] == "DDIMScheduler" and saved["generated"]["num_inference_steps"] == 20
    assert set(saved["digits"]) >= {"class_histogram", "confidence", "real_heldout"}
    assert saved["digits"]["real_heldout"]["accuracy"] > 0.97
    # W&B (offline): the metrics table is in the run's files
    tables = list((tmp_path / "gen" / "wandb").glob("offline-run-*/files/media/table/eval/metrics_*.table.json"))
    assert tables, sorted(p.name for p in (tmp_path / "gen" / "wandb").rglob("*"))
    table = json.loads(tables[0].read_text())
    assert table["columns"] == ["metric", "value"] and ["fid", saved["metrics"]["fid"]] in table["data"]

    # the written PNGs scored as a folder give (nearly) the same numbers: 8-bit rounding only
    again = run_evaluate(_eval_cfg(tmp_path / "folder", f"images_dir={tmp_path / 'gen' / 'samples'}"))
    assert again["num_generated"] == 200 and again["generated"]["kind"] == "folder"
    assert again["metrics"]["fid"] == pytest.approx(saved["metrics"]["fid"], rel=0.05)


def test_more_sampler_steps_are_not_worse_than_very_few(trained_pipeline, digit_features):
    from diffusers import DDPMPipeline

    from experiments.lib.samplers import compare_samplers

    pipe = DDPMPipeline.from_pretrained(trained_pipeline)
    real, _ = digit_features.extract(real_digits("all", 8)[0])
    rows, images = compare_samplers(pipe.unet.eval(), pipe.scheduler, real, digit_features, [("ddim", 2), ("ddim", 20), ("heun", 3)], num_images=200, kid_subsets=10)
    by = {(r["sampler"], r["steps"]): r for r in rows}
    assert by[("ddim", 2)]["nfe"] == 2 and by[("ddim", 20)]["nfe"] == 20
    assert by[("heun", 3)]["nfe"] == 5  # 2nd-order: two evaluations per step but the last
    assert by[("ddim", 20)]["fid"] < 0.7 * by[("ddim", 2)]["fid"], rows
    # matched seeds: the same x_T for every sampler, so the samples agree more than chance
    x2, x20 = images["ddim-2"], images["ddim-20"]
    assert (x2 - x20).pow(2).mean() < (x2 - x20.roll(1, 0)).pow(2).mean()


def test_text_to_image_gets_clip_score_and_prompt_accuracy(tiny_clip, tmp_path):
    from diffusion_lab.testing import tiny

    sd = tiny.build(tmp_path / "sd")
    cfg = _eval_cfg(
        tmp_path / "eval", f"pipeline={sd}", "data=digits_captioned", f"clip_model={tiny_clip}", "num_images=20", "batch_size=10",
        "num_inference_steps=2", "guidance_scale=1.0",
    )  # fmt: skip
    result = run_evaluate(cfg)
    m = result["metrics"]
    assert {"clip_score", "prompt_accuracy", "fid", "kid_mean"} <= set(m)
    assert 0 <= m["prompt_accuracy"] <= 1 and 0 <= m["clip_score"] <= 100
    assert result["generated"]["kind"] == "text-to-image" and result["resolution"] == 32
    prompts = (tmp_path / "eval" / "samples" / "prompts.txt").read_text().splitlines()
    assert len(prompts) == 20 and prompts[0].endswith("a handwritten digit eight")  # reference captions, sorted


def test_bad_input_is_one_paragraph_naming_the_fix(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TORCH_HOME": str(tmp_path / "torch"), "PYTHONPATH": str(ROOT)}
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run(
        [sys.executable, "-m", "diffusion_lab.evaluate", f"images_dir={empty}", "logger=none", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert f"images_dir={str(empty)!r} has no images" in p.stderr
    with pytest.raises(ConfigError, match="exactly one of"):
        run_evaluate(_eval_cfg(tmp_path / "e", f"images_dir={empty}", "pipeline=/x"))


# ---- training callback ----------------------------------------------------------------------
def test_fid_callback_logs_during_training(train_cfg):
    from diffusion_lab.train import train

    cfg = train_cfg("callbacks=with_fid", "data.resolution=8", "callbacks.fid.every_n_steps=2", "callbacks.fid.num_images=32", "callbacks.fid.num_reference=200")
    _, objs = train(cfg)
    cb = next(c for c in objs["trainer"].callbacks if type(c).__name__ == "FIDCallback")
    assert [h["step"] for h in cb.history] == [2, 4]
    assert all(h["val/fid"] > 0 for h in cb.history)
    import pandas as pd

    metrics = pd.read_csv(Path(cfg.paths.output_dir) / "csv" / "metrics.csv")
    logged = metrics.dropna(subset=["val/fid"])  # once per measurement, not repeated at later steps
    assert logged["step"].tolist() == [2, 4] and logged["val/fid"].tolist() == pytest.approx([h["val/fid"] for h in cb.history])
    assert logged["val/kid"].notna().all()
    assert float(objs["trainer"].callback_metrics["val/fid"]) == pytest.approx(cb.history[-1]["val/fid"])
