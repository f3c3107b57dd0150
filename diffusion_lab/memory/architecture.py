"""What the memory plan needs to know about a model, read from its config alone: the backbone
built on the meta device (no weights, no download), its parameter counts, and the bytes its
training step saves for backward, traced on meta tensors.

    arch = load_architecture(cfg.plan.architecture)          # a shipped conf/plan/architecture/*.yaml
    arch = load_architecture(folder="outputs/tiny_flux")     # a diffusers folder's config.json files
    counts = backbone_counts(arch, lora=lora_config(...))    # parameters, Linear weights, blocks
    acts = trace_activations(arch, resolution=1024, dtype=torch.bfloat16, lora=...)

The trace runs the real forward of the diffusers class on meta tensors inside
``saved_tensors_hooks``: every tensor autograd keeps for backward is recorded once per storage
(parameters excluded), so the saved-activation bytes are the architecture's own at the planned
resolution, batch and dtype. Attention is replaced by a stand-in that saves what the fused
kernels (flash / memory-efficient SDPA) save (q, k, v, out, logsumexp), not the [L, L] matrix
that SDPA's meta decomposition would. Gradient checkpointing is traced with diffusers' own
``enable_gradient_checkpointing(func)``: each unit's saved bytes are tallied apart, so one trace
gives both the plain total and the checkpointed one (unit inputs kept + one unit recomputed).
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from diffusion_lab.compat.diffusers import supports_gradient_checkpointing
from diffusion_lab.memory.budget import Counts
from diffusion_lab.utils.errors import ConfigError

Family = Literal["latent_sd", "latent_sdxl", "latent_sd3", "latent_flux", "latent_qwen"]

# pipeline class (model_index.json) -> (family, backbone subfolder)
PIPELINES: dict[str, tuple[Family, str]] = {
    "StableDiffusionPipeline": ("latent_sd", "unet"),
    "StableDiffusionXLPipeline": ("latent_sdxl", "unet"),
    "StableDiffusion3Pipeline": ("latent_sd3", "transformer"),
    "FluxPipeline": ("latent_flux", "transformer"),
    "QwenImagePipeline": ("latent_qwen", "transformer"),
}
FROZEN_SUBFOLDERS = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
# text tokens the backbone attends to when the folder does not say (the pipelines' defaults)
TEXT_TOKENS: dict[str, int] = {"latent_sd": 77, "latent_sdxl": 77, "latent_sd3": 77 + 256, "latent_flux": 512, "latent_qwen": 512}


@dataclass
class Architecture:
    """A model as the planner sees it: the backbone's class and config, and the frozen parts
    (VAE, text encoders), each a class + config to build on meta or a published parameter count."""

    name: str
    family: Family
    backbone_class: str
    backbone_config: dict
    frozen: dict[str, dict] = field(default_factory=dict)  # name -> {class_name, config} | {params, source}
    vae_factor: int = 8
    text_tokens: int = 77
    published_params: float | None = None  # the backbone's published total (params + persistent buffers)


def load_architecture(spec: Any = None, folder: str | Path | None = None) -> Architecture:
    """From a shipped ``conf/plan/architecture/<name>.yaml`` node (``spec``) or a diffusers
    pipeline ``folder`` (its ``model_index.json`` and each part's ``config.json``)."""
    if spec is not None:
        s = dict(spec)
        return Architecture(
            name=s["name"],
            family=s["family"],
            backbone_class=s["backbone"]["class_name"],
            backbone_config={k: v for k, v in dict(s["backbone"]["config"]).items()},
            frozen={k: dict(v) for k, v in dict(s.get("frozen") or {}).items()},
            vae_factor=int(s.get("vae_factor", 8)),
            text_tokens=int(s.get("text_tokens", 77)),
            published_params=s["backbone"].get("published_params"),
        )
    root = Path(str(folder)).expanduser()
    index = root / "model_index.json"
    if not index.is_file():
        raise ConfigError(
            f"model.pretrained={str(folder)!r} is not a diffusers pipeline folder (no model_index.json), so the plan cannot read "
            f"its architecture. Point model.pretrained at a pipeline folder (its *.json files are enough: "
            f"`hf download <hub id> --include '*.json' --local-dir DIR`), or pick a shipped one: "
            f"plan/architecture=sd15|sdxl|sd35_medium|sd35_large|flux1_dev|qwen_image."
        )
    pipeline = json.loads(index.read_text()).get("_class_name", "")
    if pipeline not in PIPELINES:
        raise ConfigError(f"{root}/model_index.json holds a {pipeline or 'unnamed'} pipeline; the plan knows {', '.join(PIPELINES)}.")
    family, sub = PIPELINES[pipeline]
    backbone = json.loads((root / sub / "config.json").read_text())
    frozen = {}
    for part in FROZEN_SUBFOLDERS:
        config = root / part / "config.json"
        if config.is_file():
            c = json.loads(config.read_text())
            frozen[part] = {"class_name": _part_class(c), "config": c}
    vae_factor = 2 ** (len(frozen["vae"]["config"].get("block_out_channels", [0] * 4)) - 1) if "vae" in frozen else 8
    return Architecture(
        name=str(root), family=family, backbone_class=f"diffusers.{backbone['_class_name']}", backbone_config=backbone,
        frozen=frozen, vae_factor=vae_factor, text_tokens=TEXT_TOKENS[family],  # the pipeline's default, also for tiny folders
    )


def _part_class(config: dict) -> str:
    if "_class_name" in config:
        return f"diffusers.{config['_class_name']}"
    return f"transformers.{config['architectures'][0]}"


def _get_class(name: str):
    module, _, cls = name.rpartition(".")
    return getattr(__import__(module, fromlist=[cls]), cls)


def build_meta(class_name: str, config: dict) -> torch.nn.Module:
    """The module of ``class_name`` with ``config``, its parameters on the meta device."""
    cls = _get_class(class_name)
    with torch.device("meta"):
        if class_name.startswith("diffusers."):
            return cls.from_config({k: v for k, v in config.items() if not k.startswith("_")})
        import transformers

        c = dict(config)
        model_type = c.pop("model_type")
        return cls(transformers.AutoConfig.for_model(model_type, **{k: v for k, v in c.items() if not k.startswith("_")}))


def parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def state_numel(module: torch.nn.Module) -> int:
    """Parameters + persistent buffers: what a checkpoint holds (SD3's pos_embed table is a buffer)."""
    persistent = 0
    for m in module.modules():
        for name, b in m._buffers.items():
            if b is not None and name not in m._non_persistent_buffers_set:
                persistent += b.numel()
    return sum(p.numel() for p in module.parameters()) + persistent


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated units diffusers checkpoints and FSDP wraps: transformer blocks, or the UNet's
    resnets and attentions."""
    units = []
    for name in ("transformer_blocks", "single_transformer_blocks"):
        units += list(getattr(model, name, []))
    for level in list(getattr(model, "down_blocks", [])) + [getattr(model, "mid_block", None)] + list(getattr(model, "up_blocks", [])):
        if level is None:
            continue
        units += list(getattr(level, "resnets", [])) + list(getattr(level, "attentions", []))
    return units


def backbone_model(arch: Architecture, lora=None) -> torch.nn.Module:
    model = build_meta(arch.backbone_class, arch.backbone_config)
    if lora is not None:
        from diffusion_lab.components.adapters import add_lora

        with torch.device("meta"):
            add_lora(model, lora)
    return model


def _linear_weights(model: torch.nn.Module) -> int:
    """nn.Linear weights outside adapter layers (the base layer of a LoRA counts)."""
    total = 0
    for name, m in model.named_modules():
        if type(m) is torch.nn.Linear and "lora_" not in name:
            total += m.weight.numel()
    return total


def backbone_counts(arch: Architecture, lora=None) -> Counts:
    """Counts of ``arch``'s backbone (with ``lora``, a peft config, injected) and frozen parts."""
    model = backbone_model(arch, lora)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora is not None else 0
    params = sum(p.numel() for n, p in model.named_parameters() if "lora_" not in n)
    blocks = _blocks(model)
    frozen, frozen_linear = {}, {}
    for part, spec in arch.frozen.items():
        if "params" in spec:
            frozen[part] = int(spec["params"])
            frozen_linear[part] = int(spec.get("linear_params", 0))
        else:
            m = build_meta(spec["class_name"], dict(spec["config"]))
            frozen[part] = state_numel(m)
            frozen_linear[part] = _linear_weights(m)
    return Counts(
        params=params,
        buffers=state_numel(model) - sum(p.numel() for p in model.parameters()),
        linear=_linear_weights(model),
        trainable_adapter=trainable,
        largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=params),
        largest_param=max(p.numel() for p in model.parameters()),
        frozen=frozen,
        frozen_linear=frozen_linear,
    )


