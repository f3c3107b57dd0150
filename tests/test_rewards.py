"""Rewards as parts (reward=, issue #27): the digit classifier prefers real digits to noise and the
prompted digit to another; CLIP score and a local scorer folder run through their configs and give
the model's own numbers; bad folders are ConfigErrors naming the key."""

from __future__ import annotations

import pytest
import torch
from hydra.utils import instantiate

from diffusion_lab.metrics.digits import real_digits
from diffusion_lab.data.digits import DIGIT_NAMES
from diffusion_lab.utils.errors import ConfigError
from tests.conftest import compose_cfg
from tests.test_evaluate import tiny_clip  # noqa: F401  (fixture: a random CLIP folder, offline)


def _reward(tmp_path, name: str, *overrides: str):
    return instantiate(compose_cfg("train", [f"reward={name}", *overrides], tmp_path).reward)


def test_digit_reward_prefers_real_digits_and_the_prompted_digit(tmp_path):
    reward = _reward(tmp_path, "digit_classifier")
    images, labels = real_digits("heldout", 8)
    images, labels = images[:64], labels[:64]
    noise = torch.rand_like(images) * 2 - 1
    real, fake = reward(images), reward(noise)
    # the classifier is fairly sure of *some* digit even in uniform noise (~0.86): an any-digit reward
    # can be raised off the data manifold, which is why the study reports FID beside it
    assert real.shape == (64,) and real.mean() > 0.98 and real.mean() > fake.mean() + 0.05
    right = [f"a handwritten digit {DIGIT_NAMES[int(y)]}" for y in labels]
    wrong = [f"a handwritten digit {DIGIT_NAMES[(int(y) + 1) % 10]}" for y in labels]
    assert reward(images, right).mean() > 0.9 > 0.2 > reward(images, wrong).mean()
    with pytest.raises(ConfigError, match="caption"):
        reward(images[:1], ["a cat"])


def test_clip_reward_runs_on_a_tiny_clip_and_is_the_clip_score(tmp_path, tiny_clip):  # noqa: F811
    from diffusion_lab.metrics.clip import clip_score

    reward = _reward(tmp_path, "clip_score", f"reward.model={tiny_clip}")
    images, _ = real_digits("heldout", 32)
    prompts = [f"a handwritten digit {w}" for w in ("one", "two", "three")] * 2
    scores = reward(images[:6], prompts)
    assert scores.shape == (6,) and torch.isfinite(scores).all()
    for i in (0, 4):  # each image's score is the torchmetrics CLIP score of that image alone (which clamps at 0)
        assert max(float(scores[i]), 0.0) == pytest.approx(clip_score(images[i : i + 1], prompts[i : i + 1], str(tiny_clip)), abs=1e-3)
    from diffusion_lab.rewards.clip import CLIPScoreReward

    with pytest.raises(ConfigError, match="reward.model="):
        CLIPScoreReward(str(tmp_path / "missing"))


@pytest.fixture(scope="module")
def tiny_scorer(tmp_path_factory):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    torch.manual_seed(0)
    config = ViTConfig(image_size=16, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=37,
                       num_labels=2, id2label={0: "bad", 1: "good"}, label2id={"bad": 0, "good": 1})  # fmt: skip
    out = tmp_path_factory.mktemp("scorer") / "scorer"
    ViTForImageClassification(config).save_pretrained(out)
    ViTImageProcessor(size={"height": 16, "width": 16}).save_pretrained(out)
    return out


def test_local_scorer_is_the_chosen_logit(tmp_path, tiny_scorer):
    from transformers import ViTForImageClassification, ViTImageProcessor

    from diffusion_lab.metrics.features import to_uint8_rgb

    images, _ = real_digits("heldout", 16)
    images = images[:5]
    reward = _reward(tmp_path, "local", f"reward.path={tiny_scorer}", "reward.label=good")
    model, processor = ViTForImageClassification.from_pretrained(tiny_scorer), ViTImageProcessor.from_pretrained(tiny_scorer)
    with torch.no_grad():
        logits = model(**processor(images=list(to_uint8_rgb(images)), return_tensors="pt")).logits
    torch.testing.assert_close(reward(images), logits[:, 1])
    probs = _reward(tmp_path, "local", f"reward.path={tiny_scorer}", "reward.label=0", "reward.activation=softmax")(images)
    torch.testing.assert_close(probs, logits.softmax(-1)[:, 0])


def test_bad_scorer_folder_or_label_is_a_config_error_naming_the_key(tmp_path, tiny_scorer):
    from diffusion_lab.rewards.local import LocalScorer

    with pytest.raises(ConfigError, match="reward.path="):
        LocalScorer(str(tmp_path / "nothing"))
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    with pytest.raises(ConfigError, match="reward.path="):
        LocalScorer(str(tmp_path / "broken"))
    with pytest.raises(ConfigError, match="reward.label='ugly'"):
        LocalScorer(str(tiny_scorer), label="ugly")
