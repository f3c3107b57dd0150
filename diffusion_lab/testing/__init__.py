"""Builders for tests and offline demos: tiny random pipelines of every model family, saved in
diffusers format with offline tokenizers (no download). ``python -m diffusion_lab.tiny_sd DIR --kind K``
writes one; the same factories are the ``_target_`` of the ``*_tiny`` config options."""
