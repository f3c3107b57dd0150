"""FSDP2 (``torch.distributed.fsdp.fully_shard``) for the diffusion modules: ``trainer=fsdp`` / ``fsdp_cpu``.

Every rank holds ``1 / world_size`` of each trained module's parameters, gradients and optimizer
state; a block's full weights exist only while it runs (all-gathered in its forward and backward).
The strategy is Lightning's ``ModelParallelStrategy`` with one data-parallel mesh dimension over all
ranks; the module's ``configure_model`` hook calls ``shard_module`` (below) with the policies the
strategy was configured with. Frozen parts that nothing trains (VAE, frozen text encoders) stay
whole on every rank: they are not in any gradient reduction.

Checkpoints are PyTorch distributed checkpoints (a folder per checkpoint, each rank writing its
shard), written into a temp folder and renamed, so a kill mid-write leaves the previous one whole;
they load on another world size under this strategy (``torch.distributed.checkpoint`` reshards).
"""

from __future__ import annotations

import shutil
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any, Iterator

import torch
from pytorch_lightning.strategies import ModelParallelStrategy
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor

from diffusion_lab.compat.diffusers import declared_no_split_modules
from diffusion_lab.components.pretrained import Dtype, torch_dtype
from diffusion_lab.utils.errors import ConfigError

# The blocks that become their own FSDP unit: one all-gather per block, so only one block's full
# weights are materialised at a time. Names, not classes: transformers' and diffusers' blocks of
# every backbone family (UNet2D / UNet2DCondition resnets and transformers, DiT, SD3, Flux) and
# of the text encoders a run may train.
BLOCK_CLASSES: tuple[str, ...] = (
    "ResnetBlock2D",  # UNet2DModel, UNet2DConditionModel
    "Transformer2DModel",  # UNet2DConditionModel's cross-attention stacks (SD 1.x, SDXL)
    "BasicTransformerBlock",  # DiT
    "JointTransformerBlock",  # SD3
    "FluxTransformerBlock",  # Flux double-stream
    "FluxSingleTransformerBlock",  # Flux single-stream
    "CLIPEncoderLayer",  # CLIP text encoders (SD, SDXL, SD3, Flux) when trained
    "T5Block",  # T5 (SD3, Flux) when trained
)


def no_split_modules(module: torch.nn.Module) -> tuple[str, ...]:
    """The block classes diffusers / transformers models declare as units (``_no_split_modules``) inside
    ``module``: how a new family's transformer (Qwen-Image, Sana, Z-Image, FLUX.2, ...) and text encoders
    (Qwen, Gemma) are sharded block by block without listing them here."""
    names: set[str] = set()
    for m in module.modules():
        names.update(declared_no_split_modules(m))
    return tuple(sorted(names))


def is_sharded(module: torch.nn.Module) -> bool:
    """True when ``module`` (or any submodule) holds FSDP2-sharded parameters."""
    return any(isinstance(p, DTensor) for p in module.parameters())


def takes_part(trainer, module: torch.nn.Module) -> bool:
    """Whether this rank runs work that rank 0 does for everyone (sample grids, FID, export):
    rank 0 always; under FSDP every rank, since each forward gathers weights from all of them."""
    return trainer.is_global_zero or is_sharded(module)


