"""The compact module's user-facing API on one process: field renaming, remapping TorchRec
inputs (KJT, ``Batch``, datasets), input checks, and the table / dense parameter split."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset, IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods import (
    CompactInputError,
    IdRemapper,
    PlanError,
    RemapError,
    build_retrain_module,
    features_to_kjt,
    remap_dataset,
    rename_plan,
    retrain_feature_names,
)
from embdim.embedding_methods.plan import FieldPlan, GroupPlan, SizePlan

D = 8


def i64(xs) -> np.ndarray:
    return np.asarray(list(xs), dtype=np.int64)


def plan() -> SizePlan:
    """Split and pruned (a), whole (b), multi-hot split (m)."""
    return SizePlan(method="toy", embedding_dim=D, layout="project", fields=[
        FieldPlan("a", 30, [GroupPlan(8, i64(range(0, 10))), GroupPlan(4, i64(range(10, 25)))]),
        FieldPlan("b", 12, [GroupPlan(4)]),
        FieldPlan("m", 20, [GroupPlan(4, i64(range(0, 20, 2))), GroupPlan(8, i64(range(1, 15, 2)))]),
    ])


NAMES = {"a": "cat_0", "b": "cat_1", "m": "cat_2"}


def raw_arrays(batch_size: int, seed: int, names: dict[str, str] | None = None) -> dict:
    rng = np.random.default_rng(seed)
    out = {}
    for f in plan().fields:
        lengths = rng.integers(0, 4, batch_size) if f.name == "m" else np.ones(batch_size, dtype=np.int64)
        out[(names or {}).get(f.name, f.name)] = (rng.integers(0, f.num_embeddings, int(lengths.sum())),
                                                  lengths.astype(np.int32))
    return out


def raw_batch(batch_size: int, seed: int, names: dict[str, str] | None = None) -> Batch:
    return Batch(dense_features=torch.randn(batch_size, 3), sparse_features=features_to_kjt(
        raw_arrays(batch_size, seed, names)), labels=torch.zeros(batch_size))


def _same_kjt(x: KeyedJaggedTensor, y: KeyedJaggedTensor) -> None:
    assert x.keys() == y.keys()
    assert torch.equal(x.values(), y.values()) and torch.equal(x.lengths(), y.lengths())


# --- renaming -----------------------------------------------------------------------------------------


def test_rename_plan_by_dict_or_list_and_its_errors():
    renamed = rename_plan(plan(), NAMES)
    assert [f.name for f in renamed.fields] == ["cat_0", "cat_1", "cat_2"]
    assert rename_plan(plan(), ["cat_0", "cat_1", "cat_2"]).fields[2].name == "cat_2"
    assert [f.name for f in rename_plan(plan(), {"b": "x"}).fields] == ["a", "x", "m"]  # others keep theirs
    assert retrain_feature_names(plan(), NAMES) == ["cat_0@g0", "cat_0@g1", "cat_1", "cat_2@g0", "cat_2@g1"]
    assert rename_plan(plan(), None) is not None and plan().fields[0].name == "a"
    with pytest.raises(PlanError, match=r"\['C1'\] are not fields of the plan; its fields are \['a', 'b', 'm'\]"):
        rename_plan(plan(), {"C1": "cat_0"})
    with pytest.raises(PlanError, match="2 names for the plan's 3 fields"):
        rename_plan(plan(), ["x", "y"])
    with pytest.raises(PlanError, match=r"several fields are renamed to \['x'\]"):
        rename_plan(plan(), {"a": "x", "b": "x"})
    with pytest.raises(PlanError, match="'b' is renamed to ''"):
        rename_plan(plan(), {"b": ""})
    with pytest.raises(PlanError, match=r"retrain feature name 'a@g0' clashes"):
        rename_plan(plan(), {"b": "a@g0"})  # a group feature of field a


def test_renamed_module_keeps_the_plans_table_names_and_loads_its_weights():
    torch.manual_seed(0)
    original = build_retrain_module(plan(), device="cpu")
    renamed = build_retrain_module(plan(), device="cpu", feature_names=NAMES)
    # Tables keep the plan's names, so a run's state_dict loads into the renamed module as is.
    assert renamed.state_dict().keys() == original.state_dict().keys()
    renamed.load_state_dict(original.state_dict())
    assert renamed.feature_names == ["cat_0", "cat_1", "cat_2"]
    assert [c.feature_names[0] for c in renamed.embedding_bag_configs()] == ["cat_0", "cat_1", "cat_2"]
    assert renamed.embedding_dim == D
    want = original(IdRemapper(plan())(raw_batch(5, 1)).sparse_features)
    got = renamed(IdRemapper(plan(), feature_names=NAMES)(raw_batch(5, 1, NAMES)).sparse_features)
    assert got.keys() == ["cat_0", "cat_1", "cat_2"]
    torch.testing.assert_close(got.values(), want.values(), rtol=0, atol=0)  # the same lookups and products


# --- remapping TorchRec inputs -------------------------------------------------------------------------


def test_remapper_takes_kjt_and_batch_like_arrays():
    remap = IdRemapper(plan(), feature_names=NAMES)
    arrays = raw_arrays(7, 3, NAMES)
    want = features_to_kjt(remap(arrays, 7), remap.feature_names)
    batch = raw_batch(7, 3, NAMES)
    _same_kjt(remap(batch.sparse_features), want)
    out = remap(batch)
    assert type(out) is Batch and out.dense_features is batch.dense_features and out.labels is batch.labels
    _same_kjt(out.sparse_features, want)
    # The key order of the input KJT does not matter.
    shuffled = features_to_kjt(arrays, ["cat_2", "cat_0", "cat_1"])
    _same_kjt(remap(shuffled), want)


def test_remapper_errors_name_the_problem():
    remap = IdRemapper(plan())
    batch = raw_batch(4, 0)
    with pytest.raises(RemapError, match=r"batch lacks field\(s\) \['a', 'b', 'm'\] of the plan"):
        remap(raw_batch(4, 0, NAMES))  # renamed pipeline, remapper without feature_names
    kjt = batch.sparse_features
    weighted = KeyedJaggedTensor(keys=kjt.keys(), values=kjt.values(), lengths=kjt.lengths(),
                                 weights=torch.ones(kjt.values().numel()))
    with pytest.raises(RemapError, match="carries per-id weights"):
        remap(weighted)
    with pytest.raises(TypeError, match="needs batch_size"):
        remap(raw_arrays(4, 0))
    with pytest.raises(TypeError, match="got Tensor"):
        remap(torch.zeros(3))
    bad = features_to_kjt({k: (v[0] + 100, v[1]) for k, v in raw_arrays(4, 0).items()})
    with pytest.raises(RemapError, match=r"field 'a': id 1\d\d is out of range \[0, 30\)"):
        remap(bad)


class _MapStyle(Dataset):
    def __len__(self) -> int:
        return 3

    def __getitem__(self, i: int) -> Batch:
        return raw_batch(4, i, NAMES)


class _Iterable(IterableDataset):
    def __iter__(self):
        return (raw_batch(4, i, NAMES) for i in range(3))


@pytest.mark.parametrize("dataset", [_MapStyle(), _Iterable()], ids=["map_style", "iterable"])
def test_remap_dataset_wraps_map_style_and_iterable_datasets(dataset):
    remap = IdRemapper(plan(), feature_names=NAMES)
    wrapped = remap_dataset(dataset, remap)
    assert isinstance(wrapped, IterableDataset) == isinstance(dataset, IterableDataset)
    wrapped = pickle.loads(pickle.dumps(wrapped))  # DataLoader workers get a pickled copy
    got = list(DataLoader(wrapped, batch_size=None))
    assert len(got) == 3
    for i, batch in enumerate(got):
        _same_kjt(batch.sparse_features, remap(raw_batch(4, i, NAMES)).sparse_features)
    if not isinstance(dataset, IterableDataset):
        assert len(wrapped) == 3
    with pytest.raises(TypeError, match="neither an IterableDataset nor indexable"):
        remap_dataset(object(), remap)


# --- input checks ------------------------------------------------------------------------------------


def test_compact_module_names_the_remapper_for_unremapped_input():
    module = build_retrain_module(plan(), device="cpu", feature_names=NAMES)
    with pytest.raises(CompactInputError, match=r"unknown \['cat_0', 'cat_2'\], missing \['cat_0@g0', "
                                                r"'cat_0@g1', 'cat_2@g0', 'cat_2@g1'\].*IdRemapper"):
        module(raw_batch(4, 0, NAMES).sparse_features)
    remapped = IdRemapper(plan(), feature_names=NAMES)(raw_batch(4, 0, NAMES)).sparse_features
    past = KeyedJaggedTensor.from_lengths_sync(remapped.keys(), remapped.values() + 40, remapped.lengths())
    with pytest.raises(CompactInputError, match=r"feature 'cat_0@g\d' has id 4\d, outside its compact table "
                                                r"of 1[05] rows.*IdRemapper"):
        module(past)
    module(remapped)  # fine; ids are range-checked on the first input_checks (1) batches only
    with pytest.raises(RuntimeError, match="not in the valid range"):  # past them: the lookup fails, as in TorchRec
        module(past)
    module.input_checks = 10**9  # check every batch
    with pytest.raises(CompactInputError, match="outside its compact table"):
        module(past)
    negative = KeyedJaggedTensor.from_lengths_sync(remapped.keys(), remapped.values() - 100, remapped.lengths())
    with pytest.raises(CompactInputError, match=r"has id -\d+"):
        module(negative)


# --- tables apart from dense parameters ---------------------------------------------------------------


def test_fused_optimizer_over_table_parameters_leaves_the_projections_to_the_dense_one():
    from torchrec.models.dlrm import DLRM
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    torch.manual_seed(0)
    module = build_retrain_module(plan(), device="cpu")
    tables = dict(module.named_table_parameters())
    dense = dict(module.named_dense_parameters())
    assert sorted(tables) == sorted(f"ebc.embedding_bags.{c.name}.weight" for c in module.inner_configs())
    assert dense and all(name.startswith("projection.") for name in dense)
    assert len(tables) + len(dense) == len(list(module.parameters()))
    model = DLRM(embedding_bag_collection=module, dense_in_features=3, dense_arch_layer_sizes=[8, module.embedding_dim],
                 over_arch_layer_sizes=[8, 1])
    # The failure: sparse_arch.parameters() also holds the projections.
    assert {id(p) for p in model.sparse_arch.parameters()} == {id(p) for p in [*tables.values(), *dense.values()]}
    apply_optimizer_in_backward(RowWiseAdagrad, module.table_parameters(), {"lr": 0.5})
    assert all(hasattr(p, "_in_backward_optimizers") for p in module.table_parameters())
    assert not any(hasattr(p, "_in_backward_optimizers") for p in module.dense_parameters())
    dense_opt = torch.optim.SGD([p for p in model.parameters() if not hasattr(p, "_in_backward_optimizers")], lr=0.5)
    before = {n: p.detach().clone() for n, p in module.named_parameters()}
    batch = IdRemapper(plan())(raw_batch(16, 2))
    model(batch.dense_features, batch.sparse_features).sum().backward()  # tables step inside backward
    dense_opt.step()
    assert all(not torch.equal(p, before[n]) for n, p in module.named_parameters())
