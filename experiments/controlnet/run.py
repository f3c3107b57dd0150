"""ControlNet on the digits latent model: does the generated digit follow the control?

    OMP_NUM_THREADS=1 .venv/bin/python experiments/controlnet/run.py train     # base stack (short) + ControlNet
    OMP_NUM_THREADS=1 .venv/bin/python experiments/controlnet/run.py score     # with / without ControlNet
    OMP_NUM_THREADS=1 .venv/bin/python experiments/controlnet/run.py score --out experiments/controlnet   # refresh

``train`` runs, in ``--stack`` (default outputs/controlnet_study/stack): ``experiment=vae_digits``,
``experiment=ldm_digits`` shortened to ``--base-steps`` (the digits base of experiments/ldm_digits,
briefly), then ``experiment=controlnet_digits`` (``--control``, ``--steps``, ``--batch-size``), each
at one thread, recording its CPU time. The ControlNet run holds out ``--heldout`` of the digits
(its validation split), never trained on.

``score`` draws one image per held-out digit from the same x_T with plain diffusers only
(``StableDiffusionPipeline`` of ``<stack>/pipeline`` and ``StableDiffusionControlNetPipeline`` with
``ControlNetModel.from_pretrained(<stack>/controlnet)``), the control map computed from the digit as
in training, and the project's digit classifier reads each sample. Arms: the base with an empty
prompt (without ControlNet: nothing says which digit), the ControlNet with an empty prompt (the
control alone), the ControlNet with the prompt of another digit (which wins, text or control?) and,
as a reference, the base prompted with the digit's name. Writes results.json, results.md and
samples.png (rows: control | without | with) to --out.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from diffusion_lab.data.control import control_image
from diffusion_lab.data.digits import DIGIT_NAMES
from diffusion_lab.data.transforms import image_grid
from diffusion_lab.metrics.digits import DigitClassifier
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # run as a file (python experiments/<study>/<script>.py): the repo root, for experiments.lib
from experiments.lib.outputs import add_out_argument, run_dir  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def train(args) -> None:
    stack, runs = Path(args.stack), Path(args.stack).parent / "runs"
    stages = [
        ("vae", ["experiment=vae_digits"]),
        ("ldm", ["experiment=ldm_digits", f"trainer.max_steps={args.base_steps}", f"trainer.val_check_interval={args.base_steps // 2}",
                 f"callbacks.model_checkpoint.every_n_train_steps={args.base_steps // 2}", f"callbacks.sample_grid.every_n_steps={args.base_steps // 2}"]),
        ("controlnet", ["experiment=controlnet_digits", f"data.control={args.control}", f"trainer.max_steps={args.steps}", f"data.batch_size={args.batch_size}",
                        f"data.val_fraction={args.heldout}", f"trainer.val_check_interval={args.steps}", f"callbacks.model_checkpoint.every_n_train_steps={args.steps}",
                        f"callbacks.sample_grid.every_n_steps={args.steps}"]),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    times = {}
    for name, overrides in stages:
        if name in args.skip:
            continue
        cmd = [sys.executable, "-m", "diffusion_lab.train", *overrides, f"stack_dir={stack}", f"hydra.run.dir={runs / name}"]
        print("$", " ".join(cmd[1:]), flush=True)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        subprocess.run(cmd, cwd=ROOT, env=env, check=True)
        times[name] = {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(_cpu_seconds() - c0, 1)}
        print(name, times[name], flush=True)
    (Path(args.stack).parent / "train_times.json").write_text(json.dumps(times, indent=2))


def heldout_digits(run: Path) -> tuple[torch.Tensor, torch.Tensor, str]:
    """The ControlNet run's validation split, rebuilt from its config: (images ``[N, 3, H, W]`` in
    [-1, 1], labels ``[N]``, control kind)."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run / "config.yaml")
    dm = instantiate(cfg.data.datamodule)
    dm.setup()
    items = [dm.val_set[i] for i in range(len(dm.val_set))]
    return torch.stack([it["pixel_values"] for it in items]), torch.tensor([it["label"] for it in items]), cfg.data.control


def to_pil(control: torch.Tensor):
    """``[C, H, W]`` in [-1, 1] -> an RGB PIL image (what a user hands the pipeline)."""
    from PIL import Image

    arr = ((control[:3] + 1) * 127.5).round().clamp(0, 255).byte().permute(1, 2, 0).numpy()
    return Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr).convert("RGB")


def draw(pipe, prompts: list[str], noise: torch.Tensor, args, controls=None, guidance: float = 1.0) -> torch.Tensor:
    """Images ``[N, 3, H, W]`` in [-1, 1], batch by batch, from the fixed latents ``noise``."""
    size = noise.shape[-1] * pipe.vae_scale_factor
    out = []
    for i in range(0, len(prompts), args.batch):
        kw = {"image": controls[i : i + args.batch]} if controls is not None else {}
        res = pipe(prompts[i : i + args.batch], latents=noise[i : i + args.batch], num_inference_steps=args.inference_steps, guidance_scale=guidance,
                   height=size, width=size, output_type="pt", **kw)
        out.append(res.images * 2 - 1)
        print(f"  {i + len(res.images)}/{len(prompts)}", end="\r", flush=True)
    return torch.cat(out).float()


