"""Sample-quality metrics: FID / KID / IS (torchmetrics) over pluggable feature extractors,
CLIP score, and a digit classifier for offline scoring of digits runs."""

from diffusion_lab.metrics.digits import DigitClassifier, labels_from_captions, score_digit_samples

__all__ = ["DigitClassifier", "labels_from_captions", "score_digit_samples"]
