"""Tests of trainer.data.reader: sharding, exactly-once, determinism, resume, KJT layout, validation.

Every dataset here encodes each row's index in the split ("row id") in the first dense column and in
the single-hot field "rid", and derives the other columns from it, so a test can tell which rows a
batch holds and that all of its columns stayed aligned through shuffling.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from tests.multiprocess import run_multiprocess
from embdim.trainer.data.manifest import DatasetError, Manifest, SparseField, SplitInfo, write_manifest
from embdim.trainer.data.reader import ParquetBatchReader, list_work_units, num_dense_features

# Deliberately uneven row groups: 64 train rows in two files.
TRAIN_GROUPS = [[7, 13, 1], [20, 9, 14]]
NUM_S1 = 5
NUM_M0 = 11


def s1_of(rid):
    return (rid * 7) % NUM_S1


def m0_of(rid: int) -> list[int]:
    """Multi-hot ids of a row: 0 to 3 of them."""
    return [(rid + j) % NUM_M0 for j in range(rid % 4)]


def make_dataset(root: Path, splits: dict[str, list[list[int]]], *, dense: bool = True,
                 multi_hot: bool = False, corrupt=None) -> Path:
    """Writes a dataset; ``corrupt(split, file_index, row_group, columns)`` may edit a group's columns."""
    totals = {name: sum(map(sum, groups)) for name, groups in splits.items()}
    sparse = [SparseField("rid", max(totals.values())), SparseField("s1", NUM_S1)]
    if multi_hot:
        sparse.append(SparseField("m0", NUM_M0, multi_hot=True))
    manifest = Manifest(label="label", dense=["d0", "d1"] if dense else [], sparse=sparse, splits={}, source="test")
    for name, groups in splits.items():
        rid, files = 0, []
        for fi, sizes in enumerate(groups):
            file = f"{name}/part-{fi:05d}.parquet"
            (root / name).mkdir(parents=True, exist_ok=True)
            writer = None
            for rg, size in enumerate(sizes):
                ids = np.arange(rid, rid + size, dtype=np.int64)
                rid += size
                columns = {"label": pa.array((ids % 2).astype(np.float32))}
                if dense:
                    columns["d0"] = pa.array(ids.astype(np.float32))
                    columns["d1"] = pa.array(np.log1p(ids).astype(np.float32))
                columns["rid"] = pa.array(ids)
                columns["s1"] = pa.array(s1_of(ids))
                if multi_hot:
                    columns["m0"] = pa.array([m0_of(int(i)) for i in ids], type=pa.list_(pa.int64()))
                if corrupt is not None:
                    corrupt(name, fi, rg, columns)
                table = pa.table(columns)
                if writer is None:
                    writer = pq.ParquetWriter(root / file, table.schema)
                writer.write_table(table, row_group_size=max(size, 1))
            writer.close()
            files.append(file)
        manifest.splits[name] = SplitInfo(files=files, num_rows=totals[name])
    write_manifest(root, manifest)
    return root


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("ds"), {"train": TRAIN_GROUPS, "valid": [[5, 1, 9], [8]],
                                                        "test": [[1]]}, multi_hot=True)


def row_ids(batch) -> np.ndarray:
    return batch.sparse_features["rid"].values().numpy()


def check_aligned(batch) -> None:
    """Every column of every row agrees with the row id: shuffling kept columns together."""
    rid = row_ids(batch)
    kjt = batch.sparse_features
    assert kjt.stride() == len(rid) == len(batch.labels)
    assert batch.labels.dtype == torch.float32 and batch.dense_features.dtype == torch.float32
    np.testing.assert_array_equal(batch.labels.numpy(), rid % 2)
    np.testing.assert_array_equal(batch.dense_features[:, 0].numpy(), rid.astype(np.float32))
    np.testing.assert_array_equal(kjt["s1"].values().numpy(), s1_of(rid))
    if "m0" in kjt.keys():
        np.testing.assert_array_equal(kjt["m0"].lengths().numpy(), [len(m0_of(int(r))) for r in rid])
        np.testing.assert_array_equal(kjt["m0"].values().numpy(), [i for r in rid for i in m0_of(int(r))])