def score(args) -> None:
    from diffusers import (
        ControlNetModel,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    torch.set_num_threads(1)
    stack = Path(args.stack)
    images, labels, kind = heldout_digits(Path(args.stack).parent / "runs" / "controlnet")
    if args.limit:
        images, labels = images[: args.limit], labels[: args.limit]
    controls = torch.stack([control_image(x, kind) for x in images])
    pil = [to_pil(c) for c in controls]
    base = StableDiffusionPipeline.from_pretrained(stack / "pipeline", local_files_only=True)
    controlnet = ControlNetModel.from_pretrained(stack / "controlnet", local_files_only=True)
    with_cn = StableDiffusionControlNetPipeline(**{k: getattr(base, k) for k in ("vae", "text_encoder", "tokenizer", "unet", "scheduler")},
                                                controlnet=controlnet, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    for p in (base, with_cn):
        p.set_progress_bar_config(disable=True)
    side = images.shape[-1] // base.vae_scale_factor
    noise = torch.randn(len(images), base.unet.config.in_channels, side, side, generator=torch.Generator().manual_seed(args.seed))
    template = "a handwritten digit {name}"
    n = len(images)
    other = (labels + 1 + torch.randint(0, 9, (n,), generator=torch.Generator().manual_seed(1))) % 10  # a different digit
    arms = {
        "without ControlNet, empty prompt": draw(base, [""] * n, noise, args),
        "with ControlNet, empty prompt": draw(with_cn, [""] * n, noise, args, pil),
        "with ControlNet, prompt names another digit": draw(with_cn, [template.format(name=DIGIT_NAMES[k]) for k in other], noise, args, pil, args.guidance),
        "without ControlNet, prompt names the digit (reference)": draw(base, [template.format(name=DIGIT_NAMES[k]) for k in labels], noise, args, guidance=args.guidance),
    }
    clf = DigitClassifier.load_or_train()
    results = {"control": kind, "heldout": n, "inference_steps": args.inference_steps, "guidance_scale_with_prompt": args.guidance, "seed": args.seed,
               "classifier_on_the_real_heldout_digits": float((clf.predict_proba(images).argmax(-1) == labels).float().mean()), "arms": {}}
    for name, samples in arms.items():
        pred = clf.predict_proba(samples).argmax(-1)
        results["arms"][name] = {
            "matches_control_digit": float((pred == labels).float().mean()),
            "per_digit": [round(float((pred[labels == k] == labels[labels == k]).float().mean()), 3) for k in range(10)],
            **({"matches_prompt_digit": float((pred == other).float().mean())} if "another" in name else {}),
        }
    train_times = Path(args.stack).parent / "train_times.json"
    if train_times.exists():
        results["train_times"] = json.loads(train_times.read_text())
    out = run_dir(args.out, "controlnet")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(markdown(results))
    # two held-out examples per digit: rows control | without | with (empty prompts)
    pick = torch.cat([torch.nonzero(labels == k).flatten()[:2] for k in range(10)])
    rows = [controls[pick], arms["without ControlNet, empty prompt"][pick], arms["with ControlNet, empty prompt"][pick]]
    image_grid(torch.cat(rows), rows=3).save(out / "samples.png")
    print(markdown(results))
    print(f"wrote {out}")


def markdown(r: dict) -> str:
    head = (f"Control: `{r['control']}` maps of {r['heldout']} held-out digits; {r['inference_steps']} sampler steps; the digit classifier reads "
            f"{r['classifier_on_the_real_heldout_digits']:.3f} of the real held-out digits right.")
    lines = [head, "",
             "| arm | generated digit = control's digit | " + " | ".join(str(k) for k in range(10)) + " |", "|---|---|" + "---|" * 10]
    for name, a in r["arms"].items():
        extra = f" (= the prompt's digit: {a['matches_prompt_digit']:.3f})" if "matches_prompt_digit" in a else ""
        lines.append(f"| {name} | **{a['matches_control_digit']:.3f}**{extra} | " + " | ".join(f"{v:.2f}" for v in a["per_digit"]) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train")
    t.add_argument("--stack", default="outputs/controlnet_study/stack")
    t.add_argument("--base-steps", type=int, default=600)
    t.add_argument("--control", default="strokes", choices=["edges", "strokes", "mask"])
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--heldout", type=float, default=0.2, help="share of the digits the ControlNet never sees (its validation split)")
    t.add_argument("--skip", nargs="*", default=[], choices=["vae", "ldm", "controlnet"], help="stages already trained in --stack")
    s = sub.add_parser("score")
    s.add_argument("--stack", default="outputs/controlnet_study/stack")
    s.add_argument("--inference-steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=3.0, help="guidance scale of the arms with a prompt")
    s.add_argument("--batch", type=int, default=128)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--limit", type=int, default=0, help="score only the first N held-out digits (0 = all)")
    add_out_argument(s, "controlnet", "experiments/controlnet")
    args = parser.parse_args()
    (train if args.cmd == "train" else score)(args)


if __name__ == "__main__":
    main()
