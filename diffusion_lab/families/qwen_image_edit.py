"""Qwen-Image-Edit (Qwen/Qwen-Image-Edit): Qwen-Image trained to edit a source image by instruction.

What differs from text-to-image (``families/qwen_image.py``), as ``QwenImageEditPipeline`` does it:

- the source is resized to about ``condition_area`` pixels at its aspect ratio (``calculate_dimensions(1024 * 1024,
  w / h)``, sides multiples of 32), then used twice: VAE-encoded (posterior mode, per-channel normalised:
  ``_encode_vae_image``) into reference latents whose packed tokens are appended to the image tokens
  (``img_shapes`` gets a second entry; the prediction keeps the target tokens only), and seen by Qwen2.5-VL's
  vision tower inside the edit template (``<|vision_start|><|image_pad|><|vision_end|>`` before the instruction),
  so the text states hold the image tokens too and depend on the source (``_get_qwen_prompt_embeds`` with
  ``Qwen2VLProcessor``); the template's first 64 tokens (system prefix) are dropped and, unlike text-to-image,
  the states are never truncated.
- the shift ``mu`` counts the target tokens only.

Training pairs: the training image is the edit's target, its source the batch key ``source_key``
(``source_pixel_values`` ``[N, C, H, W]`` in [-1, 1]) that ``data=image_folder`` loads with
``data.paired_images='{source_image: source_pixel_values}'`` (ControlNet's paired-image mechanism).

Processor: transformers 5's ``Qwen2VLProcessor`` insists on a video processor, and every video processor needs
torchvision, which this CPU install does not have. ``qwen_vl_processor`` builds the processor from its two parts
that editing uses (tokenizer + ``Qwen2VLImageProcessorPil``, the PIL backend of Qwen2-VL's image processor, same
defaults) and declares only those two as its attributes, so it encodes, saves (``processor/`` with the tokenizer and
``processor_config.json`` naming ``Qwen2VLImageProcessor``) and is passed to the pipeline like the real one.
``load_processor`` loads the full processor where torchvision is installed and these parts elsewhere; a plain
``QwenImageEditPipeline.from_pretrained(folder)`` needs torchvision for the same reason, without it pass
``processor=load_processor(folder)``. The PIL and torchvision image backends may resize a source slightly differently.

Limits of the shared module (what this family cannot express yet): text states that depend on the batch's source
image are computed in ``conditioning`` every step (``text_states`` returns placeholders they replace, so
``model.cache`` caches the target latents and nothing of the text), caption dropout is drawn here, and previews run without true CFG (the negative
prompt's states also need the image: ``cfg = False``; sample the export with ``true_cfg_scale`` and a
``negative_prompt`` for guided edits). Previews edit the first training sources (``datamodule.sample_batch``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch

from diffusion_lab.components.pretrained import Dtype, resolve
from diffusion_lab.families.qwen_image import (
    TOKENIZER_MAX_LENGTH,
    QwenImage,
    QwenTextConditioner,
    pack,
    unpack,
)
from diffusion_lab.utils.errors import ConfigError

# QwenImageEditPipeline.__init__: prompt_template_encode, prompt_template_encode_start_idx
EDIT_TEMPLATE = (
    "<|im_start|>system\nDescribe the key features of the input image (color, shape, size, texture, objects, background), then explain "
    "how the user's text instruction should alter or modify the image. Generate a new image that meets the user's requirements while "
    "maintaining consistency with the original input where appropriate.<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
    "<|vision_end|>{}<|im_end|>\n<|im_start|>assistant\n"
)
EDIT_DROP_IDX = 64
CONDITION_AREA = 1024 * 1024  # __call__: calculate_dimensions(1024 * 1024, width / height) for the source
SOURCE_KEY = "source_pixel_values"


def _processor_parts() -> list[str]:
    return ["image_processor", "tokenizer"]


def qwen_vl_processor(tokenizer, image_processor):
    """A ``Qwen2VLProcessor`` of ``tokenizer`` and ``image_processor`` only (no video processor: see the module
    docstring); the class is the real one, so ``model_index.json`` names ``transformers.Qwen2VLProcessor``."""
    from transformers import Qwen2VLProcessor

    processor = Qwen2VLProcessor.__new__(Qwen2VLProcessor)
    processor.get_attributes = _processor_parts  # what __init__ checks and save_pretrained writes
    Qwen2VLProcessor.__init__(processor, image_processor=image_processor, tokenizer=tokenizer, video_processor=None)
    return processor


def load_processor(pretrained: str | None, subfolder: str = "processor", local_files_only: bool = False):
    """The pipeline's ``processor/``: ``Qwen2VLProcessor.from_pretrained`` where torchvision is installed, else
    ``qwen_vl_processor`` of its tokenizer and image processor (the PIL backend)."""
    from transformers import Qwen2Tokenizer, Qwen2VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )
    from transformers.utils import is_torchvision_available

    source = resolve(pretrained, subfolder)
    kwargs = dict(subfolder=subfolder, local_files_only=local_files_only)
    if is_torchvision_available():
        return Qwen2VLProcessor.from_pretrained(source, **kwargs)
    return qwen_vl_processor(Qwen2Tokenizer.from_pretrained(source, **kwargs), Qwen2VLImageProcessorPil.from_pretrained(source, **kwargs))


class QwenEditTextConditioner(QwenTextConditioner):
    """``QwenImageEditPipeline.encode_prompt``: the instruction in the edit template with the source image, through
    ``Qwen2VLProcessor`` (image patches + ``image_grid_thw``) and the whole Qwen2.5-VL; states after the 64-token
    prefix (image tokens included), zero-padded to ``max_sequence_length`` with the mask (never truncated: a longer
    one is a ConfigError). Without images it encodes as ``QwenTextConditioner`` with the edit template.

    Args:
        tokenizer, text_encoder, processor: ``tokenizer/``, ``text_encoder/``, ``processor/`` of the pipeline.
        max_sequence_length: states per caption: image tokens (about 1/4 per 28 x 28 patch) + instruction + 5.
        trainable, dtype: as ``TextConditioner``.
    """

    template, drop_idx, truncate = EDIT_TEMPLATE, EDIT_DROP_IDX, False

    def __init__(self, tokenizer, text_encoder: torch.nn.Module, processor, max_sequence_length: int = TOKENIZER_MAX_LENGTH, trainable: bool = False, dtype: Dtype = "float32") -> None:
        super().__init__(tokenizer, text_encoder, max_sequence_length, trainable, dtype)
        self.processor = processor

    @property
    def tokenizers(self) -> tuple:
        """The tokenizer and the processor: the pipeline's ``tokenizer`` and ``processor`` components."""
        return (self.tokenizer, self.processor)

    def inputs(self, captions: Sequence[str], images=None) -> dict[str, torch.Tensor]:
        if images is None:
            return super().inputs(captions)
        return dict(self.processor(text=[self.template.format(c) for c in captions], images=images, padding=True, return_tensors="pt"))


