"""Each family learns, not only runs: every text-to-image family's tiny pipeline, fully fine-tuned on captioned
digits for the same training CPU time, then scored by the project's digit classifier on prompted samples.

    .venv/bin/python experiments/families/run.py build     # tiny pipelines at 16 px (Sana 32; tiny_sd --kind), edit pairs
    .venv/bin/python experiments/families/run.py vaes      # each VAE layout trained on digits (model=autoencoder_pretrained)
    .venv/bin/python experiments/families/run.py train     # every family, two at a time, one thread each
    .venv/bin/python experiments/families/run.py score --out experiments/families   # refresh the committed results

Why the VAEs are trained first: a tiny pipeline's VAE is random, so its decoded samples are noise whatever the
backbone learned. Each latent layout (AutoencoderKL 4 and 16 channels, AutoencoderKLQwenImage, AutoencoderDC,
AutoencoderKLFlux2) is trained on the digits once (``model=autoencoder_pretrained``, same architecture as the tiny
pipeline's, normalisation measured and written where the family reads it) and copied into each family's pipeline.
The text encoders stay the tiny pipelines' random, frozen ones: a prompt can only be followed if its states reach
the backbone, which is what this study checks (a broken text path scores 10%, chance).

The edit families (Qwen-Image-Edit, FLUX.1 Kontext) train on pairs whose source is a random digit of another class
and whose target is the captioned digit, so following the prompt (not copying the source) is what scores.

Scoring: 20 samples of "a handwritten digit k" for each k (200), 20 steps of the family's trained sampler,
classifier-free guidance 3 (FLUX.1 / Kontext: the embedded guidance they trained with, 3.5), EMA weights of the last checkpoint; prompt
accuracy = classifier's class == k. Validation loss (fixed noise, the run's held-out split) before = the pipeline as
built, after = the last checkpoint. Writes results.json, results.md and samples.png (a row of 0..9 per family) to
a new outputs/experiments/families/<date>_<time>/ (or --out).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
# family -> the VAE layout it shares (trained once, from the first family's tiny VAE)
LAYOUTS = {
    "kl4": ["sd", "sdxl"],
    "kl16": ["sd3", "flux", "flux_kontext", "chroma", "z_image"],
    "qwen": ["qwen_image", "qwen_image_edit"],
    "dc": ["sana"],
    "flux2": ["flux2"],
    "dc32": ["sana_f32"],  # a diagnostic variant's own first stage (DEEPER below)
}
LAYOUT_OF = {f: layout for layout, fams in LAYOUTS.items() for f in fams}
RESOLUTION = {"dc": 32, "dc32": 32}  # SanaPipeline takes sizes divisible by 32; every other layout trains at 16 px
EDIT = {
    "qwen_image_edit": ["model.family.source_key=source_pixel_values"],
    "flux_kontext": ["model.family.source_key=source_pixel_values", "data.control=null"],
}
# diagnostic runs: name -> (family, extra overrides)
VARIANTS = {
    "sd3_shift1": ("sd3", ["process.scheduler.shift=1.0"]),  # SD3's 3.0 shift at 16 px: most training at high noise?
    "sd3_long": ("sd3", []),  # trained with --cpu-seconds 600: is SD3 only slower to learn?
    "sana_no_instruction": ("sana", ["text_encoder.complex_human_instruction=null"]),  # the 160-token instruction prefix
    "sana_long": ("sana", []),  # --cpu-seconds 600
    "sana_no_cache": ("sana", ["model.cache=false"]),  # text states encoded every step instead of cached once
    "sana_no_instruction_long": ("sana", ["text_encoder.complex_human_instruction=null"]),  # --cpu-seconds 600
    "sana_posembed": ("sana", []),  # backbone below: is it the 64 latent tokens without positions?
    "sana_patch2": ("sana", []),  # ... or their number?
    "sana_one_token": ("sana", []),
    "sana_f32": ("sana", []),  # Sana's real 32x DC-AE depth: 1x1 latents at 32 px
}
FAMILIES = [f for fams in LAYOUTS.values() for f in fams if f not in VARIANTS]
# diagnostic pipelines: the family's pipeline (same trained VAE, same text encoder) with its backbone rebuilt from
# these config changes. Sana's 8x8 latents (patch 1) are 64 tokens with no positional embedding; the other
# transformers see 16 (8x8 latents packed 2x2, or patch 2), with positions.
BACKBONES = {
    "sana_posembed": {"interpolation_scale": 1},  # SanaTransformer2DModel's sin-cos positions (Sana 4K has them)
    "sana_patch2": {"patch_size": 2},  # 16 tokens, as the other transformers here
    "sana_one_token": {"patch_size": 8},  # the whole 8x8 latent as one patch: a single token
}
COMMON = ["data.batch_size=32", "trainer.max_steps=100000", "trainer.max_time=null", "trainer.val_check_interval=100000",
          "trainer.limit_val_batches=null", "callbacks.model_checkpoint.every_n_train_steps=100000", "callbacks.progress_bar=null",
          "callbacks.sample_grid=null", "lr_scheduler@model.lr_scheduler=constant_with_warmup", "model.lr_scheduler.num_warmup_steps=50",
          "callbacks.ema.decay=0.995"]


def build(args) -> None:
    runs = Path(args.runs)
    for family in FAMILIES:
        out = runs / "tiny" / family
        if not out.exists():
            size = str(RESOLUTION.get(LAYOUT_OF[family], 16))
            subprocess.run([sys.executable, "-m", "diffusion_lab.tiny_sd", str(out), "--kind", family, "--resolution", size], check=True, cwd=ROOT)
    for name, deeper in DEEPER.items():
        if not (runs / "tiny" / name).exists():
            deeper(runs / "tiny" / VARIANTS[name][0], runs / "tiny" / name)
    edit_pairs(runs / "edit_pairs")


def sana_f32(tiny: Path, out: Path) -> None:
    """The tiny Sana pipeline with a DC-AE as deep as Sana's (6 stages: 32x; the tiny pipeline's has 3: 4x) and a
    transformer for its 1x1 latents at 32 px: one token."""
    from diffusion_lab.testing.sana import tiny_dc_ae, tiny_sana_transformer

    shutil.copytree(tiny, out)
    for part in ("vae", "transformer"):
        shutil.rmtree(out / part)
    six = dict(encoder_block_types=("ResBlock",) * 3 + ("EfficientViTBlock",) * 3, encoder_block_out_channels=(8, 16, 32, 32, 32, 32),
               encoder_layers_per_block=(1,) * 6, encoder_qkv_multiscales=((),) * 3 + ((5,),) * 3)
    tiny_dc_ae(**six, **{k.replace("encoder", "decoder"): v for k, v in six.items()}).save_pretrained(out / "vae")
    tiny_sana_transformer(sample_size=1).save_pretrained(out / "transformer")


# variants whose tiny pipeline is the family's rebuilt with another first stage: name -> builder(family tiny, out)
DEEPER = {"sana_f32": sana_f32}


def edit_pairs(root: Path) -> None:
    """An image folder of the 1,797 digits (8x8 PNGs, as ``DigitsDataset`` reads them) whose metadata.jsonl gives
    each target a source: a random digit of another class (seeded)."""
    from PIL import Image

    from diffusion_lab.data.digits import DigitsDataset

    digits = DigitsDataset(transform=None)
    labels = torch.as_tensor(digits.labels)
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True, exist_ok=True)
    rows = []
    for i, label in enumerate(labels.tolist()):
        Image.fromarray(digits.images[i], "L").save(root / f"{i:04d}.png")
        others = torch.nonzero(labels != label).flatten()
        j = int(others[torch.randint(len(others), (1,), generator=g)])
        rows.append({"file_name": f"{i:04d}.png", "source_image": f"{j:04d}.png", "text": digits.caption(label)})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def vaes(args) -> None:
    from experiments.lib.cpu_jobs import train_jobs

    runs = Path(args.runs)
    budget = f"+callbacks.cpu_budget={{_target_:experiments.lib.cpu_budget.CPUTimeBudget,seconds:{args.vae_cpu_seconds}}}"
    jobs = {
        layout: ["experiment=vae_digits", "model=autoencoder_pretrained", f"model.vae.pretrained={runs / 'tiny' / fams[0]}", f"stack_dir={runs / 'vaes' / layout}",
                 f"data.resolution={RESOLUTION.get(layout, 16)}", "trainer.max_steps=800", "callbacks.progress_bar=null", budget]
        for layout, fams in LAYOUTS.items()
        if args.force or not (runs / "vaes" / layout / "vae").exists()
    }
    train_jobs(jobs, runs / "vae_runs", parallel=2, quiet=True, cwd=str(ROOT))
    for layout, fams in LAYOUTS.items():
        for family in fams:
            target = runs / "pipelines" / family
            shutil.rmtree(target, ignore_errors=True)
            shutil.copytree(runs / "tiny" / family, target)
            shutil.rmtree(target / "vae")
            shutil.copytree(runs / "vaes" / layout / "vae", target / "vae")
    backbone_variants(runs)


def backbone_variants(runs: Path) -> None:
    """``pipelines/<variant>``: the family's pipeline with its backbone rebuilt (seed 0) from ``BACKBONES``."""
    import diffusers

    for name, changes in BACKBONES.items():
        family, target = VARIANTS[name][0], runs / "pipelines" / name
        shutil.rmtree(target, ignore_errors=True)
        shutil.copytree(runs / "pipelines" / family, target)
        folder = next(sub for sub in ("transformer", "unet") if (target / sub).exists())
        config = json.loads((target / folder / "config.json").read_text())
        torch.manual_seed(0)
        backbone = getattr(diffusers, config["_class_name"]).from_config({**config, **changes})
        shutil.rmtree(target / folder)
        backbone.save_pretrained(target / folder)


