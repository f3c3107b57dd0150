"""Reading a shard set: a stored sample -> a training item (``ShardItems``), litdata's streaming
dataset and loader as this project uses them, and a bucketed split read by global index."""

from __future__ import annotations

import io
import random

import numpy as np
import torch
from PIL import Image
from torch.utils.data import ConcatDataset, Dataset

from diffusion_lab.compat.litdata import allow_http_endpoints, import_litdata, read_whole_chunks
from diffusion_lab.data.image_folder import MASK_KEY
from diffusion_lab.data.transforms import ImageTransform, to_pil, to_uint8


def encode_png(pixel_values: torch.Tensor) -> bytes:
    """``[C, H, W]`` in [-1, 1] -> PNG bytes (lossless: the transform's output is uint8-valued)."""
    buf = io.BytesIO()
    to_pil(pixel_values[None])[0].save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


class ShardItems:
    """A stored sample -> a training item. Pixel samples: the PNG through ``transform`` (random
    crops/flips seeded by ``(seed, epoch, index)``, so they do not depend on workers or resume).
    The stored paired images and loss mask of the sample get the image's crop and flip.
    ``bucketed``: images keep their stored size (their bucket; only flips), drawn from Python's
    global RNG, which ``SeededItems`` seeds per ``(epoch, index)``. Encoded samples pass through,
    their float16 tensors (``prepare.store_dtype=float16``) read back as float32."""

    def __init__(self, transform: ImageTransform | None, seed: int, bucketed: bool = False) -> None:
        self.transform = transform
        self.seed = seed
        self.bucketed = bucketed

    def __call__(self, sample: dict, epoch: int) -> dict:
        item = dict(sample)
        png = item.pop("image", None)
        if png is None:
            return {k: v.float() if torch.is_tensor(v) and v.dtype == torch.float16 else v for k, v in item.items()}
        rng = None if self.bucketed else random.Random(int(np.random.SeedSequence([self.seed, epoch, int(item["index"])]).generate_state(1)[0]))
        with Image.open(io.BytesIO(png)) as im:
            geometry = self.transform.draw(im.size, rng, size=(im.height, im.width) if self.bucketed else None)
            item["pixel_values"] = self.transform.apply(im, geometry)
        if geometry.size == geometry.original_size and not geometry.flip:
            return item  # stored at the training size, not flipped: the paired values as stored
        for key, value in sample.items():  # stored aligned with the image (paired images, mask)
            if torch.is_tensor(value) and value.ndim == 3 and tuple(value.shape[1:]) == geometry.original_size:
                if key == MASK_KEY:
                    item[key] = self.transform.apply_mask(Image.fromarray(to_uint8(value * 2 - 1)[0].numpy(), "L"), geometry)
                else:
                    item[key] = self.transform.apply(to_pil(value[None])[0], geometry)
        return item


class SplitByIndex(Dataset):
    """The items ``0..n-1`` of a streaming split by their global index (``StreamingDataset[i]``)."""

    def __init__(self, streaming, n: int) -> None:
        self.streaming, self.n = streaming, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.streaming[int(i)]


class BucketedSplit(ConcatDataset):
    """A bucketed split by global index: its buckets' parts (``(bucket id, SplitByIndex)``) one
    after another. ``bucket_ids`` is what ``BucketSampler`` batches by: with the sampler's index
    lists, a few integers per item are all it keeps in memory."""

    def __init__(self, parts: list[tuple[int, SplitByIndex]]) -> None:
        super().__init__([split for _, split in parts])
        self.bucket_ids = [b for b, split in parts for _ in range(len(split))]