def shard_module(
    module: torch.nn.Module,
    mesh,
    mp_policy: MixedPrecisionPolicy,
    offload_policy: OffloadPolicy,
    reshard_after_forward: bool = True,
    block_classes: tuple[str, ...] = BLOCK_CLASSES,
) -> list[str]:
    """``fully_shard`` every block of each child of ``module`` that holds trainable parameters, then
    that child itself (its remaining parameters: embeddings, norms, heads). Returns the names of
    the sharded children. A child with nothing to train is left whole: FSDP would only add
    all-gathers for weights no gradient reduction needs.

    The children are sharded, not ``module`` itself: Lightning calls ``training_step``, never the
    LightningModule's ``forward``, and FSDP2 gathers a unit's parameters in its ``forward``.
    """
    kwargs = dict(mesh=mesh, mp_policy=mp_policy, offload_policy=offload_policy, reshard_after_forward=reshard_after_forward)
    sharded = []
    for name, child in module.named_children():
        if isinstance(child, FSDPModule) or not any(p.requires_grad for p in child.parameters()):
            continue
        classes = (*block_classes, *no_split_modules(child))
        blocks = [m for m in child.modules() if type(m).__name__ in classes]
        if not blocks:
            raise ConfigError(
                f"trainer=fsdp cannot wrap {name} ({type(child).__name__}): it has none of the blocks FSDP shards one by one "
                f"({', '.join(block_classes)}), so the whole model would be one unit gathered at once. Add its block class "
                f"to BLOCK_CLASSES in diffusion_lab/components/fsdp.py, or train it with trainer=ddp."
            )
        for block in reversed(blocks):  # inner blocks first (a DiT block inside a Transformer2DModel)
            if not isinstance(block, FSDPModule):
                fully_shard(block, **kwargs)
        fully_shard(child, **kwargs)
        sharded.append(name)
    loose = [n for n, p in module.named_parameters() if p.requires_grad and not isinstance(p, DTensor)]
    if loose:
        raise ConfigError(
            f"trainer=fsdp: trainable parameters outside any sharded module ({', '.join(loose[:3])}...) would not be "
            f"reduced across ranks. Train them inside a submodule, or use trainer=ddp."
        )
    return sharded


def local_fraction(module: torch.nn.Module) -> float:
    """This rank's share of ``module``'s sharded parameters: local elements / global elements
    (``1 / world_size`` up to padding for an evenly sharded module; 1.0 when nothing is sharded)."""
    local = glob = 0
    for p in module.parameters():
        if isinstance(p, DTensor):
            local += p.to_local().numel()
            glob += p.numel()
    return local / glob if glob else 1.0


