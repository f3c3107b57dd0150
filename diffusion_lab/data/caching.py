"""Precomputed VAE posteriors and text states: the frozen encoders run once, not every epoch.

What is cached is the posterior q(z|x)'s (mean, logvar), not a sample: the latent is still drawn
fresh at every step, from the global RNG exactly as without the cache. So with deterministic
transforms (center crop, no flip) a cached run has the same loss curve as an uncached one with
the same seed (up to float rounding); with random crops/flips the cache freezes one crop/flip
per image.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm


TextStates = torch.Tensor | dict[str, torch.Tensor]  # [N, L, D] (encoder_hidden_states), or several by key


class CachedLatentDataset(Dataset):
    """Items ``{"latent_moments": [2c, h, w], "caption": str[, "encoder_hidden_states": [L, D]]}``.
    Text states are stored once per distinct caption: one tensor (``encoder_hidden_states``) or a
    dict of them (SDXL: also the pooled ``text_embeds``). ``extras``: other per-image tensors kept."""

    def __init__(
        self,
        moments: torch.Tensor,
        captions: list[str] | None,
        states: TextStates | None,
        state_index: torch.Tensor | None,
        extras: dict[str, torch.Tensor] | None = None,
    ) -> None:
        self.moments = moments
        self.captions = captions
        self.states = states
        self.state_index = state_index
        self.extras = extras or {}

    def __len__(self) -> int:
        return len(self.moments)

    def __getitem__(self, i: int) -> dict:
        item: dict = {"latent_moments": self.moments[i]}
        if self.captions is not None:
            item["caption"] = self.captions[i]
        if self.states is not None:
            states = self.states if isinstance(self.states, dict) else {"encoder_hidden_states": self.states}
            item.update({k: v[self.state_index[i]] for k, v in states.items()})
        item.update({k: v[i] for k, v in self.extras.items()})
        return item


def cacheable_text_fn(module: torch.nn.Module) -> Callable[[list[str]], TextStates] | None:
    """``module.text_states`` when its text states can be computed once (every text encoder
    frozen), else None (no text encoder, or one that trains)."""
    return module.text_states if hasattr(module, "text_states") and module.conditioner.frozen else None


@torch.no_grad()
def cache_latents(
    dataset: Dataset | Sequence[dict],
    moments_fn: Callable[[torch.Tensor], torch.Tensor],
    text_fn: Callable[[list[str]], TextStates] | None,
    device: torch.device | str,
    batch_size: int = 16,
    keep: Sequence[str] = (),
    states_dir: str | None = None,
    progress: bool = True,
) -> CachedLatentDataset:
    """Run ``moments_fn`` (images ``[N, C, H, W]`` -> ``[N, 2c, h, w]``) over ``dataset`` and,
    if given, ``text_fn`` (captions -> ``[N, L, D]``, or a dict of ``[N, ...]``) over its distinct
    captions; the batch entries named in ``keep`` are carried along when present. Kept on CPU;
    ``states_dir``: the text states in memory-mapped files there instead (``disk_states``).
    The one place latents and text states are precomputed: ``model.cache=true`` runs it over the
    training set, ``prepare.encode=true`` over each batch it writes to shards."""
    moments, captions, extras = [], [], {}
    keep = tuple(dict.fromkeys(keep))  # a key named twice (module and data both ask for it) is kept once
    # own generator: creating a loader iterator draws a seed, which must not move the global RNG
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, generator=torch.Generator())
    for batch in tqdm(loader, desc="caching latents", leave=False, disable=not progress):
        moments.append(moments_fn(batch["pixel_values"].to(device)).cpu())
        if "caption" in batch:
            captions.extend(batch["caption"])
        for key in keep:
            if key in batch:
                extras.setdefault(key, []).append(batch[key])
    states = index = None
    if text_fn is not None and captions:
        distinct = list(dict.fromkeys(captions))
        position = {c: i for i, c in enumerate(distinct)}
        chunks = (text_fn(distinct[i : i + batch_size]) for i in range(0, len(distinct), batch_size))
        if states_dir is not None:
            states = disk_states(chunks, len(distinct), states_dir)
        else:
            chunks = list(chunks)
            if isinstance(chunks[0], dict):
                states = {k: torch.cat([c[k].cpu() for c in chunks]) for k in chunks[0]}
            else:
                states = torch.cat([c.cpu() for c in chunks])
        index = torch.tensor([position[c] for c in captions])
    return CachedLatentDataset(torch.cat(moments), captions or None, states, index, {k: torch.cat(v) for k, v in extras.items()})


def disk_states(chunks, n: int, folder: str) -> dict[str, torch.Tensor]:
    """Text-state chunks (dicts of ``[b, ...]``, ``n`` rows in all) written into one memory-mapped file
    per key in ``folder`` (``torch.from_file(shared=True)``): the cache holds a file-backed tensor, so
    large states (T5's ``[L, 4096]`` per caption) page in from disk as batches need them instead of
    living in RAM. The files are rewritten by every run that caches."""
    from pathlib import Path

    Path(folder).mkdir(parents=True, exist_ok=True)
    states, row = {}, 0
    for chunk in chunks:
        chunk = chunk if isinstance(chunk, dict) else {"encoder_hidden_states": chunk}
        for k, v in chunk.items():
            if k not in states:
                shape = (n, *v.shape[1:])
                path = Path(folder) / f"{k}.bin"
                path.unlink(missing_ok=True)
                states[k] = torch.from_file(str(path), shared=True, size=int(torch.Size(shape).numel()), dtype=v.dtype).view(shape)
            states[k][row : row + len(v)] = v.cpu()
        row += len(v)
    return states
