"""embdim: learned embedding sizes for TorchRec-sharded CTR models.

The project's top-level folders ``trainer/``, ``sharding/``, ``embedding_methods/`` and
``launch/`` are this package's subpackages: code imports them as ``embdim.trainer`` and so on,
never as bare ``trainer``, so a user's own ``trainer``, ``launch`` or ``sharding`` package on
``sys.path`` cannot shadow them (or be shadowed). In a source checkout (editable install, or the
repository root on ``PYTHONPATH``) the subpackages are found in the folder above this one; an
installed wheel places them inside this package (``setup.py`` maps them).
"""

from __future__ import annotations

import os

SUBPACKAGES = ("trainer", "sharding", "embedding_methods", "launch")
"""The project's top-level folders, importable as ``embdim.<name>``."""

_here = os.path.dirname(os.path.abspath(__file__))
if not os.path.isdir(os.path.join(_here, SUBPACKAGES[0])):
    # Source checkout: the subpackages sit beside this folder, in the repository root.
    __path__.append(os.path.dirname(_here))  # noqa: F821 (module __path__ of a package)