def read_rows(reader, *, check: bool = True) -> list[np.ndarray]:
    """One epoch (or its rest) as the row ids of each batch."""
    out = []
    for batch in reader:
        if check:
            check_aligned(batch)
        out.append(row_ids(batch))
    return out


def assert_same_batches(a, b) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        torch.testing.assert_close(x.dense_features, y.dense_features, rtol=0, atol=0)
        torch.testing.assert_close(x.labels, y.labels, rtol=0, atol=0)
        assert x.sparse_features.keys() == y.sparse_features.keys()
        torch.testing.assert_close(x.sparse_features.values(), y.sparse_features.values(), rtol=0, atol=0)
        torch.testing.assert_close(x.sparse_features.lengths(), y.sparse_features.lengths(), rtol=0, atol=0)


def test_units_follow_footers_in_manifest_order(dataset):
    from embdim.trainer.data.manifest import load_manifest
    units = list_work_units(dataset, load_manifest(dataset), "train")
    assert [(u.file, u.row_group, u.num_rows) for u in units] == [
        (f"train/part-{f:05d}.parquet", rg, n) for f, sizes in enumerate(TRAIN_GROUPS) for rg, n in enumerate(sizes)]


@pytest.mark.parametrize("num_workers", [0, 2])
@pytest.mark.parametrize("world_size,batch_size", [(2, 8), (2, 5), (3, 4)])
def test_exactly_once_across_simulated_ranks(dataset, num_workers, world_size, batch_size):
    readers = [ParquetBatchReader(dataset, "train", batch_size=batch_size, rank=r, world_size=world_size,
                                  num_workers=num_workers, seed=3) for r in range(world_size)]
    per_rank = [read_rows(reader) for reader in readers]
    expected_batches = 64 // (world_size * batch_size)
    assert [len(b) for b in per_rank] == [expected_batches] * world_size == [len(r) for r in readers]
    assert all(len(b) == batch_size for batches in per_rank for b in batches)
    rows = np.concatenate([b for batches in per_rank for b in batches])
    assert len(np.unique(rows)) == len(rows) == expected_batches * world_size * batch_size
    if 64 % (world_size * batch_size) == 0:  # the data divides evenly: every row read exactly once
        np.testing.assert_array_equal(np.sort(rows), np.arange(64))


def _two_rank_body(rank: int, world_size: int, dataset: str) -> None:
    import torch.distributed as dist

    # This process was spawned, so its default would also spawn the workers (slow imports).
    reader = ParquetBatchReader(dataset, "train", batch_size=8, rank=rank, world_size=world_size, num_workers=2,
                                seed=11, multiprocessing_context="fork")
    train = read_rows(reader)
    gathered = [None] * world_size
    dist.all_gather_object(gathered, train)
    assert [len(g) for g in gathered] == [4, 4]
    rows = np.concatenate([b for g in gathered for b in g])
    np.testing.assert_array_equal(np.sort(rows), np.arange(64))

    # Evaluation of the 1-row "test" split on 2 ranks: rank 1's only batch has 0 rows. A sharded
    # EmbeddingBagCollection must run it in step with rank 0's 1-row batch.
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
    from torchrec.distributed.types import ShardingType

    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=n, feature_names=[f])
              for f, n in (("rid", 64), ("s1", NUM_S1), ("m0", NUM_M0))]
    ebc = EmbeddingBagCollection(tables=tables, device=torch.device("meta"))
    constraints = {t.name: ParameterConstraints(sharding_types=[ShardingType.TABLE_WISE.value]) for t in tables}
    planner = EmbeddingShardingPlanner(topology=Topology(world_size=world_size, compute_device="cpu"),
                                       constraints=constraints)
    plan = planner.collective_plan(ebc, [EmbeddingBagCollectionSharder()], dist.GroupMember.WORLD)
    model = DistributedModelParallel(ebc, device=torch.device("cpu"), plan=plan)
    for split, sizes in (("test", [[1], [0]]), ("valid", [[4, 4, 4], [4, 4, 3]])):
        reader = ParquetBatchReader(dataset, split, batch_size=4, rank=rank, world_size=world_size, shuffle=False)
        batches = list(reader)
        assert [len(b.labels) for b in batches] == sizes[rank]
        for batch in batches:
            check_aligned(batch)
            out = model(batch.sparse_features)
            out = out.wait() if hasattr(out, "wait") else out
            assert out.values().shape == (len(batch.labels), 8 * 3)
            out.values().sum().backward()


