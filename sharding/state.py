"""Reading and editing the local shards of sharded embedding tables, and small collectives.

The ``ShardedTensor`` local shards in ``model.state_dict()`` are live views of the FBGEMM TBE
weights (docs/torchrec-notes.md#sharded-weights): reading them costs no copy and writing them changes the next lookup.
Each rank touches only its own shards, so editing needs no collective; assembling a full table
(``gather_table``) does.

A table is named by its ``EmbeddingBagConfig.name`` (``t_<field>``); the state-dict key is found
by suffix (``...embedding_bags.<name>.weight`` for bags, ``...embeddings.<name>.weight`` for an
``EmbeddingCollection``), so the helpers work wherever the collection sits in the model.

Example::

    for row, col, block in local_shards(dmp, "t_c0"):   # block: [rows, cols] view
        block[:, :4].zero_()                            # (under torch.no_grad())
    full = gather_table(dmp, "t_c0")                    # [num_embeddings, dim] on every rank

``load_checkpoint_tables`` reads tables of a DCP checkpoint into the live shards (a warm start
from a trained baseline).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

try:  # DTensor state dicts appear with ShardingEnv(output_dtensor=True)
    from torch.distributed.tensor import DTensor
except ImportError:  # pragma: no cover - older torch
    DTensor = ()  # type: ignore[assignment,misc]


def _is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def table_keys(model: nn.Module) -> dict[str, str]:
    """``{table_name: state_dict_key}`` for every embedding table in the model."""
    out = {}
    for key in model.state_dict().keys():
        parts = key.split(".")
        if len(parts) >= 3 and parts[-1] == "weight" and parts[-3] in ("embedding_bags", "embeddings"):
            out.setdefault(parts[-2], key)
    return out


def _table_tensor(model: nn.Module, table_name: str) -> torch.Tensor:
    state = model.state_dict()
    suffixes = (f"embedding_bags.{table_name}.weight", f"embeddings.{table_name}.weight")
    matches = [k for k in state if k.endswith(suffixes) and k.split(".")[-2] == table_name]
    if not matches:
        raise KeyError(f"no embedding table {table_name!r} in the model; tables are {sorted(table_keys(model))}")
    if len(matches) > 1:
        raise KeyError(f"embedding table name {table_name!r} is ambiguous: {matches}")
    return state[matches[0]]


def local_shards(model: nn.Module, table_name: str) -> Iterator[tuple[int, int, torch.Tensor]]:
    """Yields ``(row_offset, col_offset, block)`` for each shard of the table held by this rank.

    ``block`` is a live ``[rows, cols]`` view of the weights: edit it under ``torch.no_grad()``.
    A data-parallel (replicated) table yields one block, the whole table, on every rank.
    """
    tensor = _table_tensor(model, table_name)
    if isinstance(tensor, ShardedTensor):
        for shard in tensor.local_shards():
            row, col = shard.metadata.shard_offsets[:2]
            yield int(row), int(col), shard.tensor
    elif DTensor and isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        local = tensor.to_local()
        if local.numel() > 0:
            _, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
            yield int(offset[0]), int(offset[1]), local
    else:
        yield 0, 0, tensor


def is_replicated(model: nn.Module, table_name: str) -> bool:
    """True for a data-parallel table (a full plain tensor on every rank)."""
    tensor = _table_tensor(model, table_name)
    return not isinstance(tensor, ShardedTensor) and not (DTensor and isinstance(tensor, DTensor))


def table_shape(model: nn.Module, table_name: str) -> tuple[int, int]:
    """Global ``(num_embeddings, embedding_dim)`` of a (sharded) table."""
    rows, cols = _table_tensor(model, table_name).size()[:2]
    return int(rows), int(cols)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over all ranks in place and returns it (identity on one rank).

    With NCCL the tensor must live on this rank's GPU; gloo takes CPU tensors.
    """
    if _is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def gather_table(model: nn.Module, table_name: str) -> torch.Tensor:
    """The full ``[num_embeddings, embedding_dim]`` weight of a table, on every rank.

    Every element of a TW/RW/CW/TWRW table lives on exactly one rank, so each rank writes its
    shards into a zero tensor and a sum all-reduce assembles the table; a replicated table is
    copied as is. Collective: every rank must call it.
    """
    rows, cols = table_shape(model, table_name)
    shards = list(local_shards(model, table_name))
    if is_replicated(model, table_name):
        return shards[0][2].detach().clone()
    device = shards[0][2].device if shards else _collective_device()
    # The global dtype, which every rank knows (a rank without shards of a table-wise fp16 table
    # must not all-reduce fp32: gloo aborts on mismatched dtypes).
    full = torch.zeros(rows, cols, device=device, dtype=_table_tensor(model, table_name).dtype)
    for row, col, block in shards:
        # RW can pad the last shard past num_embeddings; keep only real rows.
        n = max(0, min(block.shape[0], rows - row))
        full[row : row + n, col : col + block.shape[1]] = block[:n].detach()
    return all_reduce_sum(full)


