"""A TorchRec user's own pipeline with a compact model, on 2 gloo ranks.

The replay follows TorchRec's ``examples/golden_training/train_dlrm.py``: a ``RandomRecDataset``-
style dataset yielding ``Batch`` objects, ``DLRM`` (and ``DLRM_DCN``) built on ``meta``, a fused
``RowWiseAdagrad`` applied in backward, ``DistributedModelParallel`` with TorchRec's default
sharders and planner, a dense ``KeyedOptimizerWrapper``, ``TrainPipelineSparseDist`` and DCP
checkpoints. The only changes are the README's ("Using the compact model in an existing DLRM
pipeline"): the pipeline's field names passed as ``feature_names``, the dataset wrapped by
``remap_dataset``, ``load_compact_embedding`` in place of the ``EmbeddingBagCollection``, the
fused optimizer over ``module.table_parameters()``, and ``restore_compact_weights`` after DMP.

The run folder comes from the real CLI on tiny data: a ``fixed`` search, its plan edited into
split and pruned id groups (what OptEmbed, AMTL and PME export), and ``embdim retrain``.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import IterableDataset
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods import load_compact_embedding, load_plan
from embdim.embedding_methods.plan import GroupPlan, save_plan
from embdim.launch.main import main
from tests.multiprocess import run_multiprocess
from tests.tiny_data import FIELDS, NUM_DENSE, tiny_run_flags, write_tiny_dataset

DIM = 16
SETS = tiny_run_flags(DIM, epochs=1)
# The user's pipeline names its fields differently from the dataset the plan was searched on.
NAMES = {name: f"cat_{i}" for i, (name, _, _) in enumerate(FIELDS)}
HASH_SIZES = {NAMES[name]: n for name, n, _ in FIELDS}
MULTI_HOT = {NAMES[name] for name, _, multi in FIELDS if multi}


def _groups(ids: range, width: int) -> GroupPlan:
    return GroupPlan(width, np.asarray(list(ids), dtype=np.int64))


def _make_run(tmp_path_factory, layout: str) -> Path:
    """``embdim search --method fixed`` in ``layout``, its plan split into id groups with pruned
    ids, then ``embdim retrain`` of that plan (one process): a run folder as a user gets it."""
    root = tmp_path_factory.mktemp(f"replay_{layout}")
    data = root / "data"
    write_tiny_dataset(data, num_rows={"train": 1024, "valid": 256, "test": 256})
    search = root / "search"
    assert main(["search", "--data", str(data), "--method", "fixed", "--budget", "0.6", "--out", str(search),
                 "--set", f"search.layout={layout}", *SETS]) == 0
    plan = load_plan(search)
    groups = {
        "c0": [_groups(range(0, 20), 16), _groups(range(20, 36), 8)],   # 36..39 pruned
        "c1": [GroupPlan(8)],                                             # whole, one width
        "c2": [_groups(range(2, 12), 4)],                                 # 0 and 1 pruned
        "c3": [_groups(range(0, 30, 2), 8), _groups(range(1, 25, 2), 4)],  # multi-hot, split and pruned
    }
    for field in plan.fields:
        field.groups = groups[field.name]
    run = root / "run"
    save_plan(plan, run)
    assert main(["retrain", "--data", str(data), "--plan", str(run / "plan.json"), "--out", str(run / "retrain"),
                 *SETS]) == 0
    assert (run / "retrain" / "compact_embedding.pt").exists()
    assert load_plan(run).layout == layout
    return run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A retrained run in the project layout (the one with dense parameters besides the tables)."""
    return _make_run(tmp_path_factory, "project")


@pytest.fixture(scope="module")
def pad_run_dir(tmp_path_factory) -> Path:
    """A retrained run in the pad layout (the default of every method but MDE: tables only)."""
    return _make_run(tmp_path_factory, "pad")


