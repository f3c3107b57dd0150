"""The bytes a backbone's training step saves for backward, traced on meta tensors.

    acts = trace_activations(arch, resolution=1024, compute="mixed", lora=lora_config(...))

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
from dataclasses import dataclass
from typing import Literal

import torch

from diffusion_lab.compat.diffusers import supports_gradient_checkpointing
from diffusion_lab.memory.architecture import Architecture, backbone_model
from diffusion_lab.utils.errors import ConfigError


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
