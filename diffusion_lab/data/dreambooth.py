"""DreamBooth data (Ruiz et al. 2023): instance images of the subject + class images of its class.

Items ``0 .. L-1`` are instance examples (``instance[i % n_instance]``, caption = the instance
prompt, e.g. "a photo of sks dog"), items ``L .. 2L-1`` class examples (``class_images[j % n_class]``,
caption = the class prompt, "a photo of a dog"), ``L = max(n_instance, num_class_images)`` as in
diffusers' ``train_dreambooth.py``; ``is_prior`` (0/1) tells them apart, so a shuffled batch holds
both in equal shares on average and the module weights the class half by ``prior_loss_weight``.

The class images are generated once by the base model before training (``callbacks/dreambooth.py``,
``callbacks/dreambooth.py``) into ``class_dir`` with a ``class_images.json`` manifest; a rerun or a
resume with the same ``class_dir`` reuses them, and only the missing ones are generated.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image
from torch.utils.data import Dataset

from diffusion_lab.data.image_folder import IMAGE_EXTENSIONS, ImageFolderDataset
from diffusion_lab.data.transforms import ImageTransform, to_pil
from diffusion_lab.utils.errors import ConfigError, DataError

MANIFEST = "class_images.json"
GenerateFn = Callable[[list[str]], torch.Tensor]  # prompts -> images [N, C, H, W] in [-1, 1]


def instance_images(root: str, transform: ImageTransform, caption_column: str | None = None) -> Dataset:
    """The subject's images: ``data.instance_dir`` read as ``data=image_folder`` reads a folder
    (its errors name ``data.instance_dir``, the key a DreamBooth user sets, not ``data.root``)."""
    if not Path(root).expanduser().is_dir():
        raise DataError(
            f"data.instance_dir={str(root)!r} is not a directory. Point data.instance_dir at a folder of the subject's "
            f"images (3-20 is typical; searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
        )
    return ImageFolderDataset(root, transform=transform, caption_column=caption_column)


class DreamBoothDataset(Dataset):
    """Instance examples then class examples (module docstring).

    Args:
        instance: a data set of the subject's images (``pixel_values`` and, if no
            ``instance_prompt``, a ``caption`` per image).
        instance_prompt: caption of every instance image (None: the instance set's own captions).
        class_prompt: caption of the class images; a list cycles (class image j uses ``class_prompt[j % len]``).
        class_dir: folder of the generated class images (``data.class_dir``).
        num_class_images: how many (0 = DreamBooth without prior preservation).
        transform: applied to the class images (the instance set has its own).
        max_instances: use only the first ``max_instances`` instance images (None = all).
        class_steps, class_guidance, class_batch_size, class_seed: how the base model generates the
            missing class images before training (sampler steps, classifier-free guidance, batch, seed;
            ``callbacks/dreambooth.py`` runs it).
    """

    def __init__(
        self,
        instance: Dataset,
        class_prompt: str | Sequence[str],
        class_dir: str,
        num_class_images: int,
        transform: ImageTransform,
        instance_prompt: str | None = None,
        max_instances: int | None = None,
        class_steps: int = 25,
        class_guidance: float = 7.5,
        class_batch_size: int = 16,
        class_seed: int = 0,
    ) -> None:
        self.instance = instance
        self.n_instance = min(len(instance), max_instances) if max_instances else len(instance)
        if self.n_instance == 0:
            raise DataError("The DreamBooth instance data set (data.instance) is empty: point it at the subject's images.")
        self.instance_prompt = instance_prompt
        self.class_prompts = [class_prompt] if isinstance(class_prompt, str) else list(class_prompt)
        if num_class_images < 0 or (num_class_images and not self.class_prompts):
            raise ConfigError(f"data.num_class_images={num_class_images} needs to be >= 0, with a data.class_prompt.")
        self.class_dir = Path(class_dir)
        self.num_class_images = num_class_images
        self.transform = transform
        self.length = max(self.n_instance, num_class_images)
        self.class_steps, self.class_guidance, self.class_batch_size, self.class_seed = class_steps, class_guidance, class_batch_size, class_seed

    # ---- class images ----------------------------------------------------------------------
    def class_prompt(self, j: int) -> str:
        return self.class_prompts[j % len(self.class_prompts)]

    def class_path(self, j: int) -> Path:
        return self.class_dir / f"class_{j:05d}.png"

    def missing_class_images(self) -> list[int]:
        """Indices of the class images not yet in ``class_dir`` (DataError if it holds another prompt's)."""
        manifest = self.class_dir / MANIFEST
        if manifest.is_file():
            old = json.loads(manifest.read_text())["class_prompts"]
            if old != self.class_prompts:
                raise DataError(
                    f"data.class_dir={str(self.class_dir)!r} holds class images of the prompts {old}, not of "
                    f"data.class_prompt={self.class_prompts}. Point data.class_dir at a new folder (or delete that one)."
                )
        return [j for j in range(self.num_class_images) if not self.class_path(j).is_file()]

    def generate_class_images(self, generate: GenerateFn, batch_size: int = 16, progress: bool = True) -> int:
        """Generate the missing class images with ``generate`` (the base model), a progress bar,
        each written as it comes (an interrupted run keeps what it made). Returns how many were made."""
        from tqdm.auto import tqdm

        missing = self.missing_class_images()
        if not missing:
            return 0
        self.class_dir.mkdir(parents=True, exist_ok=True)
        (self.class_dir / MANIFEST).write_text(json.dumps({"class_prompts": self.class_prompts}, indent=2))
        with tqdm(total=len(missing), desc="generating class images", disable=not progress) as bar:
            for start in range(0, len(missing), batch_size):
                chunk = missing[start : start + batch_size]
                images = generate([self.class_prompt(j) for j in chunk])
                for j, image in zip(chunk, to_pil(images)):
                    tmp = self.class_path(j).with_suffix(".tmp.png")
                    image.save(tmp)
                    tmp.replace(self.class_path(j))  # atomic: a half-written file is never a class image
                bar.update(len(chunk))
        return len(missing)

    # ---- items ----------------------------------------------------------------------------
    def __len__(self) -> int:
        return self.length * (2 if self.num_class_images else 1)

    def __getitem__(self, i: int) -> dict:
        if i < self.length:
            item = dict(self.instance[i % self.n_instance])
            if self.instance_prompt is not None:
                item["caption"] = self.instance_prompt
            if "caption" not in item:
                raise DataError("DreamBooth instance images need a caption: set data.instance_prompt (e.g. 'a photo of sks dog').")
            item = {"pixel_values": item["pixel_values"], "caption": item["caption"]}
            item["is_prior"] = torch.tensor(0)
            return item
        j = (i - self.length) % self.num_class_images
        path = self.class_path(j)
        if not path.is_file():
            raise DataError(
                f"Class image {path} is missing: class images are generated by the base model before training "
                f"(callbacks.class_images, callbacks/dreambooth.py); keep that callback on, or set data.num_class_images=0."
            )
        with Image.open(path) as image:
            pixels = self.transform(image.convert("RGB"))
        return {"pixel_values": pixels, "caption": self.class_prompt(j), "is_prior": torch.tensor(1)}


def find_dreambooth_dataset(dataset: Dataset | None) -> DreamBoothDataset | None:
    """The ``DreamBoothDataset`` inside ``dataset`` (through ``Subset``/``ConcatDataset`` wrappers), or None."""
    if dataset is None or isinstance(dataset, DreamBoothDataset):
        return dataset
    for attr in ("dataset", "datasets"):
        inner = getattr(dataset, attr, None)
        for d in inner if isinstance(inner, (list, tuple)) else [inner]:
            found = find_dreambooth_dataset(d) if d is not None else None
            if found is not None:
                return found
    return None