class TinyRecDataset(IterableDataset):
    """``torchrec.datasets.random.RandomRecDataset`` in miniature: ``Batch`` objects with a KJT of
    raw ids per key (one id per row, or 0..3 for multi-hot keys) and random dense features.

    Args:
        batch_size (int): rows per batch.
        num_batches (int): batches per iteration.
        seed (int): seeds the ids (one stream per rank in the tests).
    """

    def __init__(self, batch_size: int, num_batches: int, seed: int) -> None:
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed

    def __iter__(self):
        rng = np.random.default_rng(self.seed)
        for _ in range(self.num_batches):
            values, lengths = [], []
            for key, n in HASH_SIZES.items():
                length = rng.integers(0, 4, self.batch_size) if key in MULTI_HOT else np.ones(self.batch_size, int)
                values.append(rng.integers(0, n, int(length.sum())))
                lengths.append(length)
            kjt = KeyedJaggedTensor.from_lengths_sync(
                keys=list(HASH_SIZES), values=torch.from_numpy(np.concatenate(values)).long(),
                lengths=torch.from_numpy(np.concatenate(lengths)).int())
            labels = (rng.random(self.batch_size) < 0.3).astype(np.float32)
            yield Batch(dense_features=torch.from_numpy(rng.random((self.batch_size, NUM_DENSE), np.float32)),
                        sparse_features=kjt, labels=torch.from_numpy(labels))


def _dlrm(module: torch.nn.Module, interaction: str) -> torch.nn.Module:
    from torchrec.models.dlrm import DLRM, DLRM_DCN, DLRMTrain

    # D is the compact module's: the dense arch must end at module.embedding_dim.
    kwargs = dict(embedding_bag_collection=module, dense_in_features=NUM_DENSE,
                  dense_arch_layer_sizes=[16, module.embedding_dim], over_arch_layer_sizes=[16, 1],
                  dense_device=torch.device("cpu"))
    if interaction == "dcn":
        return DLRMTrain(DLRM_DCN(**kwargs, dcn_num_layers=2, dcn_low_rank_dim=4))
    return DLRMTrain(DLRM(**kwargs))


