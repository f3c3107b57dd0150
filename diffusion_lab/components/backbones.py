"""Backbones other than diffusers' UNets, built from the ``backbone`` group (its name from the
UNet days: any denoiser ``net(x_t [N,C,H,W], t [N], **cond).sample -> [N,C,H,W]``).

``dit_transformer``: a class-conditional ``DiTTransformer2DModel`` (Peebles & Xie 2023) whose label
table has the layout ``DiTPipeline`` samples: rows ``0..num_class_embeds-1`` are the classes and
row ``null_class`` the unconditional ("null") label. The DiT drops 10% of labels to ``null_class``
itself while training (diffusers' ``LabelEmbedding``, ``class_dropout_prob=0.1``), so
classifier-free guidance needs no dropout in the conditioner; sampling passes ``null_class`` as
the unconditional half (``conditioning=class_labels`` links ``null_class`` from here).
"""

from __future__ import annotations

from diffusion_lab.utils.errors import ConfigError

# DiTPipeline's unconditional label is hard-coded 1000 (ImageNet's 1000 classes + the null row):
# a DiT exported for plain diffusers with guidance_scale > 1 needs its null row there.
DIT_PIPELINE_NULL_CLASS = 1000


def dit_transformer(num_class_embeds: int, null_class: int = DIT_PIPELINE_NULL_CLASS, **config):
    """``DiTTransformer2DModel(num_embeds_ada_norm=null_class, **config)`` for ``num_class_embeds``
    classes. ``null_class`` below 1000 (e.g. = ``num_class_embeds``) makes a smaller label table, but
    plain ``DiTPipeline`` then only samples with ``guidance_scale <= 1``. ``config``: the DiT's own
    keys (``sample_size``, ``patch_size``, ``in_channels``, ``num_layers``, ...)."""
    from diffusers import DiTTransformer2DModel

    if not 0 < num_class_embeds <= null_class:
        raise ConfigError(
            f"backbone.num_class_embeds={num_class_embeds} must be between 1 and backbone.null_class={null_class} "
            f"(the DiT's label rows 0..num_class_embeds-1 are the classes, row null_class the unconditional label)."
        )
    size, patch = config.get("sample_size", 32), config.get("patch_size", 2)
    if size % patch:
        raise ConfigError(
            f"backbone.sample_size={size} is not divisible by backbone.patch_size={patch}: the DiT cuts the "
            f"input into patch_size x patch_size tokens. Use a patch_size that divides it (1, 2, ...) or another data.resolution."
        )
    return DiTTransformer2DModel(num_embeds_ada_norm=null_class, **config)


def is_dit(net) -> bool:
    """Whether ``net`` is a diffusers DiT (class labels through adaLN, ``DiTPipeline`` export)."""
    return type(net).__name__ == "DiTTransformer2DModel"
