"""Make a preference folder (``data=preference``) from a digits pipeline, ranked by the digit classifier.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/make_pairs.py \
        --pipeline outputs/ddpm_digits/runs/<date>/pipeline --pairs 512 --out outputs/dpo_pairs

Draws ``2 x --pairs`` samples (``--steps`` of the pipeline's sampler, one seed), pairs them in
order (samples 2i and 2i+1), and prefers the one the digit classifier trained on real digits
(``diffusion_lab.metrics.digits``) is more confident about (higher max-class probability). Writes
``<out>/images/*.png`` and ``<out>/metadata.jsonl`` in Pick-a-Pic's columns (``jpg_0``, ``jpg_1``,
``label_0`` = 1 when jpg_0 wins, 0.5 on an exact tie, ``caption``), plus each image's confidence
(``conf_0``, ``conf_1``) for inspection. ``--pairing same_digit`` pairs only samples the classifier
reads as the same digit (in order within each digit; an odd one out is dropped), so the ranking
cannot prefer one digit over another.

A text-to-image pipeline (a folder whose ``model_index.json`` names a text encoder, e.g.
``experiment=ldm_digits``'s ``StableDiffusionPipeline``) is sampled two images per prompt instead,
the prompts being the ten digit captions in turn (``--template``), with its own sampler and
``--guidance``; the pair is ranked by the classifier's probability of the *prompted* digit (the
``reward=digit_classifier`` score), and ``caption`` is the prompt:

    OMP_NUM_THREADS=1 .venv/bin/python experiments/reward/make_pairs.py \
        --pipeline outputs/ldm_digits/pipeline --pairs 500 --out outputs/dpo_pairs_t2i
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffusion_lab.data.transforms import to_pil
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.metrics.digits import DIGIT_NAMES, DigitClassifier, labels_from_captions


def preference_labels(conf_0: torch.Tensor, conf_1: torch.Tensor) -> list[float]:
    """``label_0`` per pair: 1 when image 0 is the more confident one, 0 when image 1 is, 0.5 on a tie."""
    return [1.0 if a > b else 0.0 if a < b else 0.5 for a, b in zip(conf_0.tolist(), conf_1.tolist())]


def same_digit_order(digits: torch.Tensor) -> torch.Tensor:
    """Indices that put samples of the same ``digits`` ``[N]`` next to each other (in order within a
    digit, an odd one out of each digit dropped): consecutive indices then form same-digit pairs."""
    order = []
    for d in digits.unique().tolist():
        idx = (digits == d).nonzero().flatten()
        order.append(idx[: len(idx) // 2 * 2])
    return torch.cat(order)


def make_pairs(
    images: torch.Tensor, out: Path, classifier: DigitClassifier, caption: str = "a handwritten digit", same_digit: bool = False,
    prompts: list[str] | None = None, template: str = "a handwritten digit {name}",
) -> dict:
    """Pair ``images`` ``[2P, C, H, W]`` in [-1, 1] in order (``same_digit``: within each predicted
    digit), rank by ``classifier`` and write the folder. ``prompts`` ``[2P]`` (text-to-image; images
    2p and 2p+1 share one): rank by the probability of the prompted digit (``template``) and caption
    each pair with its prompt; without, by the most likely digit's probability, captioned ``caption``."""
    probs = classifier.predict_proba(images)
    if prompts is not None:
        if same_digit or prompts[0::2] != prompts[1::2]:
            raise ValueError("text-to-image pairs are two images of one prompt, in order (no --pairing same_digit)")
        labels = torch.as_tensor(labels_from_captions(prompts, template))
        conf = probs.gather(1, labels[:, None])[:, 0]
    else:
        if same_digit:
            order = same_digit_order(probs.argmax(dim=1))
            images, probs = images[order], probs[order]
        conf = probs.max(dim=1).values
    conf_0, conf_1 = conf[0::2], conf[1::2]
    labels = preference_labels(conf_0, conf_1)
    (out / "images").mkdir(parents=True, exist_ok=True)
    for i, im in enumerate(to_pil(images)):
        im.save(out / "images" / f"{i:06d}.png")
    with open(out / "metadata.jsonl", "w") as f:
        for p, label in enumerate(labels):
            row = {"jpg_0": f"images/{2 * p:06d}.png", "jpg_1": f"images/{2 * p + 1:06d}.png", "label_0": label, "caption": prompts[2 * p] if prompts else caption,
                   "conf_0": round(float(conf_0[p]), 5), "conf_1": round(float(conf_1[p]), 5)}
            f.write(json.dumps(row) + "\n")
    winners = torch.where(torch.tensor(labels) >= 0.5, conf_0, conf_1)
    losers = torch.where(torch.tensor(labels) >= 0.5, conf_1, conf_0)
    return {"pairs": len(labels), "ties": labels.count(0.5), "confidence_winners": float(winners.mean()), "confidence_losers": float(losers.mean())}


def is_text_to_image(pipeline: str) -> bool:
    """True when the pipeline folder's ``model_index.json`` has a text encoder."""
    index = Path(pipeline) / "model_index.json"
    return index.is_file() and "text_encoder" in json.loads(index.read_text())


def sample_text_pairs(pipeline: str, pairs: int, steps: int, guidance: float, seed: int, batch_size: int, template: str) -> tuple[torch.Tensor, list[str]]:
    """``2 x pairs`` images ``[2P, 3, H, W]`` of a text-to-image pipeline (its own sampler), two per
    prompt, the prompts the ten digit captions in turn; and the prompt of each image ``[2P]``."""
    from diffusers import DiffusionPipeline

    from diffusion_lab.inference.generate import generate_images

    pipe = DiffusionPipeline.from_pretrained(pipeline, local_files_only=True, safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    captions = [template.format(name=DIGIT_NAMES[p % 10]) for p in range(pairs)]
    prompts = [c for c in captions for _ in range(2)]
    drawn = generate_images(pipe, len(prompts), batch_size, steps, seed, prompts=prompts, guidance_scale=guidance)
    return drawn.images, drawn.prompts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="an exported DDPMPipeline folder (the demo's <run>/pipeline)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="of the samples (the study scores with seed 0: other images)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pairing", choices=["order", "same_digit"], default="order", help="order: samples 2i and 2i+1; same_digit: two samples of one predicted digit")
    p.add_argument("--guidance", type=float, default=3.0, help="text-to-image pipelines: classifier-free guidance (the digits stack samples with 3)")
    p.add_argument("--template", default="a handwritten digit {name}", help="text-to-image pipelines: the prompt of each digit")
    p.add_argument("--out", required=True, help="the preference folder to write (data.root)")
    args = p.parse_args()

    classifier = DigitClassifier.load_or_train(verbose=False)
    if is_text_to_image(args.pipeline):
        images, prompts = sample_text_pairs(args.pipeline, args.pairs, args.steps, args.guidance, args.seed, args.batch_size, args.template)
        stats = make_pairs(images, Path(args.out), classifier, prompts=prompts, template=args.template)
        stats.update(guidance=args.guidance, template=args.template)
    else:
        model = load_pixel_model(args.pipeline, local_files_only=True)
        images = model.generate(2 * args.pairs, args.batch_size, args.steps, args.seed, "cpu")
        stats = make_pairs(images, Path(args.out), classifier, same_digit=args.pairing == "same_digit")
    stats.update(source=args.pipeline, steps=args.steps, seed=args.seed, pairing=args.pairing)
    (Path(args.out) / "pairs.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