class QwenImageEdit(QwenImage):
    """Qwen-Image trained to edit: ``conditioning`` resizes the source as the pipeline does, encodes it into reference
    latents and the image-aware text states; ``forward`` appends the reference tokens.

    Args:
        source_key: the batch key of the source images.
        condition_area: pixels the source is resized to at its aspect ratio (the pipeline's 1024 x 1024; a square
            source at ``data.resolution=1024`` is used as it is).
    """

    name = "latent_qwen_image_edit"
    pipeline_class = "QwenImageEditPipeline"
    tokenizer_names = ("tokenizer", "processor")
    cfg = False  # see the module docstring: the negative prompt's states need the source image too
    edits = True
    refuses: ClassVar[dict[str, str | None]] = {
        **QwenImage.refuses,
        "edit": None,
        "dreambooth": "DreamBooth's class images have no source image to edit.",
    }

    def __init__(self, source_key: str = SOURCE_KEY, condition_area: int = CONDITION_AREA, preview_sources: int = 16) -> None:
        self.source_key, self.condition_area, self.preview_sources = source_key, condition_area, preview_sources
        self.cached_batch_keys = (source_key,)  # the latent cache carries the sources along
        self._previews: torch.Tensor | None = None

    def check_parts(self, backbone, codec, conditioner, resolution: int, image_channels: int) -> None:
        super().check_parts(backbone, codec, conditioner, resolution, image_channels)
        if not isinstance(conditioner, QwenEditTextConditioner):
            raise ConfigError(f"model={self.name} needs text_encoder=qwen_image_edit_pretrained (the processor that shows Qwen2.5-VL the source image); got {type(conditioner).__name__}.")

    def text_states(self, conditioner, captions: list[str]) -> dict[str, torch.Tensor]:
        """Placeholders ``[N, 1, D]`` (mask 0): the edit's text states need the source image, so ``conditioning``
        computes them and they replace these; the module's caption-only encoding (and its cache) costs nothing."""
        n, device = len(captions), conditioner.text_encoder.device
        return {"encoder_hidden_states": torch.zeros(n, 1, conditioner.hidden_size, device=device), "encoder_hidden_states_mask": torch.zeros(n, 1, device=device)}

    def sources(self, module, source: torch.Tensor):
        """Source images ``[n, C, H, W]`` in [-1, 1] -> (PIL images for the processor, ``[n, C, h, w]`` for the VAE) at
        the pipeline's size: ``image_processor.resize`` to ``calculate_dimensions(condition_area, W / H)`` then
        ``preprocess``."""
        from diffusers.image_processor import VaeImageProcessor
        from diffusers.pipelines.qwenimage.pipeline_qwenimage_edit import (
            calculate_dimensions,
        )

        processor = VaeImageProcessor(vae_scale_factor=module.codec.downsample_factor * 2)
        images = processor.postprocess(source.detach().float().cpu(), output_type="pil")
        width, height, _ = calculate_dimensions(self.condition_area, images[0].size[0] / images[0].size[1])
        images = processor.resize(images, height, width)
        return images, processor.preprocess(images, height, width).to(module.device)

    def conditioning(self, module, batch: dict | None, n: int, sampling: bool) -> dict[str, torch.Tensor]:
        """``reference_latents`` ``[n, c, h', w']`` (posterior mode) and the instructions' image-aware text states
        (replacing the caption-only ones; while training each caption is "" with probability ``caption_dropout``)."""
        source = self.edit_sources(module, batch, n, sampling)
        captions = list((batch or {}).get("caption") or [""] * n)
        p = module.hparams.get("caption_dropout", 0.0)
        if not sampling and p > 0:
            captions = ["" if d else c for c, d in zip(captions, (torch.rand(n) < p).tolist())]
        images, pixels = self.sources(module, source)
        states = module.conditioner(captions, images=images)
        return {**{k: v.to(module.device) for k, v in states.items()}, "reference_latents": module.codec.encode(pixels, sample=False)}

    def forward(self, backbone, x_t: torch.Tensor, t: torch.Tensor, encoder_hidden_states, encoder_hidden_states_mask=None, reference_latents=None, **controls) -> torch.Tensor:
        """``__call__``'s transformer call: target tokens then reference tokens, ``img_shapes`` [(1, h/2, w/2), (1, h'/2,
        w'/2)]; the prediction of the target tokens only."""
        if reference_latents is None:
            raise ConfigError(f"model={self.name} denoises with the source image's reference latents; the conditioning has none.")
        n, _, h, w = x_t.shape
        hr, wr = reference_latents.shape[-2:]
        out = backbone(
            hidden_states=torch.cat([pack(x_t), pack(reference_latents.to(x_t.dtype))], dim=1),
            timestep=(t / 1000).to(x_t.dtype),
            encoder_hidden_states=encoder_hidden_states,
            encoder_hidden_states_mask=encoder_hidden_states_mask,
            img_shapes=[[(1, h // 2, w // 2), (1, hr // 2, wr // 2)]] * n,
            **controls,
        ).sample
        return unpack(out[:, : (h // 2) * (w // 2)], h, w)