def dataset_class():
    StreamingDataset = import_litdata().StreamingDataset

    class ShardDataset(StreamingDataset):
        """litdata's ``StreamingDataset`` whose items go through ``items`` (with litdata's epoch).
        ``allow_http``: the chunks come from a plain-http object store (``compat.litdata.allow_http_endpoints``,
        set in each process that downloads). An item read by index from an object store comes from
        its whole chunk, downloaded to the cache: litdata's default there, a ranged read of the one
        item, assumes a row layout that its Arrow chunks (what ``ShardWriter``'s dicts are stored
        as) do not have, and reads empty bytes. Folders are read from their chunk files either way."""

        def __init__(self, input_dir: str, items: ShardItems, allow_http: bool = False, **kwargs) -> None:
            super().__init__(input_dir, **kwargs)
            self.items, self.allow_http = items, allow_http
            read_whole_chunks(self)  # the cache litdata creates on first use reads whole chunks

        @property
        def on_demand_bytes(self) -> bool:
            return False

        @on_demand_bytes.setter
        def on_demand_bytes(self, value: bool) -> None:  # litdata switches it back on after each epoch
            StreamingDataset.on_demand_bytes.fset(self, False)

        def __iter__(self):
            if self.allow_http:
                allow_http_endpoints()
            return super().__iter__()

        def __getitem__(self, index):
            if self.allow_http:
                allow_http_endpoints()
            if not self.items.bucketed:
                return self.items(super().__getitem__(index), int(self.current_epoch))
            # bucketed flips come from Python's global RNG, seeded per item (SeededItems); litdata's
            # S3 client draws from it when it is created (its refresh jitter), in the middle of that
            state = random.getstate()
            sample = super().__getitem__(index)
            random.setstate(state)
            return self.items(sample, int(self.current_epoch))

    return ShardDataset


def loader_class():
    StreamingDataLoader = import_litdata().StreamingDataLoader

    class ShardLoader(StreamingDataLoader):
        """litdata's ``StreamingDataLoader`` that remembers litdata's own state (its public
        ``state_dict()``) after each of the last batches it yielded: Lightning's prefetch runs the
        loader ahead of training, so a checkpoint takes ``position`` (the state at the batch
        training has reached), not the latest state. Lightning's own loader-state saving is
        switched off (``state_dict`` here is empty): the datamodule saves ``position`` and
        restores it with ``resume`` (litdata's ``load_state_dict``)."""

        KEEP = 16  # states remembered: Lightning prefetches one batch

        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._positions: dict[tuple[int, int], dict] = {}
            self._start = 0  # batches of the resumed epoch that the restored state had done
            self._resumed_epoch_started = False

        def state_dict(self) -> dict:
            return {}

        def load_state_dict(self, state_dict: dict) -> None:
            pass

        def __iter__(self):
            # litdata keeps replaying a restored position until one epoch runs to its end, but Lightning
            # ends an epoch after len(loader) batches without exhausting the iterator: once the resumed
            # epoch has started, the next one must start afresh (a new shuffle, every chunk).
            if self._resumed_epoch_started:
                self.restore = self._resumed_epoch_started = False
            self._resumed_epoch_started = self.restore
            start, self._start = (self._start if self.restore else 0), 0
            for n, batch in enumerate(super().__iter__(), start + 1):
                state = super().state_dict()  # nested dicts copied: litdata updates its dataset's in place
                self._positions[(self.current_epoch, n)] = {k: dict(v) if isinstance(v, dict) else v for k, v in state.items()}
                if len(self._positions) > self.KEEP:
                    del self._positions[next(iter(self._positions))]
                yield batch

        def position(self, epoch: int, batches: int) -> dict | None:
            """litdata's loader state after this rank's first ``batches`` batches of Lightning epoch
            ``epoch`` (litdata counts epochs from 1). None when the loader has not begun that epoch:
            at the end of fit Lightning counts the next epoch, which a resumed run starts afresh."""
            if self.current_epoch == epoch:
                return None
            return self._positions[(epoch + 1, batches)]  # a KeyError if it is not among the last KEEP

        def resume(self, epoch: int, batches: int, position: dict | None) -> None:
            """Continue Lightning epoch ``epoch`` after this rank's first ``batches`` batches, from
            ``position`` (what ``position`` returned then; None at the start of the epoch)."""
            if position is None:
                self.current_epoch = epoch  # __iter__ adds one: litdata counts epochs from 1
                return
            super().load_state_dict(position)
            self._start = batches

    return ShardLoader