@pytest.mark.slow
def test_exactly_once_two_gloo_ranks_and_sharded_eval_with_empty_batch(dataset):
    run_multiprocess(_two_rank_body, world_size=2, dataset=str(dataset))


def test_same_seed_same_order_and_epochs_differ(dataset):
    def epochs(num_workers, seed=0, count=2):
        reader = ParquetBatchReader(dataset, "train", batch_size=4, num_workers=num_workers, seed=seed)
        return [list(reader) for _ in range(count)]

    a, b = epochs(0), epochs(0)
    for x, y in zip(a, b):
        assert_same_batches(x, y)
    ids = [np.concatenate([row_ids(x) for x in epoch]) for epoch in a]
    assert not np.array_equal(ids[0], ids[1])  # another epoch, another order
    assert sorted(ids[0]) == sorted(ids[1]) == list(range(64))
    other_seed = np.concatenate([row_ids(x) for x in epochs(0, seed=1, count=1)[0]])
    assert not np.array_equal(ids[0], other_seed)
    # num_workers only reorders whole batches; 0 and 1 give the same sequence.
    assert_same_batches(epochs(1, count=1)[0], a[0])
    two = epochs(2, count=1)[0]
    assert sorted(tuple(row_ids(x)) for x in two) == sorted(tuple(row_ids(x)) for x in a[0])


def test_rows_within_a_row_group_are_reshuffled_every_epoch(tmp_path):
    root = make_dataset(tmp_path, {"train": [[32]]})  # one row group: only the row permutation varies
    reader = ParquetBatchReader(root, "train", batch_size=8, seed=4)
    epochs = [np.concatenate(read_rows(reader)) for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(32))
    assert not np.array_equal(epochs[0], epochs[1]) and not np.array_equal(epochs[0], np.arange(32))


@pytest.mark.parametrize("num_workers,stop_after", [(0, 3), pytest.param(2, 3, marks=pytest.mark.slow),
                                                    pytest.param(2, 6, marks=pytest.mark.slow)])
def test_mid_epoch_resume_gives_the_uninterrupted_batches(dataset, num_workers, stop_after):
    def make():
        return ParquetBatchReader(dataset, "train", batch_size=4, num_workers=num_workers, seed=5)

    reference = make()
    uninterrupted = list(reference) + list(reference)  # epochs 0 and 1

    first = make()
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == stop_after:
            break
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON types
    assert state["epoch"] == 0 and state["batches_in_epoch"] == stop_after

    resumed = make()
    resumed.load_state_dict(state)
    assert resumed.num_remaining_batches == len(resumed) - stop_after
    rest = [b for _epoch in range(2) for b in resumed]  # the trainer's `for epoch: for batch in reader`
    assert_same_batches(taken + rest, uninterrupted)
    assert resumed.epoch == 2 and resumed.state_dict()["batches_in_epoch"] == 0
    # Leaving a loop early keeps the position on the same reader too.
    assert_same_batches(taken + list(first), uninterrupted[:len(first)])


def _consume(readers, count):
    """Each reader (one per rank) hands out ``count`` batches; returns their row ids and the states."""
    rows = []
    for reader in readers:
        it = iter(reader)
        rows += [row_ids(next(it)) for _ in range(count)]
        it.close()
    states = [r.state_dict() for r in readers]
    assert all(s == states[0] for s in states)  # rank-independent: one saved copy serves every rank
    return rows, states[0]