def _collective_device() -> torch.device:
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


BlockFn = Callable[[int, int, torch.Tensor], "torch.Tensor | None"]


@torch.no_grad()
def write_rows(model: nn.Module, table_name: str, fn: BlockFn) -> None:
    """Edits this rank's shards of a table in place.

    ``fn(row_offset, col_offset, block)`` gets each local ``[rows, cols]`` block (global row and
    column of its first element) and returns new values of the same shape, or ``None`` after
    editing ``block`` itself. Rank-local: no collective, so ranks may call it a different number
    of times. The fused optimizer's state of edited rows is left as is.
    """
    for row, col, block in local_shards(model, table_name):
        new = fn(row, col, block)
        if new is not None:
            if tuple(new.shape) != tuple(block.shape):
                raise ValueError(f"write_rows({table_name!r}): fn returned shape {tuple(new.shape)} "
                                 f"for a block of shape {tuple(block.shape)}")
            block.copy_(new)


# ---------------------------------------------------------------------------- DCP checkpoint reads
def resolve_checkpoint(path: str | Path) -> Path:
    """The DCP checkpoint folder ``path`` names: a ``step_N`` folder itself, or a run folder whose
    ``ckpt/latest`` names one (the layout ``trainer.checkpoint`` writes)."""
    path = Path(path)
    if not (path / ".metadata").exists() and (path / "ckpt" / "latest").exists():
        path = path / "ckpt" / (path / "ckpt" / "latest").read_text().strip()
    return path


def load_checkpoint_tables(model: nn.Module, path: str | Path, key_map: dict[str, str],
                           key: str = "search.init_from") -> dict[str, str]:
    """Loads tables of a DCP checkpoint into the live (possibly sharded) tables of ``model``.

    ``key_map`` maps a checkpoint table key suffix to a model key suffix (e.g.
    ``{"embedding_bags.t_a.weight": "ec.embeddings.t_a.weight"}``); each side must match exactly
    one key, the checkpoint's under its ``model.`` prefix. DCP reshards, so the checkpoint may come
    from another plan or world size. Collective. ``key`` names the setting in error messages.

    Returns:
        ``{checkpoint key: model key}`` of every table loaded.
    """
    import torch.distributed.checkpoint as dcp

    path = resolve_checkpoint(path)
    if not (path / ".metadata").exists():
        raise ValueError(f"{key}: {path} is not a checkpoint folder (no .metadata)")
    saved = list(dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata)
    model_state = model.state_dict()
    mapping = {}
    for source, target in key_map.items():
        targets = [k for k in model_state if k == target or k.endswith("." + target)]
        sources = [k for k in saved if k.startswith("model.") and k.endswith("." + source)]
        if len(targets) != 1 or len(sources) != 1:
            raise ValueError(f"{key}: expected one checkpoint table ending in {source!r} in {path} "
                             f"(found {sources}) for the model table {target!r} (found {targets})")
        mapping[sources[0]] = targets[0]
    state = {src: model_state[dst] for src, dst in mapping.items()}
    dcp.load(state, checkpoint_id=str(path))
    # DCP loads ShardedTensor shards (live views of the TBE weights) in place; plain tensors it may
    # replace, so copy those back.
    with torch.no_grad():
        for src, dst in mapping.items():
            if state[src] is not model_state[dst] and not hasattr(model_state[dst], "local_shards"):
                model_state[dst].copy_(state[src])
    return mapping
