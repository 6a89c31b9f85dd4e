"""Moved to ``embdim.sharding.distributed`` (the distributed environment belongs to the layer that
shards). This name stays importable for code written before the move: it is the same module
object, so monkeypatching either name patches both."""

import sys

from embdim.sharding import distributed as _distributed

sys.modules[__name__] = _distributed
