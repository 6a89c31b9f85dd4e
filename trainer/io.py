"""Moved to ``embdim.io`` (the bottom layer every package may import). This name stays importable
for code written before the move: it is the same module object, so monkeypatching either name
patches both."""

import sys

from embdim import io as _io

sys.modules[__name__] = _io