@pytest.mark.slow
def test_resume_onto_other_world_size_keeps_exactly_once(dataset):
    # 2 ranks x 2 workers -> 1 rank in process: 2*3*4 rows consumed, 40 re-dealt into 10 batches of 4.
    two = [ParquetBatchReader(dataset, "train", batch_size=4, rank=r, world_size=2, num_workers=2, seed=7)
           for r in range(2)]
    before, state = _consume(two, 3)
    one = ParquetBatchReader(dataset, "train", batch_size=4, world_size=1, num_workers=0, seed=7)
    one.load_state_dict(state)
    assert one.num_remaining_batches == 10
    rows = np.concatenate(before + read_rows(one))
    np.testing.assert_array_equal(np.sort(rows), np.arange(64))
    # The next epoch is a plain epoch under the new layout.
    fresh = ParquetBatchReader(dataset, "train", batch_size=4, seed=7)
    fresh.set_epoch(1)
    assert_same_batches(list(one), list(fresh))

    # 1 rank -> 2 ranks, then -> 1 rank again mid-way (chained re-deals), batch size changing too.
    one = ParquetBatchReader(dataset, "train", batch_size=8, num_workers=1, seed=7)
    before, state = _consume([one], 2)
    two = [ParquetBatchReader(dataset, "train", batch_size=4, rank=r, world_size=2, num_workers=2, seed=7)
           for r in range(2)]
    for reader in two:
        reader.load_state_dict(state)
    assert [r.num_remaining_batches for r in two] == [6, 6]  # 48 rows left, 6 per rank of 4
    middle, state = _consume(two, 2)
    last = ParquetBatchReader(dataset, "train", batch_size=3, seed=7)
    last.load_state_dict(state)
    after = read_rows(last)
    rows = np.concatenate(before + middle + after)
    assert len(np.unique(rows)) == len(rows) == 16 + 16 + 30  # 32 rows left, 10 batches of 3, 2 skipped


def test_multi_hot_kjt_layout(dataset):
    for shuffle in (True, False):
        reader = ParquetBatchReader(dataset, "train", batch_size=16, num_workers=0, shuffle=shuffle)
        batches = list(reader)
        for batch in batches:
            kjt = batch.sparse_features
            assert kjt.keys() == ["rid", "s1", "m0"]  # manifest order
            assert kjt.values().dtype == torch.int64 and kjt.lengths().dtype == torch.int32
            rid = row_ids(batch)
            np.testing.assert_array_equal(kjt.lengths().numpy(),
                                          np.concatenate([np.ones(32, np.int32), [len(m0_of(int(r))) for r in rid]]))
            check_aligned(batch)
        rows = np.concatenate([row_ids(b) for b in batches])
        if not shuffle:
            np.testing.assert_array_equal(rows, np.arange(64))


