"""Captions from prompt templates, for a folder of a few concept images without captions (textual
inversion and DreamBooth-style concepts, as in Gal et al. 2022 and diffusers' ``textual_inversion.py``):
each item without a caption gets one of the templates of its kind, filled with the concept's token.

    data=image_folder data.root=DIR data.caption_column=null data.caption_templates=object   # or style
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from torch.utils.data import Dataset

from diffusion_lab.utils.errors import ConfigError

TEMPLATES: dict[str, tuple[str, ...]] = {
    "object": (
        "a photo of a {}", "a rendering of a {}", "a cropped photo of the {}", "a photo of the {}", "a close-up photo of a {}",
        "a bright photo of the {}", "a dark photo of a {}", "a good photo of the {}", "a photo of one {}", "a small {}", "a large {}",
    ),
    "style": (
        "a painting in the style of {}", "a rendering in the style of {}", "a cropped painting in the style of {}",
        "a picture in the style of {}", "a close-up painting in the style of {}", "a bright painting in the style of {}",
        "a dark picture in the style of {}", "a good painting in the style of {}", "an illustration in the style of {}",
    ),
}


def templates_of(kind: str | Sequence[str]) -> tuple[str, ...]:
    """``object`` | ``style`` | your own list of strings with one ``{}`` each."""
    if isinstance(kind, str):
        if kind not in TEMPLATES:
            raise ConfigError(f"data.caption_templates={kind!r}: use object, style, or a list of templates with one {{}} each (the token goes there).")
        return TEMPLATES[kind]
    out = tuple(kind)
    if not out or any(t.count("{}") != 1 for t in out):
        raise ConfigError(f"data.caption_templates={list(out)}: each template needs exactly one {{}} (where the token goes).")
    return out


class TemplateCaptions(Dataset):
    """``dataset``'s items; one without a ``caption`` gets a template filled with ``token`` (drawn from
    Python's RNG, which the datamodule seeds per item and epoch, so a resumed run draws the same)."""

    def __init__(self, dataset: Dataset, templates: str | Sequence[str], token: str | None) -> None:
        if not token:
            raise ConfigError(
                "data.caption_templates fills captions with a concept token, but none is set: give data.caption_token "
                "(adapter=textual_inversion sets it to adapter.placeholder_token), e.g. data.caption_token='<my-cat>'."
            )
        self.dataset, self.templates, self.token = dataset, templates_of(templates), token

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i) -> dict:
        item = dict(self.dataset[i])
        if "caption" not in item:
            item["caption"] = random.choice(self.templates).format(self.token)
        return item

    def __getattr__(self, name: str):  # paired_keys, bucket_ids, caption_note, ...: the wrapped data set's
        if name == "dataset":
            raise AttributeError(name)
        return getattr(self.dataset, name)
