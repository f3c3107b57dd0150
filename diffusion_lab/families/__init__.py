"""Model families: what each text-to-image family does differently (``families/base.py``)."""
