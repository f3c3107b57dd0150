"""A tiny random ``QwenImageEditPipeline``, built offline: the tiny Qwen-Image parts (``testing/qwen_image.py``)
plus a ``Qwen2VLProcessor`` built from the tiny tokenizer and Qwen2-VL's image processor without a video
processor (``families/qwen_image_edit.qwen_vl_processor`` says why). ``--kind qwen_image_edit``."""

from __future__ import annotations

from diffusion_lab.testing import qwen_image


def tiny_qwen_processor(tokenizer=None):
    """A ``Qwen2VLProcessor`` of the tiny tokenizer and Qwen2-VL's image processor with its real defaults (patch
    14, merge 2, CLIP mean / std, 56 x 56 minimum), the PIL backend (no torchvision)."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    from diffusion_lab.families.qwen_image_edit import qwen_vl_processor

    return qwen_vl_processor(tokenizer or qwen_image.tiny_qwen_tokenizer(), Qwen2VLImageProcessorPil())


def tiny_pipeline(resolution: int = 32, seed: int = 0):
    """A ``QwenImageEditPipeline`` of the tiny Qwen-Image parts (the transformer layout is the text-to-image one:
    reference tokens are appended to the image tokens; the text encoder's vision tower now sees the source image)."""
    from diffusers import QwenImageEditPipeline

    parts = qwen_image.tiny_pipeline(resolution, seed).components
    return QwenImageEditPipeline(**parts, processor=tiny_qwen_processor(parts["tokenizer"]))
