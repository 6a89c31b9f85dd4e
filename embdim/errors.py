"""User-facing error bases shared by every layer (the bottom layer: imports nothing from embdim).

The CLI prints these as one ``embdim: error:`` line. They live here, below ``trainer/``,
``sharding/`` and ``embedding_methods/``, so that a method or the planner can raise the same
error class as the config loader without importing the trainer.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration file or override is invalid; the message names the file and key."""


def check(condition: bool, key: str, message: str) -> None:
    """Raises ``ConfigError("<key>: <message>")`` unless ``condition``: the one style of a config
    section's ``__post_init__`` validation."""
    if not condition:
        raise ConfigError(f"{key}: {message}")
