"""A generic genetic search over integer vectors under a cost budget.

A candidate is a vector of G integer genes, each drawn from its own ascending list of allowed
values. The genes are laid out gene-major over F crossover units (gene g of unit u at
``g * F + u``), so the genes of one unit travel together through a crossover. A cost function,
non-decreasing in every gene, must stay within a budget: every candidate is repaired into it
before it is scored. Nothing here knows what the genes mean. OptEmbed (``optembed.py``) uses it
with a width and a row-keep level per field and the validation AUC as fitness (reference
``evolution.py::EvolutionSearcher`` of github.com/fuyuanlyu/OptEmbed; the reference bugs fixed
here are listed in ``optembed.py``).
"""

from __future__ import annotations

import logging
from typing import Any, Callable, Sequence

import numpy as np

logger = logging.getLogger(__name__)


def _gene_choices(choices: np.ndarray | Sequence[np.ndarray], num_genes: int) -> list[np.ndarray]:
    """The allowed values of every gene: one ascending array each (one array = the same for all)."""
    if isinstance(choices, np.ndarray) and choices.ndim == 1:
        choices = [choices] * num_genes
    if len(choices) != num_genes:
        raise ValueError(f"need the choices of {num_genes} genes, got {len(choices)}")
    return [np.array(sorted({int(v) for v in c}), dtype=np.int64) for c in choices]


def repair_to_budget(candidate: np.ndarray, choices: np.ndarray | Sequence[np.ndarray],
                     param_count_fn: Callable[[np.ndarray], Any], budget_params: float, rng: np.random.Generator,
                     min_params: float = 0.0) -> np.ndarray:
    """Steps random genes down one choice at a time until the candidate fits ``budget_params``,
    then up while it stays under ``min_params`` and a step up still fits.

    Args:
        candidate: ``[G]`` gene values (not modified), each one of its gene's choices.
        choices: the allowed values of every gene (ascending), or one array for all genes (the
            widths of a widths-only candidate).
        param_count_fn: ``[P, G] -> [P]`` parameter counts, non-decreasing in every gene.
        budget_params: the parameter budget.
        rng: random source.
        min_params: grow the candidate until it holds at least this many parameters, where a step
            that keeps it within ``budget_params`` exists (0 = no growth: the reference's repair).
    """
    genes = _gene_choices(choices, len(candidate))
    repaired = np.array(candidate, dtype=np.int64, copy=True)
    index = [int(np.searchsorted(g, v)) for g, v in zip(genes, repaired)]

    def count(c: np.ndarray) -> np.ndarray:
        return np.asarray(param_count_fn(np.atleast_2d(c)), dtype=np.float64)

    while float(count(repaired)[0]) > budget_params:
        shrinkable = [j for j in range(len(genes)) if index[j] > 0]
        if not shrinkable:
            raise ValueError(f"budget_params={budget_params} is below the narrowest candidate")
        j = int(rng.choice(shrinkable))
        index[j] -= 1
        repaired[j] = genes[j][index[j]]
    while min_params > 0 and float(count(repaired)[0]) < min_params:
        growable = [j for j in range(len(genes)) if index[j] + 1 < len(genes[j])]
        if not growable:
            break
        steps = np.repeat(repaired[None], len(growable), axis=0)
        for row, j in enumerate(growable):
            steps[row, j] = genes[j][index[j] + 1]
        fitting = [j for j, params in zip(growable, count(steps)) if params <= budget_params]
        if not fitting:
            break  # every step up overshoots: the search space has no finer step here
        j = int(rng.choice(fitting))
        index[j] += 1
        repaired[j] = genes[j][index[j]]
    return repaired


def mutate(parent: np.ndarray, choices: np.ndarray | Sequence[np.ndarray], mutation_prob: float,
           rng: np.random.Generator) -> np.ndarray:
    """Copy of ``parent`` with each gene redrawn from its choices with probability ``mutation_prob``.

    Unlike the reference (which edits the parent in place and draws from [1, D)), the parent is
    untouched, every width incl. the narrowest can be drawn, and at least one gene changes so a
    mutation never just re-evaluates its parent. ``choices``: one array for every gene (widths)
    or one per gene.
    """
    genes = _gene_choices(choices, len(parent))
    child = np.array(parent, dtype=np.int64, copy=True)
    redraw = rng.random(child.size) < mutation_prob
    for j in np.flatnonzero(redraw):
        child[j] = rng.choice(genes[j])
    variable = [j for j, g in enumerate(genes) if g.size > 1]
    if np.array_equal(child, parent) and variable:
        j = int(rng.choice(variable))
        child[j] = rng.choice(genes[j][genes[j] != child[j]])
    return child


