"""The generic genetic search (embedding_methods/evolution.py) on planted toy problems, with no
OptEmbed, no torch and no model: integer vectors, a linear cost and a fitness we choose."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest

from embdim.embedding_methods.evolution import crossover, evolutionary_search, mutate, repair_to_budget

UNITS = 6
# Two genes per unit, gene-major (gene g of unit u at g * UNITS + u): a "size" in 1..8 and a
# "level" in {0, 1, 2, 3}, different value sets per unit to make sure each gene uses its own.
CHOICES = ([np.arange(1, 9) for _ in range(UNITS)]
           + [np.array([0, 1, 2, 3]) if u % 2 == 0 else np.array([0, 2]) for u in range(UNITS)])
COST = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8], dtype=np.float64)  # non-negative: cost is monotone
TARGET = np.array([5, 2, 7, 1, 3, 4, 2, 0, 1, 2, 0, 2], dtype=np.int64)


def cost(candidates: np.ndarray) -> np.ndarray:
    return np.atleast_2d(candidates) @ COST


def search(fitness_fn, budget: float, seed: int, **overrides):
    kwargs = dict(num_fields=UNITS, allowed_widths=np.arange(1, 9), param_count_fn=cost, budget_params=budget,
                  generations=40, keep_num=6, mutation_num=12, crossover_num=12, mutation_prob=0.15, patience=0,
                  rng=np.random.default_rng(seed), gene_choices=CHOICES)
    kwargs.update(overrides)
    return evolutionary_search(fitness_fn, **kwargs)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_finds_a_planted_optimum_inside_the_budget(seed: int) -> None:
    """The fitness peaks at TARGET (fitness 0) and TARGET fits the budget: the search must find it
    exactly, and never score a candidate over the budget or one it scored before."""
    budget = float(cost(TARGET)[0]) + 10.0
    scored: list[tuple[int, ...]] = []

    def fitness(candidates: np.ndarray) -> np.ndarray:
        assert candidates.shape[1] == 2 * UNITS and candidates.dtype == np.int64
        assert bool((cost(candidates) <= budget).all()), "a candidate over the budget was scored"
        for c in candidates:
            for g, (value, allowed) in enumerate(zip(c, CHOICES)):
                assert value in allowed, f"gene {g} = {value} is not one of its choices"
        scored.extend(tuple(c.tolist()) for c in candidates)
        return -np.abs(candidates - TARGET).sum(1).astype(np.float64)

    best, history = search(fitness, budget, seed)
    assert best.tolist() == TARGET.tolist()
    assert history[-1]["best_fitness"] == 0.0
    assert history[-1]["best_genes"] == TARGET.tolist() and history[-1]["best_widths"] == TARGET[:UNITS].tolist()
    assert history[-1]["best_params"] == int(cost(TARGET)[0])
    assert len(scored) == len(set(scored)), "fitness is cached: no candidate is scored twice"
    best_so_far = [h["best_fitness"] for h in history]
    assert best_so_far == sorted(best_so_far)


def test_the_budget_binds_when_the_fitness_wants_everything() -> None:
    """Fitness grows with every gene, so the unconstrained best is the widest vector; under a
    budget the best must sit in [0.95 b, b] (repair grows candidates towards min_params) and beat
    the best of as many random budget-repaired candidates."""
    weights = np.array([2, 7, 1, 8, 2, 8, 1, 8, 2, 8, 4, 5], dtype=np.float64)
    budget = 0.5 * float(cost(np.array([c[-1] for c in CHOICES]))[0])

    def fitness(candidates: np.ndarray) -> np.ndarray:
        assert bool((cost(candidates) <= budget).all())
        return np.sqrt(candidates * weights).sum(1)

    best, history = search(fitness, budget, 0, min_params=0.95 * budget)
    assert 0.95 * budget <= float(cost(best)[0]) <= budget
    rng = np.random.default_rng(1)
    num_scored = history[-1]["num_scored"]
    random = np.stack([repair_to_budget(np.array([rng.choice(c) for c in CHOICES]), CHOICES, cost, budget, rng)
                       for _ in range(num_scored)])
    assert float(fitness(best[None])[0]) > float(fitness(random).max())


def test_patience_stops_early_and_one_choice_per_gene_stops_at_once() -> None:
    _, history = search(lambda c: np.zeros(len(c)), 1e9, 0, patience=3)
    assert len(history) == 4  # the first generation sets the best, then 3 without improvement
    fixed = [np.array([v]) for v in TARGET]
    best, history = search(lambda c: np.zeros(len(c)), 1e9, 0, gene_choices=fixed)
    assert best.tolist() == TARGET.tolist() and len(history) == 1


def test_a_nan_fitness_never_wins() -> None:
    def fitness(candidates: np.ndarray) -> np.ndarray:
        values = -np.abs(candidates - TARGET).sum(1).astype(np.float64)
        values[(candidates == TARGET).all(1)] = np.nan  # the planted optimum reports NaN
        return values

    best, history = search(fitness, 1e9, 0, generations=10)
    assert best.tolist() != TARGET.tolist() and np.isfinite(history[-1]["best_fitness"])


def test_operators_keep_units_together_and_respect_each_genes_choices() -> None:
    rng = np.random.default_rng(0)
    a = np.array([c[0] for c in CHOICES], dtype=np.int64)
    b = np.array([c[-1] for c in CHOICES], dtype=np.int64)
    for _ in range(50):
        child, point = crossover(a, b, rng, num_units=UNITS)
        assert 1 <= point <= UNITS - 1
        for u in range(UNITS):  # both genes of a unit come from the same parent
            source = a if u < point else b
            assert child[u] == source[u] and child[UNITS + u] == source[UNITS + u]
        mutant = mutate(a, CHOICES, 0.3, rng)
        assert not np.array_equal(mutant, a), "a mutation changes at least one gene"
        assert all(v in c for v, c in zip(mutant, CHOICES))
    with pytest.raises(ValueError, match="at least 2 units"):
        crossover(a, b, rng, num_units=5)  # 12 genes do not split into 5 units


def test_bad_arguments_are_rejected() -> None:
    narrowest = float(cost(np.array([c[0] for c in CHOICES]))[0])
    with pytest.raises(ValueError, match="below the narrowest candidate"):
        search(lambda c: np.zeros(len(c)), narrowest - 1, 0)
    with pytest.raises(ValueError, match="not a multiple of num_fields"):
        search(lambda c: np.zeros(len(c)), 1e9, 0, num_fields=5)
    with pytest.raises(ValueError, match=r"fitness_fn returned \(1,\)"):
        search(lambda c: np.zeros(1), 1e9, 0)
    with pytest.raises(ValueError, match="mutation_prob"):
        search(lambda c: np.zeros(len(c)), 1e9, 0, mutation_prob=0.0)


def test_the_module_needs_neither_torch_nor_the_rest_of_embdim(monkeypatch: pytest.MonkeyPatch) -> None:
    """Loaded on its own file with torch and embdim made unimportable, the module still works."""
    # A None entry makes ``import torch`` (and of any submodule, through its parent) fail.
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.setitem(sys.modules, "embdim", None)
    path = Path(__file__).resolve().parents[1] / "embedding_methods" / "evolution.py"
    spec = importlib.util.spec_from_file_location("standalone_evolution", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    best, _ = module.evolutionary_search(
        lambda c: -np.abs(c - TARGET[:UNITS]).sum(1).astype(np.float64), num_fields=UNITS,
        allowed_widths=np.arange(1, 9), param_count_fn=lambda c: np.atleast_2d(c).sum(1), budget_params=1e9,
        generations=40, keep_num=6, mutation_num=12, crossover_num=12, mutation_prob=0.15, patience=0,
        rng=np.random.default_rng(0))
    assert best.tolist() == TARGET[:UNITS].tolist()
