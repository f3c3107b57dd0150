"""The second stages of the digits text-to-image stack (issue #27): experiment=distill_ldm_digits,
grpo_ldm_digits and dpo_ldm_digits, each 2 steps of the real config on a tiny stack built by
tests/test_ldm_digits.py's ``stack`` fixture (2 steps of vae_digits, then of ldm_digits), and the
text-to-image pairs of experiments/reward/make_pairs.py."""

import importlib.util
import json
import sys
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel

from diffusion_lab.metrics.digits import DIGIT_NAMES, DigitClassifier, real_digits
from diffusion_lab.train import train

from tests.conftest import compose_cfg
from tests.test_ldm_digits import stack  # noqa: F401  (the module-scoped fixture: a tiny stack_dir)

REPO = Path(__file__).resolve().parents[1]
CAPTIONS = [f"a handwritten digit {name}" for name in DIGIT_NAMES]
# 2 steps, small batches, no latent cache (it would encode every digit for two steps)
SHORT = [
    "trainer.max_steps=2", "trainer.log_every_n_steps=1", "data.batch_size=8", "model.cache=false", "model.preview_steps=2",
    "callbacks.sample_grid.every_n_steps=2", "callbacks.sample_grid.num_images=2", "callbacks.model_checkpoint.every_n_train_steps=2",
    "callbacks.progress_bar=null",
]


def _make_pairs_script():
    spec = importlib.util.spec_from_file_location("experiment_reward_make_pairs", REPO / "experiments" / "reward" / "make_pairs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _moved(run: Path, start: Path) -> bool:
    """True when the exported UNet differs from the starting pipeline's."""
    a, b = UNet2DConditionModel.from_pretrained(run / "pipeline" / "unet").state_dict(), UNet2DConditionModel.from_pretrained(start / "unet").state_dict()
    return not all(torch.equal(a[k], b[k]) for k in b)


def test_distill_ldm_digits_exports_an_lcm_student_that_sample_draws_in_2_steps(stack, tmp_path, capsys):  # noqa: F811
    from diffusion_lab.sample import run as run_sample

    cfg = compose_cfg("train", ["experiment=distill_ldm_digits", f"stack_dir={stack['root']}", *SHORT], tmp_path / "run")
    _, objects = train(cfg)
    method = objects["model"].method
    assert method.guidance == (3.0, 3.0) and method.target is not None  # guided teacher, EMA target (full fine-tune)
    run = Path(cfg.paths.output_dir)
    assert json.loads((run / "pipeline" / "diffusion_lab.json").read_text()) == {"num_inference_steps": 2, "guidance_scale": 1.0}
    assert json.loads((run / "pipeline" / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    assert _moved(run, stack["root"] / "pipeline")
    # every part but the UNet is the stack's: the pipeline's own tokenizer reads the digit words
    assert (run / "pipeline" / "tokenizer" / "tokenizer.json").read_text() == (stack["root"] / "pipeline" / "tokenizer" / "tokenizer.json").read_text()
    capsys.readouterr()
    sample_cfg = compose_cfg("sample", [f"pipeline={run / 'pipeline'}", "prompt=a handwritten digit seven", "num_images=2",
                                        f"out_dir={tmp_path / 'samples'}"], tmp_path / "samples")  # fmt: skip
    run_sample(sample_cfg)
    # no steps or guidance given: the student's recorded 2 steps, unguided (its teacher's guidance is distilled in)
    assert "LCMScheduler, 2 steps, guidance 1.0" in capsys.readouterr().out and len(list((tmp_path / "samples").glob("0*.png"))) == 2


def test_grpo_ldm_digits_scores_groups_of_the_prompted_digit(stack, tmp_path):  # noqa: F811
    shrink = ["method.group_size=2", "method.prompts_per_step=3", "method.num_inference_steps=3", "method.timesteps_per_step=1"]
    cfg = compose_cfg("train", ["experiment=grpo_ldm_digits", f"stack_dir={stack['root']}", *SHORT, *shrink], tmp_path / "run")
    _, objects = train(cfg)
    method = objects["model"].method
    prompts = method._buffer["cond_batch"]["caption"]
    # 3 groups of 2: each group one of the ten digit captions (from data=digits_captioned)
    assert len(prompts) == 6 and prompts[0::2] == prompts[1::2] and set(prompts) <= set(CAPTIONS)
    # the reward is the probability of the prompted digit: other prompts give other scores for one image
    image = real_digits("heldout", 16)[0][:1].repeat(1, 3, 1, 1)
    scores = method.reward(image.repeat(10, 1, 1, 1), CAPTIONS)
    assert torch.allclose(scores.sum(), torch.tensor(1.0), atol=1e-4) and scores.max() > 0.5
    logged = objects["trainer"].logged_metrics
    assert 0 <= float(logged["train/reward_mean"]) <= 1 and float(logged["train/kl"]) >= 0
    run = Path(cfg.paths.output_dir)
    assert _moved(run, stack["root"] / "pipeline") and not (run / "pipeline" / "diffusion_lab.json").exists()


def test_text_pairs_are_ranked_by_the_prompted_digit(tmp_path):
    """A real three and a real seven under the prompt "seven": the seven wins, however sure the
    classifier is of the three (the unconditional ranking, by the most likely digit, could not tell)."""
    mp = _make_pairs_script()
    images, labels = real_digits("heldout", 16)
    classifier = DigitClassifier.load_or_train(verbose=False)
    probs = classifier.predict_proba(images)
    sure = lambda d: int(((labels == d) & (probs.argmax(-1) == d)).nonzero()[probs[(labels == d) & (probs.argmax(-1) == d), d].argmax()])  # noqa: E731
    three, seven = sure(3), sure(7)
    pair = images[[three, seven]].repeat(1, 3, 1, 1)
    prompts = ["a handwritten digit seven"] * 2
    stats = mp.make_pairs(torch.cat([pair, pair.flip(0)]), tmp_path, classifier, prompts=prompts * 2)
    rows = [json.loads(line) for line in (tmp_path / "metadata.jsonl").read_text().splitlines()]
    assert [r["label_0"] for r in rows] == [0.0, 1.0] and {r["caption"] for r in rows} == {"a handwritten digit seven"}
    assert stats["confidence_winners"] > 0.5 > stats["confidence_losers"]


def test_dpo_ldm_digits_trains_on_pairs_of_the_stacks_own_samples(stack, tmp_path):  # noqa: F811
    mp = _make_pairs_script()
    pipeline = str(stack["root"] / "pipeline")
    assert mp.is_text_to_image(pipeline)
    images, prompts = mp.sample_text_pairs(pipeline, pairs=12, steps=2, guidance=3.0, seed=1, batch_size=24, template="a handwritten digit {name}")
    assert images.shape == (24, 3, 16, 16) and prompts[:4] == [CAPTIONS[0]] * 2 + [CAPTIONS[1]] * 2
    pairs = tmp_path / "pairs"
    mp.make_pairs(images, pairs, DigitClassifier.load_or_train(verbose=False), prompts=prompts)
    cfg = compose_cfg("train", ["experiment=dpo_ldm_digits", f"stack_dir={stack['root']}", f"data.root={pairs}", *SHORT, "data.batch_size=4"], tmp_path / "run")
    _, objects = train(cfg)
    logged = objects["trainer"].logged_metrics
    assert "train/dpo_accuracy" in logged and torch.isfinite(torch.as_tensor(logged["train/loss"]))
    assert _moved(Path(cfg.paths.output_dir), stack["root"] / "pipeline")