# ---- the activation trace --------------------------------------------------------------------
class _FlashLikeAttention(torch.autograd.Function):
    """Saves what fused SDPA kernels save for backward: q, k, v, out and a float32 logsumexp."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = torch.empty(*q.shape[:-1], v.shape[-1], dtype=q.dtype, device=q.device)
        lse = torch.empty(q.shape[:-1], dtype=torch.float32, device=q.device)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the trace never runs backward
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def _sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    autocast = _Autocast.active  # SDPA is on autocast's low-precision list; a Python stand-in is not seen by the mode
    if autocast is not None:
        query, key, value = (autocast._cast(t, autocast.dtype) for t in (query, key, value))
    return _FlashLikeAttention.apply(query, key, value)


class _Tally:
    """Saved tensors by storage: a dict per scope (outer, or the checkpoint unit being run)."""

    def __init__(self, skip: set[int]):
        self.skip = skip
        self.outer: dict[int, int] = {}
        self.units: list[dict[int, int]] = []
        self.unit_inputs: dict[int, int] = {}
        self.current: dict[int, int] | None = None

    @staticmethod
    def key(t: torch.Tensor) -> tuple[int, int]:
        s = t.untyped_storage()
        return s._cdata, s.nbytes()

    def pack(self, t):
        if isinstance(t, torch.Tensor):
            k, n = self.key(t)
            if k not in self.skip:
                (self.current if self.current is not None else self.outer)[k] = n
        return t

    def checkpoint(self, fn, *args, **kwargs):
        """Stands in for torch.utils.checkpoint: runs ``fn`` tallying its saved tensors apart,
        and records the tensor inputs (what a checkpoint keeps)."""
        for a in list(args) + list(kwargs.values()):
            if isinstance(a, torch.Tensor):
                k, n = self.key(a)
                if k not in self.skip:
                    self.unit_inputs[k] = n
        outer, self.current = self.current, {}
        try:
            return fn(*args, **kwargs)
        finally:
            self.units.append(self.current)
            self.current = outer


@dataclass
class Activations:
    """Bytes saved for backward by one training forward (the loss included)."""

    saved: int  # no checkpointing
    checkpointed: int  # with gradient checkpointing: outer + unit inputs + the largest unit
    largest_unit: int


def backbone_inputs(arch: Architecture, model: torch.nn.Module, batch: int, resolution: int, dtype: torch.dtype, device: str = "meta") -> dict:
    """Inputs of one training forward (random; shapes only on meta): noisy latents, timesteps, text states."""
    c = model.config
    side = resolution // arch.vae_factor
    kw = dict(device=device, dtype=dtype)
    t = torch.rand(batch, **kw) * 999
    L = arch.text_tokens
    if arch.family in ("latent_sd", "latent_sdxl"):
        out = dict(sample=torch.randn(batch, c.in_channels, side, side, **kw), timestep=t, encoder_hidden_states=torch.randn(batch, L, c.cross_attention_dim, **kw))
        if c.addition_embed_type == "text_time":
            pooled = c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim
            out["added_cond_kwargs"] = {"text_embeds": torch.randn(batch, pooled, **kw), "time_ids": torch.randn(batch, 6, **kw)}
        return out
    if arch.family == "latent_sd3":
        return dict(
            hidden_states=torch.randn(batch, c.in_channels, side, side, **kw), timestep=t,
            encoder_hidden_states=torch.randn(batch, L, c.joint_attention_dim, **kw), pooled_projections=torch.randn(batch, c.pooled_projection_dim, **kw),
        )
    tokens = (side // 2) ** 2  # 2x2 latent patches packed into tokens
    if arch.family == "latent_flux":
        out = dict(
            hidden_states=torch.randn(batch, tokens, c.in_channels, **kw), timestep=t, encoder_hidden_states=torch.randn(batch, L, c.joint_attention_dim, **kw),
            pooled_projections=torch.randn(batch, c.pooled_projection_dim, **kw), img_ids=torch.randn(tokens, 3, **kw), txt_ids=torch.randn(L, 3, **kw),
        )
        if c.guidance_embeds:
            out["guidance"] = torch.randn(batch, **kw)
        return out
    if arch.family == "latent_qwen":
        return dict(
            hidden_states=torch.randn(batch, tokens, c.in_channels, **kw), timestep=t, encoder_hidden_states=torch.randn(batch, L, c.joint_attention_dim, **kw),
            encoder_hidden_states_mask=torch.ones(batch, L, device=device, dtype=torch.long), img_shapes=[[(1, side // 2, side // 2)]] * batch,
        )
    raise ConfigError(f"no trace inputs for family {arch.family}")


Compute = Literal["fp32", "bf16", "mixed", "mixed_cpu"]


def trace_activations(arch: Architecture, resolution: int, batch: int = 1, compute: Compute = "fp32", lora=None, base_dtype: torch.dtype = torch.float32,
                      model: torch.nn.Module | None = None) -> Activations:
    """Saved-for-backward bytes of one forward + loss of ``arch``'s backbone on meta tensors.
    ``compute``: fp32 (32-true), bf16 (bf16-true / 16-true: every parameter in half precision), mixed
    (bf16-mixed / 16-mixed: fp32 parameters, or a LoRA's frozen base in ``base_dtype`` under fp32
    adapters, with CUDA autocast's casts emulated: ``_Autocast``), mixed_cpu (CPU autocast's casts)."""
    model = model if model is not None else backbone_model(arch, lora)  # requires_grad as it trains (add_lora froze the base)
    if compute == "bf16":
        model.to(torch.bfloat16)
    else:
        for p in model.parameters():
            p.data = p.data.to(torch.float32 if p.requires_grad or compute == "fp32" else base_dtype)
    skip = {_Tally.key(p)[0] for p in model.parameters()} | {_Tally.key(b)[0] for b in model.buffers()}
    tally = _Tally(skip)
    if supports_gradient_checkpointing(model):
        model.enable_gradient_checkpointing(gradient_checkpointing_func=tally.checkpoint)
    inputs = backbone_inputs(arch, model, batch, resolution, torch.bfloat16 if compute == "bf16" else torch.float32)
    with contextlib.ExitStack() as stack:
        stack.enter_context(_patched_sdpa())
        stack.enter_context(torch.autograd.graph.saved_tensors_hooks(tally.pack, lambda t: t))
        with _Autocast(torch.bfloat16, cuda=compute == "mixed") if compute.startswith("mixed") else contextlib.nullcontext():
            out = model(**inputs, return_dict=False)[0]
        target = torch.empty_like(out)
        loss = ((out.float() - target.float()) ** 2).mean()
    del loss
    units = [{k: n for k, n in u.items() if k not in tally.outer} for u in tally.units]
    everything = dict(tally.outer)
    for u in units:
        everything.update(u)
    saved = sum(everything.values())
    largest = max((sum(n for k, n in u.items() if k not in tally.unit_inputs) for u in units), default=0)
    kept = {**tally.outer, **tally.unit_inputs}
    return Activations(saved=saved, checkpointed=sum(kept.values()) + largest, largest_unit=largest)


class _Autocast(torch.overrides.TorchFunctionMode):
    """torch.autocast's casts, emulated for meta tensors (autocast keys on CUDA / CPU tensors only):
    matmuls and convolutions in the low dtype; on CUDA also normalisations and softmax in float32
    (CPU autocast runs them in their input's dtype); a leaf
    parameter that trains is cast once per forward (autocast's weight cache), anything else per use.
    The casts are what the ops then save for backward, as under real autocast."""

    active: "_Autocast | None" = None

    def __enter__(self):
        _Autocast.active = self
        return super().__enter__()

    def __exit__(self, *exc):
        _Autocast.active = None
        return super().__exit__(*exc)

    def __init__(self, dtype: torch.dtype, cuda: bool = True):
        super().__init__()
        import torch.nn.functional as F

        self.dtype, self.cache = dtype, {}
        self.low = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d, torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm,
                    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.bmm}
        self.fp32 = {F.layer_norm, F.group_norm, F.softmax, torch.softmax, torch.Tensor.softmax, F.log_softmax} if cuda else set()

    def _cast(self, t, dtype):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dtype == dtype or t.dtype == torch.float64:
            return t
        if dtype == self.dtype and t.is_leaf and t.requires_grad:
            if id(t) not in self.cache:
                self.cache[id(t)] = (t, t.to(dtype))
            return self.cache[id(t)][1]
        return t.to(dtype)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        dtype = self.dtype if func in self.low else torch.float32 if func in self.fp32 else None
        if dtype is not None:
            args = tuple(self._cast(a, dtype) for a in args)
            kwargs = {k: self._cast(v, dtype) for k, v in kwargs.items()}
        return func(*args, **kwargs)


@contextlib.contextmanager
def _patched_sdpa():
    import torch.nn.functional as F

    original = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _sdpa
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original