def overrides(name: str, runs: Path) -> list[str]:
    family, variant = VARIANTS.get(name, (name, []))
    extra = ["data=image_folder", f"data.root={runs / 'edit_pairs'}", "data.caption_column=text", "data.val_fraction=0.1",
             "data.paired_images={source_image: source_pixel_values}", *EDIT[family]] if family in EDIT else []
    resolution = RESOLUTION.get(LAYOUT_OF.get(name, LAYOUT_OF[family]), 16)
    pipeline = name if name in BACKBONES or name in DEEPER else family
    return [f"experiment={family}_finetune_tiny", f"model.pretrained={runs / 'pipelines' / pipeline}", f"data.resolution={resolution}", *COMMON, *extra, *variant]


def train(args) -> None:
    from experiments.lib.cpu_jobs import train_jobs

    runs = Path(args.runs)
    budget = f"+callbacks.cpu_budget={{_target_:experiments.lib.cpu_budget.CPUTimeBudget,seconds:{args.cpu_seconds}}}"
    families = args.families or FAMILIES
    jobs = {family: [*overrides(family, runs), budget] for family in families}
    train_jobs(jobs, runs / "runs", parallel=args.parallel, quiet=True, cwd=str(ROOT))


def val_loss(module, cfg) -> float:
    import pytorch_lightning as pl
    from hydra.utils import instantiate

    dm = instantiate(cfg.data.datamodule)
    trainer = pl.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    return float(trainer.validate(module, datamodule=dm, verbose=False)[0]["val/loss"])


