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
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from omegaconf import OmegaConf

from diffusion_lab.data.transforms import to_pil
from diffusion_lab.inference.generate import load_pixel_model
from diffusion_lab.metrics.digits import DigitClassifier


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


def make_pairs(images: torch.Tensor, out: Path, classifier: DigitClassifier, caption: str = "a handwritten digit", same_digit: bool = False) -> dict:
    """Pair ``images`` ``[2P, C, H, W]`` in [-1, 1] in order (``same_digit``: within each predicted
    digit), rank by ``classifier`` and write the folder."""
    probs = classifier.predict_proba(images)
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
            row = {"jpg_0": f"images/{2 * p:06d}.png", "jpg_1": f"images/{2 * p + 1:06d}.png", "label_0": label, "caption": caption,
                   "conf_0": round(float(conf_0[p]), 5), "conf_1": round(float(conf_1[p]), 5)}
            f.write(json.dumps(row) + "\n")
    winners = torch.where(torch.tensor(labels) >= 0.5, conf_0, conf_1)
    losers = torch.where(torch.tensor(labels) >= 0.5, conf_1, conf_0)
    return {"pairs": len(labels), "ties": labels.count(0.5), "confidence_winners": float(winners.mean()), "confidence_losers": float(losers.mean())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pipeline", required=True, help="an exported DDPMPipeline folder (the demo's <run>/pipeline)")
    p.add_argument("--pairs", type=int, default=512)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seed", type=int, default=1, help="of the samples (the study scores with seed 0: other images)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pairing", choices=["order", "same_digit"], default="order", help="order: samples 2i and 2i+1; same_digit: two samples of one predicted digit")
    p.add_argument("--out", required=True, help="the preference folder to write (data.root)")
    args = p.parse_args()

    model = load_pixel_model(OmegaConf.create({"pipeline": args.pipeline, "local_files_only": True}))
    images = model.generate(2 * args.pairs, args.batch_size, args.steps, args.seed, "cpu")
    stats = make_pairs(images, Path(args.out), DigitClassifier.load_or_train(verbose=False), same_digit=args.pairing == "same_digit")
    stats.update(source=args.pipeline, steps=args.steps, seed=args.seed, pairing=args.pairing)
    (Path(args.out) / "pairs.json").write_text(json.dumps(stats, indent=2))
    print(json.dumps(stats, indent=2))


if __name__ == "__main__":
    main()