def remap_transform(features, batch_size):
    """Keeps odd ids of m0 (as group tables would drop pruned ids), renames s1, drops rid."""
    values, lengths = features["m0"]
    keep = values % 2 == 1
    row = np.repeat(np.arange(batch_size), lengths)
    new_lengths = np.bincount(row[keep], minlength=batch_size).astype(np.int32)
    return {"m0_odd": (values[keep] // 2, new_lengths), "s1_group": features["s1"],
            "rid": features["rid"]}


def bad_transform(features, batch_size):
    values, lengths = features["s1"]
    return {"s1": (values[1:], lengths)}


def test_feature_transform_applied_in_workers(dataset):
    reader = ParquetBatchReader(dataset, "train", batch_size=8, num_workers=2, feature_transform=remap_transform)
    seen = 0
    for batch in reader:
        kjt = batch.sparse_features
        assert kjt.keys() == ["m0_odd", "s1_group", "rid"]
        rid = row_ids(batch)
        expected = [[i // 2 for i in m0_of(int(r)) if i % 2] for r in rid]
        np.testing.assert_array_equal(kjt["m0_odd"].lengths().numpy(), [len(e) for e in expected])
        np.testing.assert_array_equal(kjt["m0_odd"].values().numpy(), [i for e in expected for i in e])
        np.testing.assert_array_equal(kjt["s1_group"].values().numpy(), s1_of(rid))
        seen += len(rid)
    assert seen == 64
    with pytest.raises(ValueError, match="feature_transform returned 's1'"):
        next(iter(ParquetBatchReader(dataset, "train", batch_size=8, feature_transform=bad_transform)))


def test_no_dense_columns_gives_one_zero_feature(tmp_path, dataset):
    from embdim.trainer.data.manifest import load_manifest
    root = make_dataset(tmp_path, {"train": [[6, 10]]}, dense=False)
    manifest = load_manifest(root)
    assert num_dense_features(manifest) == 1 and num_dense_features(load_manifest(dataset)) == 2
    reader = ParquetBatchReader(root, "train", batch_size=4, pin_memory=True)  # no CUDA: pinning is skipped
    batches = list(reader)
    assert len(batches) == 4
    for batch in batches:
        assert batch.dense_features.shape == (4, 1) and batch.dense_features.dtype == torch.float32
        assert not batch.dense_features.any()
        np.testing.assert_array_equal(batch.labels.numpy(), row_ids(batch) % 2)


@pytest.mark.parametrize("num_workers,world_size,split,sizes", [
    (0, 3, "valid", [[4, 4], [4, 4], [4, 3]]),   # 23 rows, 6 batches: as even as possible
    (2, 3, "valid", [[4, 4], [4, 4], [4, 3]]),
    (2, 2, "test", [[1], [0]]),                  # fewer rows than ranks: a 0-row batch
    (0, 1, "train", [[10] + [9] * 6]),       # 64 rows in 7 batches of at most 10
])
def test_eval_reads_every_row_once_with_equal_batch_counts(dataset, num_workers, world_size, split, sizes):
    per_rank = []
    for rank in range(world_size):
        reader = ParquetBatchReader(dataset, split, batch_size=10 if split == "train" else 4, rank=rank,
                                    world_size=world_size, num_workers=num_workers, shuffle=False)
        assert reader._layout.drop_last is False  # drop_last defaults to shuffle
        per_rank.append(read_rows(reader))
        assert len(reader) == len(sizes[rank])
    assert [[len(b) for b in batches] for batches in per_rank] == sizes
    rows = np.concatenate([b for batches in per_rank for b in batches])
    np.testing.assert_array_equal(np.sort(rows), np.arange(sum(map(sum, sizes))))


def _set(column, index, value):
    array = column.to_pylist()
    array[index] = value
    return pa.array(array, type=column.type)


VALUE_ERRORS = {
    "negative id": ("rid", lambda c: _set(c["rid"], 2, -1), "ids must lie in"),
    "id too large": ("s1", lambda c: _set(c["s1"], 2, NUM_S1), "ids must lie in"),
    "multi-hot id too large": ("m0", lambda c: _set(c["m0"], 3, [1, NUM_M0 + 4]), "ids must lie in"),
    "nan dense": ("d1", lambda c: _set(c["d1"], 2, float("nan")), "must be finite"),
    "inf dense": ("d0", lambda c: _set(c["d0"], 2, float("inf")), "must be finite"),
    "label 2": ("label", lambda c: _set(c["label"], 2, 2.0), "labels must be 0 or 1"),
    "null id": ("s1", lambda c: _set(c["s1"], 2, None), "null"),
}


@pytest.mark.parametrize("case", sorted(VALUE_ERRORS))
def test_bad_values_name_file_row_group_and_column(tmp_path, case):
    column, edit, message = VALUE_ERRORS[case]

    def corrupt(split, file_index, row_group, columns):
        if (split, file_index, row_group) == ("train", 1, 1):
            columns[column] = edit(columns)

    root = make_dataset(tmp_path, {"train": TRAIN_GROUPS}, multi_hot=True, corrupt=corrupt)
    num_workers = 2 if case == "label 2" else 0  # also through a worker process
    reader = ParquetBatchReader(root, "train", batch_size=4, num_workers=num_workers)
    with pytest.raises(DatasetError, match=rf"part-00001\.parquet: row group 1, column '{column}': .*{message}"):
        list(reader)
    if case == "id too large":  # value checks can be turned off
        assert len(list(ParquetBatchReader(root, "train", batch_size=4, validate=False))) == 16


def test_huge_finite_dense_values_are_valid(tmp_path):
    """Finite values whose float32 sum overflows must not be mistaken for inf."""
    def corrupt(split, file_index, row_group, columns):
        columns["d1"] = pa.array(np.full(len(columns["d1"]), 3e38, np.float32))

    root = make_dataset(tmp_path, {"train": [[8, 8]]}, corrupt=corrupt)
    batches = list(ParquetBatchReader(root, "train", batch_size=4))
    assert len(batches) == 4 and all((b.dense_features[:, 1] == np.float32(3e38)).all() for b in batches)


SCHEMA_ERRORS = {
    "missing column": (lambda c: c.pop("d1"), "missing column 'd1'"),
    "float64 dense": (lambda c: c.update(d0=c["d0"].cast(pa.float64())),
                      "column 'd0' .* type double, expected float32"),
    "int32 ids": (lambda c: c.update(s1=c["s1"].cast(pa.int32())), "column 's1' .* type int32, expected int64"),
    "single-hot list": (lambda c: c.update(m0=pa.array(np.arange(len(c["m0"])))),
                        "column 'm0' .* expected list<int64>"),
}


@pytest.mark.parametrize("case", sorted(SCHEMA_ERRORS))
def test_bad_schema_names_file_and_column(tmp_path, case):
    edit, message = SCHEMA_ERRORS[case]

    def corrupt(split, file_index, row_group, columns):
        if (split, file_index) == ("train", 1):
            edit(columns)

    root = make_dataset(tmp_path, {"train": TRAIN_GROUPS}, multi_hot=True, corrupt=corrupt)
    with pytest.raises(DatasetError, match=rf"part-00001\.parquet \(every row group\): {message}"):
        ParquetBatchReader(root, "train", batch_size=4)


def test_bad_manifest_counts_and_sizes(tmp_path):
    root = make_dataset(tmp_path, {"train": [[3, 4]]})
    with pytest.raises(DatasetError, match="too few for one batch of 4 on each of 2"):
        ParquetBatchReader(root, "train", batch_size=4, world_size=2)
    with pytest.raises(DatasetError, match="no split 'valid'"):
        ParquetBatchReader(root, "valid", batch_size=4)
    raw = json.loads((root / "dataset.json").read_text())
    raw["splits"]["train"]["num_rows"] = 8
    (root / "dataset.json").write_text(json.dumps(raw))
    with pytest.raises(DatasetError, match="declares num_rows=8, but the footers .* hold 7 rows"):
        ParquetBatchReader(root, "train", batch_size=4)
    (root / "train" / "part-00000.parquet").write_bytes(b"not parquet")
    with pytest.raises(DatasetError, match=r"part-00000\.parquet: not a readable Parquet file"):
        ParquetBatchReader(root, "train", batch_size=4)


def test_state_mismatches_are_rejected(dataset):
    state = ParquetBatchReader(dataset, "train", batch_size=4, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed=1"):
        ParquetBatchReader(dataset, "train", batch_size=4, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="split 'train'"):
        ParquetBatchReader(dataset, "valid", batch_size=4, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="batches_in_epoch=17"):
        ParquetBatchReader(dataset, "train", batch_size=4, seed=1).load_state_dict({**state, "batches_in_epoch": 17})
    bad = {**state, "pieces": [["train/part-00009.parquet", 0, 0, 3]]}
    with pytest.raises(DatasetError, match="part-00009.parquet row group 0"):
        ParquetBatchReader(dataset, "train", batch_size=4, seed=1).load_state_dict(bad)


def test_worker_stream_pickles_for_spawned_workers(dataset):
    """Spawned DataLoader workers receive the stream pickled; it must decode the same batches."""
    import pickle

    from embdim.trainer.data.reader import _EpochStream

    reader = ParquetBatchReader(dataset, "train", batch_size=8, feature_transform=remap_transform, seed=2)
    stream = _EpochStream(reader.dataset_dir, reader.manifest, reader.units, reader._current_plan(), rank=0,
                          epoch=0, num_consumed=0, feature_transform=remap_transform, validate=True)
    copy = pickle.loads(pickle.dumps(stream))
    assert_same_batches([packed.unpack() for _, packed in copy], list(reader))
