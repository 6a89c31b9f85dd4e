"""MLET: factorized k-wide training collapses exactly to a d-wide table (sum pooling is linear)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from embdim.embedding_methods import IdRemapper, load_compact_embedding
from embdim.embedding_methods.base import FieldSpec
from embdim.embedding_methods.fixed import fixed_width_for_budget
from embdim.embedding_methods.mixed_dim import CompactWeightsError, features_to_kjt
from embdim.embedding_methods.mlet import (
    MLET,
    MLETEmbeddingBagCollection,
    collapse_module,
    collapse_shard,
    collapse_table,
    save_collapsed_init,
)
from embdim.embedding_methods.plan import load_plan, save_plan
from embdim.embedding_methods.remap import retrain_feature_names
from embdim.trainer.config import ConfigError

D = 8
FIELDS = [FieldSpec("u", 40), FieldSpec("i", 25), FieldSpec("tags", 30, multi_hot=True)]


@pytest.fixture(autouse=True)
def _one_torch_thread():
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


@dataclass
class _Context:
    budget: float
    embedding_dim: int = D


def search_module(width: int, inner_dim: int = 32, seed: int = 0,
                  layout: str = "pad") -> tuple[MLET, MLETEmbeddingBagCollection]:
    method = MLET(MLET.Config(width=width, inner_dim=inner_dim), FIELDS, D, layout=layout)
    torch.manual_seed(seed)
    ebc = EmbeddingBagCollection(tables=method.search_tables(), device=torch.device("cpu"))
    return method, method.build_search_module(ebc)


def kjt(batch_size: int, multi_hot: bool, seed: int) -> KeyedJaggedTensor:
    rng = np.random.default_rng(seed)
    features = {}
    for f in FIELDS:
        lengths = rng.integers(0, 5, size=batch_size) if (multi_hot and f.multi_hot) else np.ones(batch_size)
        lengths = lengths.astype(np.int32)
        features[f.name] = (rng.integers(0, f.num_embeddings, size=int(lengths.sum())).astype(np.int64), lengths)
    return features_to_kjt(features)


def test_collapse_table_and_shards() -> None:
    torch.manual_seed(0)
    V, W = torch.randn(10, 12), torch.randn(4, 12)
    torch.testing.assert_close(collapse_table(V, W), V @ W.T)
    # Row shards (table-wise / row-wise) collapse independently and in place.
    torch.testing.assert_close(torch.cat([collapse_shard(V[:6], W), collapse_shard(V[6:], W)]), V @ W.T)
    # Column shards give partial products that sum to the collapse.
    parts = collapse_shard(V[:, :8], W, col_offset=0) + collapse_shard(V[:, 8:], W, col_offset=8)
    torch.testing.assert_close(parts, V @ W.T)
    with pytest.raises(ValueError, match="need V"):
        collapse_table(V, torch.randn(4, 10))
    with pytest.raises(ValueError, match="does not fit"):
        collapse_shard(V[:, :8], W, col_offset=8)


@pytest.mark.parametrize("layout", ["pad", "project"])
@pytest.mark.parametrize("width", [4, D])  # d < D: padded (the paper) or projected to D; d == D needs neither
def test_collapsed_module_equals_factorized(width: int, layout: str) -> None:
    method, module = search_module(width, layout=layout)
    assert [c.embedding_dim for c in module.inner_configs()] == [32] * 3
    projection = 3 * width * D if width < D and layout == "project" else 0
    assert module.extra_embedding_params() == 3 * 32 * width + projection
    # A few SGD steps so the factors are not at their init.
    opt = torch.optim.SGD(module.parameters(), lr=0.5)
    for step in range(3):
        loss = module(kjt(16, True, seed=step)).values().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    collapsed = collapse_module(module)
    assert [c.embedding_dim for c in collapsed.inner_configs()] == [width] * 3
    assert collapsed.extra_embedding_params() == projection
    for multi_hot in (False, True):
        features = kjt(64, multi_hot, seed=100 + multi_hot)
        with torch.no_grad():
            want, got = module(features), collapsed(features)
        assert got.keys() == want.keys() == ["u", "i", "tags"]
        torch.testing.assert_close(got.values(), want.values(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["pad", "project"])
@pytest.mark.parametrize("width", [4, D])
@pytest.mark.parametrize("shuffled", [False, True])
def test_fused_two_stage_projection_equals_per_table_formula(width: int, shuffled: bool, layout: str,
                                                             split_weight_grads: bool) -> None:
    """The search module projects in two ``_ProjectPooled`` stages (k -> d into a [B, F * d]
    buffer, then d -> D, or nothing when d == D) or pads after the first: the values and
    gradients of ``(x_t @ W_t) @ P_t`` (``[x_t @ W_t, 0]`` under pad) per table, whatever key order
    the (sharded) inner collection returns."""
    from torchrec.sparse.jagged_tensor import KeyedTensor

    _, module = search_module(width, seed=3, layout=layout)
    keys = [c.feature_names[0] for c in module.inner_configs()]
    if shuffled:
        keys = [keys[i] for i in (2, 0, 1)]
    values = torch.randn(9, 32 * len(keys), requires_grad=True)
    kt = KeyedTensor(keys=keys, length_per_key=[32] * len(keys), values=values)
    got = module.project_pooled(kt)
    coef = torch.randn_like(got.values())
    (got.values() * coef).sum().backward()
    params = list(module.down.parameters()) + ([] if module.projection is None else list(module.projection.parameters()))
    got_grads = [values.grad.clone()] + [p.grad.clone() for p in params]
    for p in [values, *params]:
        p.grad = None
    pooled = kt.to_dict()
    outs = []
    for slot, feature in enumerate(module._inner_features):
        y = pooled[feature] @ module.down.slot_weight(slot)
        projection = None if module.projection is None else module.projection.slot_weight(slot)
        outs.append(torch.nn.functional.pad(y, (0, D - width)) if projection is None else y @ projection)
    want = torch.cat(outs, dim=1)
    (want * coef).sum().backward()
    assert got.keys() == ["u", "i", "tags"]
    torch.testing.assert_close(got.values(), want, rtol=1e-5, atol=1e-5)
    for g, w in zip(got_grads, [values.grad] + [p.grad for p in params]):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    ((stages, pad),) = module._layouts.values()
    if layout == "project":
        assert [lay.passthrough for _, lay in stages] == [False, width == D] and pad is None
    else:
        assert [lay.passthrough for _, lay in stages] == [False] and pad.passthrough == (width == D)


def test_export_save_and_load_compact(tmp_path: Path) -> None:
    method, module = search_module(4)
    plan = method.export_plan(module, _Context(budget=1.0))
    assert [f.widths for f in plan.fields] == [[4]] * 3 and plan.budget is None
    assert plan.extra["inner_dim"] == 32 and plan.init_checkpoint is None
    plan = save_collapsed_init(module, plan, tmp_path / "plan.json")
    save_plan(plan, tmp_path / "plan.json")
    assert load_plan(tmp_path).init_checkpoint == "plan_init.pt"
    compact = load_compact_embedding(tmp_path)  # no retrain weights yet: starts from the collapse
    remap = IdRemapper(plan)
    rng = np.random.default_rng(5)
    raw = {f.name: (rng.integers(0, f.num_embeddings, size=12).astype(np.int64), np.full(6, 2, dtype=np.int32))
           for f in FIELDS}
    features = features_to_kjt(remap(raw, 6), retrain_feature_names(plan))
    with torch.no_grad():
        torch.testing.assert_close(compact(features).values(), module(features).values(), rtol=1e-5, atol=1e-5)
    # The retrained weights, when the trainer has written them, take precedence.
    retrained = {k: torch.zeros_like(v) for k, v in compact.state_dict().items()}
    (tmp_path / "retrain").mkdir()
    torch.save(retrained, tmp_path / "retrain" / "compact_embedding.pt")
    assert torch.all(load_compact_embedding(tmp_path)(features).values() == 0)
    torch.save({"ebc.embedding_bags.t_u.weight": torch.zeros(40, 4)}, tmp_path / "retrain" / "compact_embedding.pt")
    with pytest.raises(CompactWeightsError, match=r"compact_embedding.pt: keys do not match the plan's module"):
        load_compact_embedding(tmp_path)
    # The projection entries for a shard-by-shard (distributed) collapse match the retrain module's keys.
    proj = module.retrain_projection_state()
    assert set(proj) == {k for k in compact.state_dict() if k.startswith("projection.")}


def test_init_checkpoint_as_dcp_folder(tmp_path: Path) -> None:
    import dataclasses

    import torch.distributed.checkpoint as dcp

    method, module = search_module(D)
    collapsed = collapse_module(module)
    dcp.save(collapsed.state_dict(), checkpoint_id=str(tmp_path / "collapsed"))
    plan = method.export_plan(module, _Context(budget=1.0))
    save_plan(dataclasses.replace(plan, init_checkpoint="collapsed"), tmp_path)
    loaded = load_compact_embedding(tmp_path)
    for key, value in collapsed.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[key], value)
    save_plan(dataclasses.replace(plan, init_checkpoint="gone.pt"), tmp_path)
    with pytest.raises(CompactWeightsError, match=r"gone.pt: weights not found"):
        load_compact_embedding(tmp_path)


@pytest.mark.parametrize("layout", ["pad", "project"])
def test_mlet_stands_in_for_dlrm_ebc(layout: str) -> None:
    _, module = search_module(4, layout=layout)
    dlrm = DLRM(embedding_bag_collection=module, dense_in_features=3, dense_arch_layer_sizes=[D],
                over_arch_layer_sizes=[4, 1])
    logits = dlrm(torch.randn(16, 3), kjt(16, True, seed=0))
    logits.sum().backward()
    assert logits.shape == (16, 1)
    assert module.down.weight_32x4.grad is not None
    assert module.projection is None if layout == "pad" else module.projection.weight_4x8.grad is not None


def test_config_and_width_from_budget() -> None:
    cards = [f.num_embeddings for f in FIELDS]
    assert MLET(MLET.Config(budget=0.7), FIELDS, D).width == fixed_width_for_budget(cards, D, 0.7, "pad")
    # pad (the paper): d / D <= budget, no projection; project pays for P_t.
    assert MLET(MLET.Config(budget=0.5), FIELDS, D).width == D // 2
    assert MLET(MLET.Config(budget=0.7), FIELDS, D, layout="project").width == \
        fixed_width_for_budget(cards, D, 0.7, "project")
    method = MLET(MLET.Config(), FIELDS, D)
    assert (method.width, method.inner_dim) == (D, 4 * D)
    with pytest.raises(ConfigError, match="mlet.inner_dim: 8 must exceed the retrain width 8"):
        MLET(MLET.Config(inner_dim=8), FIELDS, D)
    with pytest.raises(ConfigError, match="mlet.width"):
        MLET.Config(width=6)
    with pytest.raises(ConfigError, match="mlet.init"):
        MLET.Config(init="rp")
