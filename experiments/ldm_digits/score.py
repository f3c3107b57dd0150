"""Score the digits latent stack with the digit classifier trained on real digits.

    OMP_NUM_THREADS=1 .venv/bin/python experiments/ldm_digits/score.py --pipeline outputs/ldm_digits/pipeline
    OMP_NUM_THREADS=1 .venv/bin/python experiments/ldm_digits/score.py --ckpt <run dir>/checkpoints/step_000500.ckpt
    OMP_NUM_THREADS=1 .venv/bin/python experiments/ldm_digits/score.py --pipeline outputs/ldm_digits/pipeline \
        --lora outputs/ldm_digits/lora --trigger thick --out experiments/ldm_digits/results/lora_thick

For each digit k, ``--per-class`` samples of "a handwritten digit k" (``--sampler``, default
DPM-Solver++, ``--steps``, classifier-free guidance ``--guidance``), classified -> per-class and
overall accuracy. Also the
classifier's accuracy on the pipeline VAE's reconstructions of held-out real digits (what the
first stage alone loses). With ``--lora``: the same prompts with and without the trigger word;
the concept is measured by mean brightness (ink) and classifier accuracy, next to the same
numbers on real digits drawn thick (``--trigger thick``) or on the samples inverted back
(``--trigger inverted``). Writes results.json, results.md and grids into a new
outputs/experiments/ldm_digits/<date>_<time>/, or ``--out`` (``--out experiments/ldm_digits/results/base``
refreshes the committed results).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.data.transforms import image_grid
from diffusion_lab.diffusion.sampling import load_sampler
from diffusion_lab.export import build_pipeline
from diffusion_lab.inference.checkpoints import load_module
from diffusion_lab.inference.generate import generate_images
from diffusion_lab.metrics.digits import DIGIT_NAMES, DigitClassifier, real_digits
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402


def prompts_for(template: str) -> list[str]:
    return [template.format(name=name) for name in DIGIT_NAMES]


def generate(pipe, prompts: list[str], per_class: int, steps: int, guidance: float, seed: int, batch_size: int) -> torch.Tensor:
    """``[10 * per_class, 3, H, W]`` in [-1, 1]: digit k at rows ``k * per_class ...``."""
    wanted = [p for p in prompts for _ in range(per_class)]
    return generate_images(pipe, len(wanted), batch_size, steps, seed, prompts=wanted, guidance_scale=guidance).images


def accuracy_table(classifier: DigitClassifier, images: torch.Tensor, per_class: int) -> dict:
    """Per-class and overall accuracy; ``mean_brightness`` in [0, 1]."""
    labels = torch.arange(10).repeat_interleave(per_class)
    pred = classifier.predict_proba(images).argmax(-1)
    per = [float((pred[labels == k] == k).float().mean()) for k in range(10)]
    return {"overall": float((pred == labels).float().mean()), "per_class": per, "mean_brightness": float((images.mean() + 1) / 2)}


def grid(images: torch.Tensor, per_class: int, path: Path, cols: int = 10) -> None:
    """Rows = digits 0..9, ``cols`` samples each."""
    rows = [images[k * per_class : k * per_class + cols] for k in range(10)]
    image_grid(torch.cat(rows), rows=10).save(path)


def real_thick_reference(classifier: DigitClassifier, resolution: int) -> dict:
    """Classifier accuracy and mean brightness on all real digits drawn thick (the LoRA's data)."""
    from diffusion_lab.data.digits import DigitsDataset
    from diffusion_lab.data.transforms import ImageTransform

    ds = DigitsDataset(ImageTransform(resolution, mode="RGB", warn_upscale=False), thicken=True)
    images = torch.stack([ds[i]["pixel_values"] for i in range(len(ds))])
    pred = classifier.predict_proba(images).argmax(-1)
    return {"overall": float((pred == torch.as_tensor(ds.labels)).float().mean()), "mean_brightness": float((images.mean() + 1) / 2), "n": len(ds)}


def vae_reconstruction_accuracy(pipe, classifier: DigitClassifier) -> dict:
    """Classifier accuracy on held-out real digits and on the VAE's reconstructions of them."""
    real, labels = real_digits("heldout", pipe.vae.config.sample_size)
    rgb = real.repeat(1, pipe.vae.config.in_channels, 1, 1)
    with torch.no_grad():
        recon = pipe.vae.decode(pipe.vae.encode(rgb).latent_dist.mode()).sample.clamp(-1, 1)
    acc = lambda x: float((classifier.predict_proba(x).argmax(-1) == labels).float().mean())  # noqa: E731
    return {"real": acc(real), "reconstructed": acc(recon), "l1": float((recon - rgb).abs().mean()), "n": len(labels)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--pipeline", help="exported StableDiffusionPipeline folder (experiment=ldm_digits)")
    src.add_argument("--ckpt", help="or a Lightning checkpoint of experiment=ldm_digits (EMA weights)")
    p.add_argument("--lora", default=None, help="LoRA folder (experiment=ldm_digits_lora)")
    p.add_argument("--trigger", default="thick", help="trigger word of the LoRA concept")
    p.add_argument("--template", default="a handwritten digit {name}")
    p.add_argument("--per-class", type=int, default=50)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sampler", default="dpmpp", help="a conf/sampler option (dpmpp, ddim, pndm, euler, unipc, ...)")
    add_out_argument(p, "ldm_digits", "experiments/ldm_digits/results/base")
    args = p.parse_args()

    from diffusers import StableDiffusionPipeline

    if args.ckpt:
        pipe = build_pipeline(load_module(args.ckpt))
    else:
        pipe = StableDiffusionPipeline.from_pretrained(args.pipeline, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = load_sampler(args.sampler).scheduler(pipe.scheduler)
    pipe.set_progress_bar_config(disable=True)
    classifier = DigitClassifier.load_or_train()
    out = run_dir(args.out, "ldm_digits")
    sample = lambda template: generate(pipe, prompts_for(template), args.per_class, args.steps, args.guidance, args.seed, args.batch_size)  # noqa: E731

    results = {k: v for k, v in vars(args).items() if k != "out"}
    results["scaling_factor"] = float(pipe.vae.config.scaling_factor)
    results["vae"] = vae_reconstruction_accuracy(pipe, classifier)
    results["classifier_heldout_accuracy"] = classifier.heldout_accuracy
    t0 = time.perf_counter()
    if args.lora:
        base = sample(args.template)  # the base pipeline, before the LoRA is loaded
        pipe.load_lora_weights(args.lora)
    plain = sample(args.template)
    results["prompt"] = accuracy_table(classifier, plain, args.per_class)
    grid(plain, args.per_class, out / "samples.png")
    if args.lora:
        results["base_prompt"] = accuracy_table(classifier, base, args.per_class)
        trigger_template = f"{args.template} {args.trigger}"
        concept = sample(trigger_template)
        results["trigger_prompt"] = accuracy_table(classifier, concept, args.per_class)
        if args.trigger == "thick":  # what the classifier makes of *real* thick digits: the ceiling
            results["real_thick_reference"] = real_thick_reference(classifier, pipe.vae.config.sample_size)
        if args.trigger == "inverted":
            results["trigger_prompt_inverted_back"] = accuracy_table(classifier, -concept, args.per_class)
        results["trigger_template"] = trigger_template
        grid(base, args.per_class, out / "samples_base.png")
        grid(concept, args.per_class, out / "samples_trigger.png")
    results["sampling_seconds"] = round(time.perf_counter() - t0, 1)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote results.json, results.md and grids to {out}")


def markdown(r: dict) -> str:
    """The results as Markdown tables."""
    rows = [
        f"VAE scaling_factor {r['scaling_factor']:.4f}; classifier on held-out real digits {r['vae']['real']:.3f}, "
        f"on their VAE reconstructions {r['vae']['reconstructed']:.3f} (L1 {r['vae']['l1']:.4f}, n={r['vae']['n']})",
        "",
        f"{r['per_class']} samples per digit, {r['steps']} steps of sampler={r.get('sampler', 'dpmpp')}, guidance {r['guidance']}:",
        "",
        "| prompt | overall | " + " | ".join(str(k) for k in range(10)) + " | mean brightness |",
        "|---|---|" + "---|" * 10 + "---|",
    ]
    names = [("prompt", "LoRA loaded, no trigger" if r.get("lora") else f"{r['template'].format(name='k')!r}")]
    if r.get("lora"):
        names = [("base_prompt", "base pipeline (no LoRA)")] + names
        names += [("trigger_prompt", f"LoRA, {r['trigger_template'].format(name='k')!r}")]
        if "trigger_prompt_inverted_back" in r:
            names += [("trigger_prompt_inverted_back", "LoRA + trigger, samples inverted back")]
    for key, label in names:
        t = r[key]
        rows.append(f"| {label} | **{t['overall']:.3f}** | " + " | ".join(f"{a:.2f}" for a in t["per_class"]) + f" | {t['mean_brightness']:.3f} |")
    if "real_thick_reference" in r:
        ref = r["real_thick_reference"]
        rows.append(f"| real digits drawn thick (the LoRA's data, n={ref['n']}) | **{ref['overall']:.3f}** |" + " |" * 10 + f" {ref['mean_brightness']:.3f} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    main()
