"""The CTR model: TorchRec's DLRM (or DLRM_DCN) over one embedding table per sparse field.

The sparse module is built on the ``meta`` device, so its tables are only materialised shard by
shard when ``DistributedModelParallel`` places them. ``torchrec.models.dlrm`` stays unmodified:
later phases swap in their own sparse module through ``sparse_module_factory``; it must stand in
for an ``EmbeddingBagCollection`` as ``SparseArch`` sees it (``forward(KJT) -> KeyedTensor`` of
uniform width, ``embedding_bag_configs()`` reporting that width) and hold the real collection as a
child, so that DMP finds and shards it and ``TrainPipelineSparseDist`` can pipeline it.

Example::

    manifest = load_manifest("data/")
    model = build_model(config.model, manifest, device=torch.device("cpu"))
    loss, (loss_detached, logits, labels) = model(batch)  # after sharding
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain
from torchrec.modules.embedding_configs import BaseEmbeddingConfig, DataType, EmbeddingBagConfig, data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection, EmbeddingCollection

from embdim.trainer.config import ConfigError, ModelConfig
from embdim.trainer.data.manifest import Manifest

SparseModuleFactory = Callable[[list[EmbeddingBagConfig]], nn.Module]
AuxLossFn = Callable[[nn.Module], "torch.Tensor | None"]

logger = logging.getLogger(__name__)

# ``model.table_dtype`` -> TorchRec's table data type. The sharders turn it into the TBE's
# ``weights_precision`` (torchrec ``data_type_to_sparse_type``), so a sharded fp16 table stores
# 2-byte weights on every rank; the pooled output and the fused optimizer's state stay fp32.
TABLE_DATA_TYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def table_data_type(table_dtype: str) -> DataType:
    """TorchRec ``DataType`` of a ``model.table_dtype`` setting ("fp32" or "fp16")."""
    if table_dtype not in TABLE_DATA_TYPES:
        raise ConfigError(f"model.table_dtype: unknown {table_dtype!r}; choose from {list(TABLE_DATA_TYPES)}")
    return TABLE_DATA_TYPES[table_dtype]


def table_name(field_name: str) -> str:
    """The embedding table of a sparse field (TorchRec DLRM convention ``t_<feature>``)."""
    return f"t_{field_name}"


def build_tables(manifest: Manifest, embedding_dim: int,
                 data_type: DataType = DataType.FP32) -> list[EmbeddingBagConfig]:
    """One full-width ``EmbeddingBagConfig`` per sparse field of the dataset, in manifest order,
    stored as ``data_type`` (``table_data_type(config.model.table_dtype)``)."""
    return [
        EmbeddingBagConfig(
            name=table_name(f.name),
            embedding_dim=embedding_dim,
            num_embeddings=f.num_embeddings,
            feature_names=[f.name],
            data_type=data_type,
        )
        for f in manifest.sparse
    ]


def dense_in_features(manifest: Manifest) -> int:
    """Width of the dense input; the reader yields one zero column when a dataset has no dense feature."""
    return max(1, len(manifest.dense))


def _add_aux_loss(loss: torch.Tensor, aux: "_AuxLoss") -> torch.Tensor:
    value = aux.fn(aux.sparse_arch.embedding_bag_collection)
    return loss if value is None else loss + value


# The train pipeline fx-traces the model to find the sharded modules it can pipeline. Wrapping
# the aux-loss call keeps it a single opaque node: the callback is never run under tracing, and
# whatever it does cannot break the trace or hide the sparse module's input from the tracer.
torch.fx.wrap("_add_aux_loss")


class _AuxLoss(nn.Module):
    """Holds the aux-loss callback; a parameterless child so fx can refer to it as an attribute."""

    def __init__(self, fn: AuxLossFn, sparse_arch: nn.Module) -> None:
        super().__init__()
        self.fn = fn
        # Not registered as a child (that would duplicate the model's parameters in state_dict).
        # The SparseArch is kept rather than the sparse module because DMP may replace the
        # latter (a plain EmbeddingBagCollection) by its sharded twin.
        object.__setattr__(self, "sparse_arch", sparse_arch)


class TrainModel(nn.Module):
    """``DLRMTrain`` plus an optional auxiliary loss (a search phase's regulariser).

    ``forward(batch)`` returns ``(loss + aux, (loss, logits, labels))`` with the last three
    detached: the shape ``TrainPipelineSparseDist`` expects of a model.

    Args:
        dlrm (DLRM): a ``DLRM`` or ``DLRM_DCN``.
        aux_loss_fn (AuxLossFn | None): called with the sparse module (the EmbeddingBagCollection,
            or what ``sparse_module_factory`` built) on every training forward; a returned tensor
            is added to the loss, ``None`` adds nothing.
    """

    def __init__(self, dlrm: DLRM, aux_loss_fn: AuxLossFn | None = None) -> None:
        super().__init__()
        self.dlrm = DLRMTrain(dlrm)
        self.aux = _AuxLoss(aux_loss_fn, dlrm.sparse_arch) if aux_loss_fn is not None else None

    @property
    def sparse_module(self) -> nn.Module:
        """The module in the EBC slot of DLRM's SparseArch (sharded or a stand-in, after DMP)."""
        return self.dlrm.model.sparse_arch.embedding_bag_collection

    def forward(self, batch: Batch) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        loss, output = self.dlrm(batch)
        if self.aux is not None and self.training:
            loss = _add_aux_loss(loss, self.aux)
        return loss, output


def build_model(
    config: ModelConfig,
    manifest: Manifest,
    *,
    device: torch.device,
    sparse_module_factory: SparseModuleFactory | None = None,
    aux_loss_fn: AuxLossFn | None = None,
) -> TrainModel:
    """Builds the unsharded model: sparse module on ``meta``, dense arch on ``device``.

    Args:
        config (ModelConfig): widths, interaction and the tables' storage precision.
        manifest (Manifest): the dataset (sparse fields and their cardinalities, dense count).
        device (torch.device): where the dense arch lives (DMP moves the embeddings).
        sparse_module_factory (SparseModuleFactory | None): ``tables -> module`` standing in for
            the ``EmbeddingBagCollection``; the tables are the full-width ones of the manifest
            (at ``config.table_dtype``). The module chooses its own tables' precision: one whose
            tables differ from ``config.table_dtype`` (a search module) is logged.
        aux_loss_fn (AuxLossFn | None): see ``TrainModel``.
    """
    data_type = table_data_type(config.table_dtype)
    tables = build_tables(manifest, config.embedding_dim, data_type)
    if sparse_module_factory is None:
        sparse: nn.Module = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    else:
        sparse = sparse_module_factory(tables)
        if not hasattr(sparse, "embedding_bag_configs"):
            raise TypeError(f"sparse_module_factory returned {type(sparse).__name__} without embedding_bag_configs()")
        widths = sorted({c.embedding_dim for c in sparse.embedding_bag_configs()})
        if widths != [config.embedding_dim]:
            raise ValueError(f"the sparse module reports widths {widths}; DLRM needs the uniform "
                             f"model.embedding_dim={config.embedding_dim}")
        other = sorted({c.data_type.value.lower() for c in table_configs(sparse) if c.data_type != data_type})
        if other:
            logger.info("model.table_dtype=%s: %s keeps some tables in %s", config.table_dtype,
                        type(sparse).__name__, other)
    common = dict(
        embedding_bag_collection=sparse,
        dense_in_features=dense_in_features(manifest),
        dense_arch_layer_sizes=list(config.dense_arch_layer_sizes),
        over_arch_layer_sizes=list(config.over_arch_layer_sizes),
        dense_device=device,
    )
    if config.interaction == "dcn":
        dlrm: DLRM = DLRM_DCN(**common, dcn_num_layers=config.dcn_num_layers, dcn_low_rank_dim=config.dcn_low_rank_dim)
    else:
        dlrm = DLRM(**common)
    return TrainModel(dlrm, aux_loss_fn)


def _collection_configs(module: nn.Module) -> list[BaseEmbeddingConfig]:
    if isinstance(module, EmbeddingBagCollection):
        return module.embedding_bag_configs()
    if isinstance(module, EmbeddingCollection):
        return module.embedding_configs()
    return []


def table_configs(model: nn.Module) -> list[BaseEmbeddingConfig]:
    """The table configs of every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in an
    unsharded model (the tables DMP shards)."""
    return [c for module in model.modules() for c in _collection_configs(module)]


def embedding_size(model: nn.Module) -> tuple[int, int]:
    """``(params, bytes)`` of the embeddings of an unsharded model: rows * width summed over the
    tables of every ``EmbeddingBagCollection`` / ``EmbeddingCollection`` in it (the collections
    that DMP shards), at each table's ``data_type`` (2 bytes for fp16, 4 for fp32), plus what a
    stand-in sparse module reports through an optional ``extra_embedding_params()`` (projections
    that belong to the embedding, fp32 dense parameters at 4 bytes each)."""
    params = num_bytes = 0
    for module in model.modules():
        for c in _collection_configs(module):
            n = c.num_embeddings * c.embedding_dim
            params += n
            num_bytes += n * data_type_to_dtype(c.data_type).itemsize
        extra = getattr(module, "extra_embedding_params", None)
        if callable(extra):
            n = int(extra())
            params += n
            num_bytes += 4 * n
    return params, num_bytes