def whole(t: torch.Tensor) -> torch.Tensor:
    """``t`` as an ordinary tensor: a DTensor shard is gathered (a collective: every rank must
    call it); anything else is returned as it is."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@contextmanager
def gathered(module: torch.nn.Module) -> Iterator[None]:
    """Inside: ``module``'s sharded parameters replaced by whole CPU copies (gathered on every
    rank, a collective), so code written for an ordinary module (``save_pretrained``, LoRA
    state-dict helpers) sees ordinary tensors; afterwards the shards are put back. Forward passes
    must not run inside (FSDP's hooks would gather again, on this rank only)."""
    swapped: list[tuple[torch.nn.Module, str, torch.nn.Parameter]] = []
    classes: list[tuple[torch.nn.Module, type]] = []
    for owner in module.modules():
        for name, p in list(owner._parameters.items()):
            if isinstance(p, DTensor):
                swapped.append((owner, name, p))
                owner._parameters[name] = torch.nn.Parameter(whole(p.detach()).cpu(), requires_grad=p.requires_grad)
        if isinstance(owner, FSDPModule):  # fully_shard made it an ``FSDP<Class>``: exports must name <Class>
            classes.append((owner, type(owner)))
            owner.__class__ = next(b for b in type(owner).__bases__ if b is not FSDPModule)
    try:
        yield
    finally:
        for owner, name, p in swapped:
            owner._parameters[name] = p
        for owner, cls in classes:
            owner.__class__ = cls


def shard_like(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """``full`` (a whole tensor, the same on every rank) as a DTensor placed like ``like``; an
    ordinary ``like`` returns ``full`` unchanged. Local slicing, no communication."""
    if not isinstance(like, DTensor):
        return full
    from torch.distributed.tensor import distribute_tensor

    return distribute_tensor(full.to(like.device, like.dtype), like.device_mesh, like.placements, src_data_rank=None)


class FSDP2Strategy(ModelParallelStrategy):
    """Lightning's ``ModelParallelStrategy`` as plain FSDP2: one data-parallel mesh dimension over
    every rank of every node (no tensor parallelism), and the sharding policies the module applies
    in ``configure_model`` (``DiffusionModule.configure_model`` -> ``shard_module``).

    Args:
        param_dtype: dtype blocks compute in (their all-gathered weights); the sharded master
            weights, gradients and optimizer state stay float32.
        reduce_dtype: dtype of the gradient reduce-scatter (float32: exact sums across ranks).
        cpu_offload: keep the sharded parameters, gradients and optimizer state in host memory;
            each block's weights come to the device only while it runs (slower, for models whose
            shards do not fit beside the activations).
        reshard_after_forward: free a block's gathered weights after its forward (ZeRO-3; False =
            ZeRO-2: keep them until backward, more memory, one all-gather fewer).
        save_distributed_checkpoint: each rank writes its shard (a folder per checkpoint); False
            gathers one ordinary file on rank 0 (needs the whole model in rank 0's host memory).
    """

    def __init__(
        self,
        param_dtype: Dtype = "bfloat16",
        reduce_dtype: Dtype = "float32",
        cpu_offload: bool = False,
        reshard_after_forward: bool = True,
        save_distributed_checkpoint: bool = True,
        process_group_backend: str | None = None,
        timeout_s: float = 1800.0,
    ) -> None:
        super().__init__(
            save_distributed_checkpoint=save_distributed_checkpoint,
            process_group_backend=process_group_backend,
            timeout=timedelta(seconds=timeout_s),
        )
        # Inputs are not cast to param_dtype: autocast (trainer.precision=bf16-mixed) mixes the bf16
        # weights with fp32 activations op by op, and timesteps / sigmas stay fp32 (bf16 would round
        # a flow-matching timestep near 1000 to a multiple of 4).
        self.mp_policy = MixedPrecisionPolicy(param_dtype=torch_dtype(param_dtype), reduce_dtype=torch_dtype(reduce_dtype), cast_forward_inputs=False)
        # pinned host memory (faster copies) needs CUDA
        self.offload_policy = CPUOffloadPolicy(pin_memory=torch.cuda.is_available()) if cpu_offload else OffloadPolicy()
        self.reshard_after_forward = reshard_after_forward

    def setup_environment(self) -> None:
        # pure FSDP: every rank is a data-parallel replica of the batch and holds 1/world of the weights
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()

    def shard(self, module: torch.nn.Module) -> list[str]:
        """``shard_module`` with this strategy's mesh and policies (called from ``configure_model``)."""
        precision = getattr(self.precision_plugin, "precision", None)
        autocast = {torch.bfloat16: "bf16-mixed", torch.float16: "16-mixed"}.get(self.mp_policy.param_dtype)
        if autocast is not None and precision != autocast:
            dtype = str(self.mp_policy.param_dtype).removeprefix("torch.")
            raise ConfigError(
                f"trainer.strategy.param_dtype={dtype} gathers the blocks' weights in {dtype}, which needs the autocast of the "
                f"same dtype around them, but trainer.precision={precision}: set trainer.precision={autocast} (trainer=fsdp "
                f"does; an experiment may override it), or trainer.strategy.param_dtype=float32 to keep trainer.precision={precision}."
            )
        return shard_module(module, self.device_mesh["data_parallel"], self.mp_policy, self.offload_policy, self.reshard_after_forward)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath, storage_options: Any | None = None) -> None:
        """Written beside the target and renamed over it once every rank has finished: a kill at
        any moment leaves the previous checkpoint (file or folder) whole."""
        if not self._save_distributed_checkpoint:
            return super().save_checkpoint(checkpoint, filepath, storage_options)
        path = Path(self.broadcast(str(filepath)))
        tmp = path.with_name(f".{path.name}.tmp")
        if self.global_rank == 0 and tmp.exists():
            shutil.rmtree(tmp) if tmp.is_dir() else tmp.unlink()
        self.barrier("fsdp_checkpoint_tmp")
        super().save_checkpoint(checkpoint, tmp, storage_options)
        self.barrier("fsdp_checkpoint_written")
        if self.global_rank == 0:
            old = path.with_name(f".{path.name}.old")
            if path.exists():
                path.rename(old)
            tmp.rename(path)
            if old.exists():
                shutil.rmtree(old) if old.is_dir() else old.unlink()
        self.barrier("fsdp_checkpoint_renamed")

    def remove_checkpoint(self, filepath) -> None:
        if self.is_global_zero:
            path = Path(filepath)
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
