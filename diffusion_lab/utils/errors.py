"""User-facing errors: one paragraph that names the file or config key and the fix."""

from __future__ import annotations


class DiffusionLabError(RuntimeError):
    """Base class for input/config errors meant to be read by a person, not debugged."""


class DataError(DiffusionLabError):
    """A data set could not be read (missing folder, corrupt file, missing captions, ...)."""


class ConfigError(DiffusionLabError):
    """A config value is wrong or two config values disagree."""


class TrainingError(DiffusionLabError):
    """Training cannot go on (e.g. the loss became nan/inf); the message says what was kept."""