class _Records(logging.Handler):
    """Collects the warnings of embdim's compact module (in a spawned rank, where caplog is not)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        logging.getLogger("embdim.embedding_methods.compact").addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _embedding_output(model: torch.nn.Module, kjt: KeyedJaggedTensor) -> torch.Tensor:
    from torchrec.distributed.model_parallel import DistributedModelParallel

    inner = model.module if isinstance(model, DistributedModelParallel) else model
    return inner.model.sparse_arch.embedding_bag_collection(kjt).values()


# --- retrained weights survive DistributedModelParallel ------------------------------------------


def _restore_body(rank: int, world_size: int, run_dir: str) -> None:
    import torch.distributed as dist
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import column_wise, construct_module_sharding_plan, row_wise, table_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan

    from embdim.embedding_methods import IdRemapper
    from embdim.sharding import restore_compact_weights
    from embdim.sharding.planner import get_sharders

    torch.set_num_threads(1)
    reference = _dlrm(load_compact_embedding(run_dir, feature_names=NAMES), "dot")
    remapper = IdRemapper(load_plan(run_dir), feature_names=NAMES)
    batch = remapper(next(iter(TinyRecDataset(16, 1, seed=rank))))
    want = _embedding_output(reference, batch.sparse_features)
    records = _Records()
    for device in ("cpu", "meta"):
        torch.manual_seed(rank)
        module = load_compact_embedding(run_dir, device=device, feature_names=NAMES)
        model = _dlrm(module, "dot")
        # Every sharding type a table can get: row-wise (embdim's sharders allow it on CPU),
        # column-wise (the 16-wide table splits 8 + 8) and table-wise on either rank.
        kinds = {"t_c0@g0": column_wise(ranks=[0, 1]), "t_c0@g1": row_wise(), "t_c3@g0": row_wise()}
        per_table = {cfg.name: kinds.get(cfg.name, table_wise(rank=i % world_size))
                     for i, cfg in enumerate(module.inner_configs())}
        plan = construct_module_sharding_plan(module.ebc, per_table, local_size=world_size, world_size=world_size,
                                              device_type="cpu", sharder=get_sharders()[0])
        dmp = DistributedModelParallel(model, env=ShardingEnv.from_process_group(dist.group.WORLD),
                                       device=torch.device("cpu"), sharders=get_sharders(),
                                       plan=ShardingPlan({"model.sparse_arch.embedding_bag_collection.ebc": plan}))
        before = _embedding_output(dmp, batch.sparse_features)
        # DMP built fresh tables: without the restore the model computes something else, and says so.
        assert (before - want).abs().max() > 1e-2, device
        assert len(records.messages) == 1 and "restore_compact_weights(model)" in records.messages[0], records.messages
        records.messages.clear()
        restored = restore_compact_weights(dmp)
        assert len(restored) == 1 and restored[0].endswith("model.sparse_arch.embedding_bag_collection"), restored
        torch.testing.assert_close(_embedding_output(dmp, batch.sparse_features), want, rtol=1e-5, atol=1e-5)
        # An explicit run folder restores the same weights (e.g. a module built without the loader).
        restore_compact_weights(dmp, run_dir)
        torch.testing.assert_close(_embedding_output(dmp, batch.sparse_features), want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_retrained_weights_survive_dmp_built_on_cpu_or_meta(run_dir):
    run_multiprocess(_restore_body, world_size=2, run_dir=str(run_dir))


def test_meta_build_loads_nothing_and_warns_nothing(run_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "copying from a non-meta parameter ... is a no-op" was one per table
        module = load_compact_embedding(run_dir, device="meta", feature_names=NAMES)
    assert all(p.is_meta for p in module.parameters())
    assert module.compact_source.weights == run_dir / "retrain" / "compact_embedding.pt"
    assert module.embedding_dim == DIM == load_plan(run_dir).embedding_dim


def test_restore_rejects_weights_of_another_plan(run_dir, tmp_path):
    from embdim.sharding import restore_compact_weights
    from embdim.sharding.compact import RestoreError

    module = load_compact_embedding(run_dir)
    state = torch.load(run_dir / "retrain" / "compact_embedding.pt", weights_only=True)
    key = "ebc.embedding_bags.t_c2.weight"
    state[key] = state[key][:-1]
    other = tmp_path / "other"
    save_plan(load_plan(run_dir), other)
    (other / "retrain").mkdir()
    torch.save(state, other / "retrain" / "compact_embedding.pt")
    with pytest.raises(RestoreError, match=r"compact_embedding.pt: ebc.embedding_bags.t_c2.weight has shape \(9, 4\)"):
        restore_compact_weights(module, other)
    with pytest.raises(RestoreError, match="holds no compact embedding module"):
        restore_compact_weights(torch.nn.Linear(2, 2))


# --- the golden_training replay --------------------------------------------------------------------


def _build(run_dir: str, interaction: str, restore: bool):
    """The example's model, optimizers and DMP, with the README's changes (marked ``# embdim``)."""
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.optimizers import in_backward_optimizer_filter
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from embdim.sharding import restore_compact_weights

    module = load_compact_embedding(run_dir, device="meta", feature_names=NAMES)  # embdim
    train_model = _dlrm(module, interaction)
    apply_optimizer_in_backward(RowWiseAdagrad, module.table_parameters(), {"lr": 0.05})  # embdim: tables only
    model = DistributedModelParallel(module=train_model, device=torch.device("cpu"))
    if restore:
        restore_compact_weights(model)  # embdim
    dense = KeyedOptimizerWrapper(dict(in_backward_optimizer_filter(model.named_parameters())),
                                  lambda params: torch.optim.Adagrad(params, lr=0.05))
    return module, model, CombinedOptimizer([model.fused_optimizer, dense]), dense


def _replay_body(rank: int, world_size: int, run_dir: str, ckpt_root: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torchrec.distributed import TrainPipelineSparseDist

    from embdim.embedding_methods import IdRemapper, remap_dataset

    torch.set_num_threads(1)
    remapper = IdRemapper(load_plan(run_dir), feature_names=NAMES)  # embdim
    records = _Records()
    probe = remapper(next(iter(TinyRecDataset(32, 1, seed=100 + rank))))
    reference = load_compact_embedding(run_dir, feature_names=NAMES)
    for interaction in ("dot", "dcn"):
        torch.manual_seed(rank)
        module, model, optimizer, dense = _build(run_dir, interaction, restore=True)
        # The fused optimizer holds the tables only; the projections (project layout) train with
        # the dense one; under pad the module has no dense parameter at all.
        projections = [n for n in dense.params if ".projection." in n]
        assert bool(projections) == (load_plan(run_dir).layout == "project")
        assert not any(".projection." in n for n in model.fused_optimizer.params)
        assert all("embedding_bags" in n for n in model.fused_optimizer.params)
        torch.testing.assert_close(_embedding_output(model, probe.sparse_features),
                                   reference(probe.sparse_features).values(), rtol=1e-5, atol=1e-5)

        pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"), execute_all_batches=True)
        batches = iter(remap_dataset(TinyRecDataset(32, 6, seed=rank), remapper))  # embdim
        losses = []
        while True:
            try:
                losses.append(float(pipeline.progress(batches)[0]))
            except StopIteration:
                break
        assert len(losses) == 6 and all(np.isfinite(losses)), losses
        assert len(pipeline._pipelined_modules) == 1  # the compact module's inner collection
        pipeline.detach()  # direct calls of the sharded model again (docs/torchrec-notes.md#pipelining)
        model.eval()
        with torch.no_grad():
            trained = model(probe)[1][1]
            emb_trained = _embedding_output(model, probe.sparse_features)
        assert (emb_trained - reference(probe.sparse_features).values()).abs().max() > 1e-4  # it trained

        ckpt = str(Path(ckpt_root) / interaction)
        dcp.save({"model": model.state_dict(), "optim": optimizer.state_dict()}, checkpoint_id=ckpt)

        # A fresh job loads the checkpoint instead of restoring the run's weights.
        torch.manual_seed(1000 + rank)
        _, loaded, loaded_optimizer, _ = _build(run_dir, interaction, restore=False)
        state = {"model": loaded.state_dict(), "optim": loaded_optimizer.state_dict()}
        dcp.load(state, checkpoint_id=ckpt)
        loaded.load_state_dict(state["model"])
        loaded_optimizer.load_state_dict(state["optim"])
        loaded.eval()
        with torch.no_grad():
            torch.testing.assert_close(loaded(probe)[1][1], trained, rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(_embedding_output(loaded, probe.sparse_features), emb_trained,
                                       rtol=1e-5, atol=1e-6)
    assert records.messages == []  # restored or loaded from the checkpoint: no fresh-table warning


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["project", "pad"])
def test_golden_training_replay_with_compact_module(layout, run_dir, pad_run_dir, tmp_path):
    chosen = run_dir if layout == "project" else pad_run_dir
    run_multiprocess(_replay_body, world_size=2, run_dir=str(chosen), ckpt_root=str(tmp_path))


# --- input that skipped the remapper ----------------------------------------------------------------


def _unremapped_body(rank: int, world_size: int, run_dir: str) -> None:
    from torchrec.distributed import TrainPipelineSparseDist

    from embdim.embedding_methods import CompactInputError, IdRemapper

    torch.set_num_threads(1)
    remapper = IdRemapper(load_plan(run_dir), feature_names=NAMES)
    good = remapper(next(iter(TinyRecDataset(16, 1, seed=rank))))
    kjt = good.sparse_features
    # The right keys, ids past a compact table (e.g. a stale remap): caught on the first batch.
    past = Batch(good.dense_features, KeyedJaggedTensor.from_lengths_sync(
        kjt.keys(), kjt.values() + 50, kjt.lengths()), good.labels)
    raw = next(iter(TinyRecDataset(16, 1, seed=rank)))  # the remapper forgotten: raw keys and ids
    missing = r"unknown \['cat_0', 'cat_3'\], missing \['cat_0@g0', 'cat_0@g1', 'cat_3@g0', 'cat_3@g1'\]"
    # (input_checks, batches, error, pipeline steps that train before it).
    cases = ((1, [past], r"feature 'cat_0@g0' has id [5-6]\d, outside its compact table of 20 rows", 0),
             (1, [raw], missing, 0),
             # Ids are range-checked on the first input_checks batches (one host sync each) ...
             (10**9, [good, past], r"outside its compact table", 1),
             # ... keys on every batch, before TorchRec's input dist of the next one.
             (1, [good, raw], missing, 0))
    for checks, batches, message, steps in cases:
        module, model, _, _ = _build(run_dir, "dot", restore=True)
        with pytest.raises(CompactInputError, match=message) as raised:
            model(batches[-1])  # DMP without the pipeline
        assert "IdRemapper" in str(raised.value)
        module, model, optimizer, _ = _build(run_dir, "dot", restore=True)
        module.input_checks = checks
        pipeline = TrainPipelineSparseDist(model, optimizer, torch.device("cpu"), execute_all_batches=True)
        it, done = iter(batches), 0
        with pytest.raises(CompactInputError, match=message):
            while True:
                pipeline.progress(it)
                done += 1
        assert done == steps, (batches, done)


@pytest.mark.slow
def test_unremapped_input_names_the_remapper_also_in_the_pipeline(run_dir):
    run_multiprocess(_unremapped_body, world_size=1, run_dir=str(run_dir))
