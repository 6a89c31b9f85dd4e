"""``IdRemapper`` on TorchRec inputs: a ``KeyedJaggedTensor``, a ``Batch``, or a dataset of them.

TorchRec pipelines (``torchrec.datasets.random.RandomRecDataset``, the Criteo data pipes, a user's
own loader) yield ``torchrec.datasets.utils.Batch(dense_features, sparse_features: KJT, labels)``.
The compact module needs the KJT after the remap (kept ids renumbered per width group, pruned ids
dropped); doing it here, in the data pipeline, keeps the KJT that reaches the sharded collection
straight from the batch, as ``TrainPipelineSparseDist`` needs (the README's pipeline recipe).

The remap itself is the numpy path of ``IdRemapper.remap_arrays``: a KJT is split into per-key
``(values, lengths)`` arrays on the host, remapped, and rebuilt on the input's device.

Example::

    remapper = IdRemapper(load_plan("runs/oe"), feature_names={"C1": "cat_0", ...})
    kjt = remapper(kjt)                              # KJT -> KJT with keys remapper.feature_names
    batch = remapper(batch)                          # Batch -> Batch (dense and labels untouched)
    loader = DataLoader(remap_dataset(dataset, remapper), batch_size=None, num_workers=2)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import Dataset, IterableDataset
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods.mixed_dim import features_to_kjt
from embdim.embedding_methods.remap import IdRemapper, RemapError


def kjt_to_arrays(kjt: KeyedJaggedTensor) -> tuple[dict[str, tuple[np.ndarray, np.ndarray]], int]:
    """``({key: (values int64, lengths int32)}, batch_size)`` of a KJT, on the host."""
    if kjt.weights_or_none() is not None:
        raise RemapError(f"IdRemapper: the KJT with keys {kjt.keys()} carries per-id weights; the compact "
                         f"module's tables are unweighted (sum pooling), so remap an unweighted KJT")
    if kjt.variable_stride_per_key():
        raise RemapError(f"IdRemapper: the KJT with keys {kjt.keys()} has a variable batch size per key; "
                         f"the remapper needs one batch size for every key")
    batch_size = kjt.stride()
    values = kjt.values().detach().to("cpu", torch.int64).numpy()
    lengths = kjt.lengths().detach().to("cpu", torch.int32).numpy()
    keys = kjt.keys()
    if lengths.shape != (batch_size * len(keys),):
        raise RemapError(f"IdRemapper: the KJT with keys {keys} has {lengths.shape[0]} lengths, expected "
                         f"{len(keys)} keys x batch size {batch_size}")
    ends = np.cumsum(lengths.reshape(len(keys), batch_size).sum(axis=1, dtype=np.int64))
    if len(keys) and ends[-1] != values.shape[0]:
        raise RemapError(f"IdRemapper: the KJT's lengths add up to {int(ends[-1])} but it has {values.shape[0]} values")
    starts = np.concatenate([[0], ends[:-1]])
    arrays = {key: (values[s:e], lengths[i * batch_size:(i + 1) * batch_size])
              for i, (key, s, e) in enumerate(zip(keys, starts, ends))}
    return arrays, batch_size


def remap_kjt(remapper: IdRemapper, kjt: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """The remapped KJT (keys ``remapper.feature_names``), on the input KJT's device."""
    arrays, batch_size = kjt_to_arrays(kjt)
    out = features_to_kjt(remapper.remap_arrays(arrays, batch_size), remapper.feature_names)
    return out if kjt.device().type == "cpu" else out.to(kjt.device())


def remap_torchrec(remapper: IdRemapper, item: Any) -> Any:
    """``IdRemapper.__call__`` for a KJT, or a ``Batch``-like object with a ``sparse_features`` KJT.

    A batch is copied with the remapped KJT (``dataclasses.replace`` keeps its class, so
    ``torchrec.datasets.utils.Batch`` and user subclasses stay what they were); its dense
    features and labels are the same tensors.
    """
    if isinstance(item, KeyedJaggedTensor):
        return remap_kjt(remapper, item)
    sparse = getattr(item, "sparse_features", None)
    if isinstance(sparse, KeyedJaggedTensor):
        remapped = remap_kjt(remapper, sparse)
        if dataclasses.is_dataclass(item) and not isinstance(item, type):
            return dataclasses.replace(item, sparse_features=remapped)
        return type(item)(dense_features=item.dense_features, sparse_features=remapped, labels=item.labels)
    raise TypeError(f"IdRemapper takes a dict of (values, lengths) arrays, a KeyedJaggedTensor or a Batch "
                    f"with a KeyedJaggedTensor in sparse_features; got {type(item).__name__}")


class RemappedDataset(Dataset):
    """A map-style dataset whose items (``Batch`` or KJT) go through an ``IdRemapper``.

    Args:
        dataset (Dataset): the user's dataset; ``len`` and indexing are passed through.
        remapper (IdRemapper): the plan's remapper.
    """

    def __init__(self, dataset: Dataset, remapper: IdRemapper) -> None:
        self.dataset = dataset
        self.remapper = remapper

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: Any) -> Any:
        return self.remapper(self.dataset[index])


class RemappedIterableDataset(IterableDataset):
    """An iterable dataset (e.g. ``RandomRecDataset``) whose batches go through an ``IdRemapper``.

    Iteration is the wrapped dataset's, so its sharding across ``DataLoader`` workers (through
    ``get_worker_info``) is unchanged.
    """

    def __init__(self, dataset: IterableDataset, remapper: IdRemapper) -> None:
        self.dataset = dataset
        self.remapper = remapper

    def __iter__(self) -> Iterator[Any]:
        for item in self.dataset:
            yield self.remapper(item)


def remap_dataset(dataset: Dataset, remapper: IdRemapper) -> Dataset:
    """Wraps a dataset of ``Batch`` (or KJT) items so that every item is remapped.

    An ``IterableDataset`` gives a ``RemappedIterableDataset``, anything else with ``__getitem__``
    a ``RemappedDataset``. Both are picklable, so ``DataLoader`` workers remap in parallel.
    """
    if isinstance(dataset, IterableDataset):
        return RemappedIterableDataset(dataset, remapper)
    if not hasattr(dataset, "__getitem__"):
        raise TypeError(f"remap_dataset: {type(dataset).__name__} is neither an IterableDataset nor indexable")
    return RemappedDataset(dataset, remapper)