def crossover(parent_a: np.ndarray, parent_b: np.ndarray, rng: np.random.Generator,
              num_units: int | None = None) -> tuple[np.ndarray, int]:
    """One-point crossover at a point in [1, U-1] (the reference draws it in [1, latent_dim]).

    ``num_units`` (default: every gene is a unit) groups genes laid out gene-major (gene g of unit
    u at ``g * U + u``): a field's width and keep level travel together.
    """
    num_units = parent_a.size if num_units is None else num_units
    if num_units < 2 or parent_a.size % num_units:
        raise ValueError(f"crossover needs at least 2 units dividing {parent_a.size} genes, got {num_units}")
    point = int(rng.integers(1, num_units))
    from_a = np.arange(parent_a.size) % num_units < point
    return np.where(from_a, parent_a, parent_b).astype(np.int64), point


def evolutionary_search(fitness_fn: Callable[[np.ndarray], np.ndarray], *, num_fields: int,
                        allowed_widths: Sequence[int], param_count_fn: Callable[[np.ndarray], Any],
                        budget_params: float, generations: int, keep_num: int, mutation_num: int,
                        crossover_num: int, mutation_prob: float, patience: int,
                        rng: np.random.Generator, gene_choices: Sequence[np.ndarray] | None = None,
                        min_params: float = 0.0,
                        initial: Callable[[np.random.Generator, int], np.ndarray] | None = None,
                        ) -> tuple[np.ndarray, list[dict]]:
    """Genetic search of a best integer vector under a cost budget (the scheme of OptEmbed's
    reference ``evolution.py::EvolutionSearcher.search``).

    Each generation scores the population, keeps the best ``keep_num``, mutates the best
    ``mutation_num`` and crosses random pairs of the best ``crossover_num + 1``. Fitness is cached
    per candidate, so ``fitness_fn`` only sees candidates not scored before (one batched call per
    generation). Every candidate is repaired to ``budget_params`` before it is scored (and grown
    towards ``min_params`` where a step fits). The parameter names come from the first user
    (OptEmbed: a unit is a field, the first F genes its widths, the cost its parameter count).

    Args:
        fitness_fn: ``[P, G]`` candidates -> ``[P]`` fitness, higher is better (NaN never wins).
        num_fields: F, the crossover units (G is a multiple of F).
        allowed_widths: the positive values of every gene when ``gene_choices`` is None (a
            candidate is then F genes).
        param_count_fn: ``[P, G]`` candidates -> ``[P]`` costs, non-decreasing in every gene.
        budget_params: the largest allowed cost (``math.inf`` = no budget).
        generations: the most generations (the paper's T).
        keep_num: elite kept from one generation to the next.
        mutation_num: children by mutation per generation.
        crossover_num: children by crossover per generation.
        mutation_prob: per-gene mutation probability.
        patience: stop after this many generations without a better best (0 = never stop early).
        rng: the only random source (the result is deterministic given its state).
        gene_choices: the allowed values of each of the G genes (a multiple of F, gene-major:
            gene g of unit u at ``g * F + u``); None = one gene per unit, ``allowed_widths``.
        min_params: repair grows candidates whose cost is below this (0 = never).
        initial: ``(rng, i) -> [G]`` the i-th candidate of generation 0 before repair (None =
            every gene drawn uniformly).

    Returns:
        ``(best [G] int64, history)``; history has one JSON-able dict per generation
        (``best_widths`` holds the best candidate's first F genes, ``best_genes`` all of them
        when G > F, ``best_params`` its cost).
    """
    widths = np.array(sorted({int(w) for w in allowed_widths}), dtype=np.int64)
    if num_fields <= 0 or widths.size == 0 or widths[0] <= 0:
        raise ValueError(f"need num_fields > 0 and positive widths, got {num_fields}, {list(allowed_widths)}")
    genes = _gene_choices(widths if gene_choices is None else gene_choices,
                          num_fields if gene_choices is None else len(gene_choices))
    if len(genes) % num_fields:
        raise ValueError(f"{len(genes)} genes are not a multiple of num_fields={num_fields}")
    if generations <= 0 or min(keep_num, mutation_num, crossover_num, patience) < 0:
        raise ValueError("generations must be positive and keep_num, mutation_num, crossover_num, patience >= 0")
    if mutation_num + crossover_num == 0 or not 0 < mutation_prob <= 1:
        raise ValueError("need mutation_num + crossover_num > 0 and mutation_prob in (0, 1]")
    narrowest = np.array([g[0] for g in genes], dtype=np.int64)
    if float(np.asarray(param_count_fn(narrowest[None]))[0]) > budget_params:
        raise ValueError(f"budget_params={budget_params} is below the narrowest candidate")

    def repair(candidate: np.ndarray) -> np.ndarray:
        return repair_to_budget(candidate, genes, param_count_fn, budget_params, rng, min_params)

    fitness: dict[tuple[int, ...], float] = {}

    def score(population: list[np.ndarray]) -> np.ndarray:
        new = list({tuple(int(w) for w in c): None for c in population if tuple(int(w) for w in c) not in fitness})
        if new:
            values = np.asarray(fitness_fn(np.array(new, dtype=np.int64)), dtype=np.float64).reshape(-1)
            if values.shape != (len(new),):
                raise ValueError(f"fitness_fn returned {values.shape}, expected ({len(new)},)")
            # A NaN fitness (e.g. AUC of a split with one class) must never win.
            fitness.update(zip(new, np.nan_to_num(values, nan=-np.inf).tolist()))
        return np.array([fitness[tuple(int(w) for w in c)] for c in population])

    def fresh(make: Callable[[], np.ndarray], seen: set) -> np.ndarray:
        # Retry a few times for a candidate not seen yet; a duplicate costs no evaluation anyway.
        for _ in range(10):
            child = make()
            if tuple(child.tolist()) not in seen:
                break
        seen.add(tuple(child.tolist()))
        return child

    def draw(i: int) -> np.ndarray:
        if initial is not None:
            return np.asarray(initial(rng, i), dtype=np.int64)
        return np.array([rng.choice(g) for g in genes], dtype=np.int64)

    population_size = keep_num + mutation_num + crossover_num
    seen: set = set()
    population = [fresh(lambda i=i: repair(draw(i)), seen) for i in range(population_size)]
    best, best_fitness, stale, history = narrowest, -np.inf, 0, []
    for generation in range(generations):
        population = list({tuple(c.tolist()): c for c in population}.values())  # drop duplicates
        values = score(population)
        order = np.argsort(-values, kind="stable")
        ranked = [population[i] for i in order]
        if values[order[0]] > best_fitness:
            best, best_fitness, stale = ranked[0].copy(), float(values[order[0]]), 0
        else:
            stale += 1
        finite = values[np.isfinite(values)]
        history.append({
            "generation": generation, "num_scored": len(fitness), "best_fitness": best_fitness,
            "best_widths": best[:num_fields].tolist(), "best_params": int(np.asarray(param_count_fn(best[None]))[0]),
            "population_best": float(values[order[0]]),
            "population_mean": float(finite.mean()) if finite.size else float("nan"),
        })
        if len(genes) > num_fields:
            history[-1]["best_genes"] = best.tolist()
        logger.info("evolution generation %d: best %.6f, population mean %.6f, %d scored",
                    generation, best_fitness, history[-1]["population_mean"], len(fitness))
        if (patience and stale >= patience) or generation == generations - 1 or all(g.size == 1 for g in genes):
            break
        seen = set(fitness) | {tuple(c.tolist()) for c in ranked[:keep_num]}
        children = list(ranked[:keep_num])
        mutation_pool = ranked[:max(1, mutation_num)]
        crossover_pool = ranked[:crossover_num + 1]
        for i in range(mutation_num):
            parent = mutation_pool[i % len(mutation_pool)]
            children.append(fresh(lambda: repair(mutate(parent, genes, mutation_prob, rng)), seen))
        for _ in range(crossover_num):
            if num_fields < 2 or len(crossover_pool) < 2:
                # No crossover on one field or one parent: mutate the best instead.
                children.append(fresh(lambda: repair(mutate(ranked[0], genes, mutation_prob, rng)), seen))
                continue

            def make_crossover() -> np.ndarray:
                a, b = rng.choice(len(crossover_pool), size=2, replace=False)
                child, _ = crossover(crossover_pool[a], crossover_pool[b], rng, num_fields)
                return repair(child)

            children.append(fresh(make_crossover, seen))
        population = children
    return best, history