@torch.no_grad()
def prompted_samples(module, family: str, per_class: int, steps: int, guidance: float, seed: int, runs: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """``[10 * per_class, 3, H, W]``: "a handwritten digit k" for k = 0..9 in turn, and the labels asked for.
    Edit families get a held-out digit of another class as the source."""
    from diffusion_lab.metrics.digits import DIGIT_NAMES, real_digits

    labels = torch.arange(10).repeat(per_class)
    batch = {"caption": [f"a handwritten digit {DIGIT_NAMES[k]}" for k in labels.tolist()]}
    if family in EDIT:
        real, real_labels = real_digits("heldout", 16)
        g = torch.Generator().manual_seed(seed + 1)
        picks = [int(torch.nonzero(real_labels != k).flatten()[torch.randint(int((real_labels != k).sum()), (1,), generator=g)]) for k in labels.tolist()]
        batch["source_pixel_values"] = real[picks].repeat(1, 3, 1, 1)
    images, guidance = [], guidance if module.family.cfg else None  # None: the embedded guidance it trained with
    for b in range(0, len(labels), 50):
        part = {k: v[b : b + 50] for k, v in batch.items()}
        g = torch.Generator().manual_seed(seed + b)
        images.append(module.generate(len(part["caption"]), num_inference_steps=steps, generator=g, cond_batch=part, guidance_scale=guidance))
    return torch.cat(images), labels


@torch.no_grad()
def reconstruction_accuracy(module, classifier, resolution: int) -> float:
    """The classifier's accuracy on held-out real digits passed through the family's codec (encode, decode): the
    ceiling the first stage puts on prompt accuracy."""
    from diffusion_lab.metrics.digits import real_digits

    real, labels = real_digits("heldout", resolution)
    recon = module.codec.decode(module.codec.encode(real.repeat(1, 3, 1, 1), sample=False))
    return float((classifier.predict_proba(recon).argmax(-1) == labels).float().mean())


@torch.no_grad()
def text_difference(module) -> float:
    """How much the frozen text states of "a handwritten digit zero" and of each other digit differ: relative
    L2 distance of the family's first text input (``text_keys[0]``), averaged over the nine pairs. What the
    backbone can learn to read from a random text encoder."""
    from diffusion_lab.metrics.digits import DIGIT_NAMES

    states = module._text([f"a handwritten digit {name}" for name in DIGIT_NAMES])[module.text_keys[0]].float()
    return float(torch.stack([(states[k] - states[0]).norm() / states[0].norm() for k in range(1, 10)]).mean())


def score(args) -> None:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from diffusion_lab.data.transforms import image_grid
    from diffusion_lab.inference.checkpoints import load_module
    from diffusion_lab.metrics.digits import DigitClassifier
    from experiments.lib.outputs import run_dir

    torch.set_num_threads(1)
    runs, classifier, rows, grids = Path(args.runs), DigitClassifier.load_or_train(), [], []
    for family in args.families or FAMILIES:
        run = runs / "runs" / family
        ckpt_path = run / "checkpoints" / "last.ckpt"
        ckpt = torch.load(ckpt_path, map_location="cpu", weights_only=False)
        cfg = OmegaConf.create(ckpt["diffusion_lab_config"])
        torch.manual_seed(0)
        before = val_loss(instantiate(cfg.model), cfg)
        module = load_module(str(ckpt_path), use_ema=True)
        after = val_loss(module, cfg)
        images, labels = prompted_samples(module, VARIANTS.get(family, (family,))[0], args.per_class, args.steps, args.guidance, args.seed, runs)
        recon = reconstruction_accuracy(module, classifier, images.shape[-1])
        pred = classifier.predict_proba(images).argmax(-1)
        per = [float((pred[labels == k] == k).float().mean()) for k in range(10)]
        cpu = json.loads((run / "train_cpu.json").read_text())
        rows.append({"family": family, "parameters": sum(p.numel() for p in module.base_backbone.parameters()), "train_steps": ckpt["global_step"],
                     **cpu, "vae_reconstruction_accuracy": recon, "text_difference": text_difference(module), "val_loss_before": before, "val_loss_after": after, "prompt_accuracy": float((pred == labels).float().mean()), "per_class": per})
        order = torch.cat([torch.nonzero(labels == k).flatten()[:1] for k in range(10)])
        grids.append(torch.nn.functional.interpolate(images[order], size=16, mode="area"))  # Sana's 32 px to the others' 16
        print({k: v for k, v in rows[-1].items() if k != "per_class"}, flush=True)
    out = run_dir(args.out, "families")
    meta = {"per_class": args.per_class, "steps": args.steps, "guidance": args.guidance, "seed": args.seed, "cpu_seconds_budget": args.cpu_seconds}
    (out / "results.json").write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    table = [
        f"{10 * args.per_class} samples per family ({args.per_class} of each \"a handwritten digit k\"), {args.steps} steps of its trained sampler, "
        f"guidance {args.guidance:g}, EMA weights; chance = 0.10",
        "",
        "| family | backbone parameters | train steps | train CPU min | VAE reconstructions read right | text states differ | val loss before | val loss after | prompt accuracy | worst digit |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    fmt = lambda x: "-" if math.isnan(x) else f"{x:.2f}"  # noqa: E731  (edit families: no text-only states)
    for r in rows:
        worst = min(range(10), key=lambda k: r["per_class"][k])
        table.append(f"| {r['family']} | {r['parameters'] / 1e6:.2f}M | {r['train_steps']} | {r['cpu_seconds'] / 60:.1f} | {r['vae_reconstruction_accuracy']:.3f} | {fmt(r['text_difference'])} | {r['val_loss_before']:.4f} | "
                     f"{r['val_loss_after']:.4f} | **{r['prompt_accuracy']:.3f}** | {worst}: {r['per_class'][worst]:.2f} |")
    (out / "results.md").write_text("\n".join(table) + "\n")
    image_grid(torch.cat(grids), rows=len(grids)).save(out / "samples.png")
    print("\n".join(table))


def main() -> None:
    from experiments.lib.outputs import add_out_argument

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("stage", choices=["build", "vaes", "train", "score"])
    p.add_argument("--runs", default=str(ROOT / "outputs" / "families"))
    add_out_argument(p, "families", "experiments/families")
    p.add_argument("--families", nargs="*", choices=[*FAMILIES, *VARIANTS], help="a subset, or a diagnostic variant (default: every family)")
    p.add_argument("--vae-cpu-seconds", type=int, default=360, help="training CPU time of each VAE layout (at most 800 steps)")
    p.add_argument("--force", action="store_true", help="vaes: retrain layouts already exported")
    p.add_argument("--cpu-seconds", type=int, default=300, help="training CPU time of each family")
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--per-class", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    {"build": build, "vaes": vaes, "train": train, "score": score}[args.stage](args)


if __name__ == "__main__":
    main()
