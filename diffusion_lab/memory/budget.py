"""Peak device memory of one training step, per rank: pure functions of parameter counts, traced
activation bytes and the run's settings (no torch, no config).

    b = breakdown(counts, trace, Settings(precision="bf16-mixed", adapter=True, ...))
    b.total  # bytes: weights + grads + optimizer + ema + frozen + max(activations, step temporaries) + gather

Bytes per trained parameter (the usual accounting, e.g. ZeRO, Rajbhandari et al. 2020):
weights 4 (fp32, also the master copy of *-mixed) or 2 (bf16-true / 16-true), gradients as the
weights, AdamW two states in the parameters' dtype (8 or 4), bitsandbytes' 8-bit AdamW 2, EMA one
copy in the parameters' dtype. A frozen base (LoRA) is held in ``base_dtype``; quantization packs
its nn.Linear weights to nf4 (0.5 B + one fp32 absmax per 64-block), int8 or float8 (1 B + scales).
FSDP shards weights, gradients, optimizer state and EMA over the world size and all-gathers one
unit (a transformer / resnet block) at a time, two in flight (prefetch).

Peak: gradients are allocated while backward frees the activations (and set to None by zero_grad),
so the step peaks at the larger of (all activations) and (all gradients + the optimizer step's
temporaries, or + the first block's activations still live at backward's end), over weights +
optimizer state + EMA + frozen parts; DDP's gradient buckets and
gradient accumulation keep gradients alive, and then they add (``Breakdown.total``).

Activations: ``k_saved`` x the bytes the trace saw saved for backward (``architecture.py``; under
*-mixed with autocast's casts emulated, so the half-precision weight copies the matmuls save are
in it; with checkpointing, one unit's). ``k_saved`` is calibrated on CPU
(experiments/bench/plan/): the transient buffers of backward over the saved tensors.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

GB = 1e9

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# bytes per nn.Linear weight of a quantized frozen base: the packed weight + its scales
QUANT_BYTES = {"nf4": 0.5 + 4 / 64, "int8": 1 + 4 / 4096, "float8": 1 + 4 / 4096}
OPTIMIZER_STATE_BYTES = {"adamw": None, "adamw_8bit": 2.0}  # None: two states in the parameters' dtype
K_SAVED = 1.1  # calibrated: measured activation peak / traced saved bytes (experiments/bench/plan/results.md)


@dataclass(frozen=True)
class Counts:
    """Element counts (see ``architecture.backbone_counts``)."""

    params: int
    buffers: int
    linear: int
    trainable_adapter: int
    largest_block: int
    largest_param: int
    frozen: dict
    frozen_linear: dict


@dataclass(frozen=True)
class Trace:
    """Saved-for-backward bytes of the backbone at batch 1 and 2 (linear in the batch in between
    and beyond), without and with gradient checkpointing, in the dtype the settings compute in."""

    saved_1: int
    saved_2: int
    ckpt_1: int
    ckpt_2: int
    unit_1: int = 0  # the largest checkpoint unit's saved bytes
    unit_2: int = 0

    def saved(self, batch: int, checkpointing: bool) -> float:
        a1, a2 = (self.ckpt_1, self.ckpt_2) if checkpointing else (self.saved_1, self.saved_2)
        return a1 + (a2 - a1) * (batch - 1)

    def unit(self, batch: int) -> float:
        return self.unit_1 + (self.unit_2 - self.unit_1) * (batch - 1)


@dataclass(frozen=True)
class Settings:
    """What the plan varies. ``frozen_dtypes``: part name (vae, text_encoder, ...) -> dtype name."""

    precision: str = "32-true"
    adapter: bool = False
    base_dtype: str = "float32"
    quantization: str | None = None
    quant_backend: str | None = None  # bitsandbytes | torchao | quanto (quantization.backend)
    quantize_text_encoders: bool = False
    frozen_dtypes: tuple = ()
    offload_frozen: bool = False
    cpu_offload: bool = False  # FSDP's CPU offload: shards, gradients and optimizer state in host memory
    gradient_checkpointing: bool = False
    batch: int = 1  # per rank
    world_size: int = 1
    sharded: bool = False  # FSDP: weights, grads, optimizer, EMA / world_size
    ema: str | None = "model"  # model | cpu | None
    optimizer: str = "adamw"
    fused_optimizer: bool = False
    accelerator: str = "gpu"
    accumulate: int = 1  # trainer.accumulate_grad_batches

    def with_(self, **kw) -> "Settings":
        return replace(self, **kw)


@dataclass(frozen=True)
class Breakdown:
    """Bytes per rank at the peak of a training step."""

    weights: float
    grads: float
    optimizer: float
    ema: float
    activations: float
    frozen: float
    step_temporaries: float  # the optimizer step's temporary buffers (activations are freed by then)
    last_unit: float  # the first block's activations, still live when backward has made every other gradient
    gather: float  # FSDP: all-gathered units in flight
    grads_persist: bool = False  # DDP buckets / gradient accumulation keep gradients through the forward

    @property
    def total(self) -> float:
        """The largest of three moments: backward's start (every activation live; gradients appear as
        backward frees activations, zero_grad set them to None), backward's end (every gradient + the
        first block's activations) and the optimizer step (gradients + the step's temporaries).
        Persistent gradients add to all."""
        static = self.weights + self.optimizer + self.ema + self.frozen + self.gather
        if self.grads_persist:
            return static + self.grads + max(self.activations, self.step_temporaries)
        return static + max(self.activations, self.grads + max(self.last_unit, self.step_temporaries))

    def as_gb(self) -> dict[str, float]:
        out = {f"{k}_gb": round(v / GB, 3) for k, v in asdict(self).items() if k not in ("grads_persist", "last_unit")}
        out["total_gb"] = round(self.total / GB, 3)
        return out


def compute_dtype_bytes(precision: str) -> int:
    """Bytes of an activation element: 2 under bf16/16 (mixed or true), else 4."""
    return 2 if precision.startswith(("bf16", "16")) else 4


def param_bytes(precision: str) -> int:
    """Bytes of a trained parameter: 2 for bf16-true / 16-true, 4 otherwise (*-mixed keep fp32 masters)."""
    return 8 if precision.startswith("64") else 2 if precision in ("bf16-true", "16-true") else 4


def trained_params(c: Counts, s: Settings) -> int:
    return c.trainable_adapter if s.adapter else c.params


def backbone_weights(c: Counts, s: Settings) -> float:
    """Backbone weights on the device (before FSDP sharding)."""
    if not s.adapter:
        return (c.params + c.buffers) * param_bytes(s.precision)
    base = DTYPE_BYTES[s.base_dtype]
    frozen_base = (c.params - c.linear + c.buffers) * base + c.linear * (QUANT_BYTES[s.quantization] if s.quantization else base)
    return frozen_base + c.trainable_adapter * 4


def frozen_parts(c: Counts, s: Settings) -> float:
    """VAE + text encoders on the device (0 when offloaded)."""
    if s.offload_frozen:
        return 0.0
    dtypes = dict(s.frozen_dtypes)
    total = 0.0
    for part, n in c.frozen.items():
        b = DTYPE_BYTES[dtypes.get(part, "float32")]
        if s.quantize_text_encoders and s.quantization and part.startswith("text_encoder"):
            lin = c.frozen_linear.get(part, 0)
            total += (n - lin) * b + lin * QUANT_BYTES[s.quantization]
        else:
            total += n * b
    return total


def compute_mode(s: Settings) -> str:
    """How the backbone computes: fp32 (32-true), bf16 (bf16-true / 16-true, and FSDP's bf16 policy:
    gathered weights already in bf16, no autocast), mixed (autocast over fp32 weights / a LoRA's base)."""
    if s.precision.endswith("-mixed"):
        return "bf16" if s.sharded else "mixed_cpu" if s.accelerator == "cpu" else "mixed"
    return "bf16" if s.precision in ("bf16-true", "16-true") else "fp32"


def activations(c: Counts, t: Trace, s: Settings, k_saved: float = K_SAVED) -> float:
    """The traced saved bytes (autocast's weight copies included) x the calibrated transient factor.
    torchao's weight-only linears dequantize per use and autograd saves the bf16 weight for backward
    (measured: experiments/bench/plan/README.md); bitsandbytes' keep only the packed weight."""
    act = k_saved * t.saved(s.batch, s.gradient_checkpointing)
    if s.adapter and s.quantization and s.quant_backend == "torchao":
        act += 2 * (c.largest_block if s.gradient_checkpointing else c.linear)
    return act


def step_temporaries(c: Counts, s: Settings) -> float:
    """AdamW's step: torch's foreach kernels (the GPU default) hold one temporary the size of all
    trained parameters (the sqrt of the second moment); the per-tensor loop (CPU) and fused
    kernels only the biggest tensor's."""
    n = trained_params(c, s) / (s.world_size if s.sharded else 1)
    b = param_bytes(s.precision) if not s.adapter else 4
    if s.optimizer == "adamw" and s.accelerator != "cpu" and not s.fused_optimizer:
        return n * b
    return 2 * min(c.largest_param, n) * b


def breakdown(c: Counts, t: Trace, s: Settings, k_saved: float = K_SAVED) -> Breakdown:
    """Peak bytes per rank of one training step of ``c`` under ``s``."""
    shard = s.world_size if s.sharded else 1
    trained = trained_params(c, s)
    pb = param_bytes(s.precision) if not s.adapter else 4
    state = OPTIMIZER_STATE_BYTES[s.optimizer]
    optimizer = trained * (2 * pb if state is None else state)
    gather = 0.0
    if s.sharded and shard > 1:  # one unit running + one prefetched (bf16), and one unit's full gradients
        gather = 2 * c.largest_block * compute_dtype_bytes(s.precision) + (0 if s.adapter else c.largest_block * pb)
    on_device = 0.0 if s.sharded and s.cpu_offload else 1.0
    return Breakdown(
        weights=on_device * backbone_weights(c, s) / shard,
        grads=on_device * trained * pb / shard,
        optimizer=on_device * optimizer / shard,
        ema=on_device * trained * pb / shard if s.ema == "model" else 0.0,
        activations=activations(c, t, s, k_saved),
        frozen=frozen_parts(c, s),
        step_temporaries=step_temporaries(c, s),
        last_unit=t.unit(s.batch),
        gather=gather,
        grads_persist=(s.world_size > 1 and not s.sharded) or s.accumulate > 1,
    )
