"""Synthetic multi-scenario CTR data, deterministic by seed.

The click probability of a sample (user u, target item i, scenario s, behaviour sequence H) is

    logit = b_s + c_i + d_u + 0.7 <P_u, Q_i>                shared: item and user bias, user-item affinity
          + alpha * (c^s_i + d^s_u + 0.5 <P^s_u, Q^s_i>)   scenario-specific biases and affinity
          + beta_s * 3 * frac{h in H : cat(h) = cat(i)}   interest match, weight depends on the scenario
          + g_{s, ctx} - 0.5 * price                      scenario x context bias, dense price
    click ~ Bernoulli(sigmoid(logit))

so a model that keeps per-scenario state (scenario-aware embeddings, per-scenario branches) can fit the
alpha and beta_s terms that a scenario-agnostic model can only average: it measurably wins on held-out AUC.
Users and items are Zipf(``zipf``)-distributed (popular ids recur, as in real logs), ids permuted so that
popularity is not id order; bag feature "tags" has 0..4 ids per sample; sequences have 0..L valid positions
(some samples none at all), padded with id 0 (the sequence table's row 0 is padding; item j is id j + 1).
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from .batch import CTRData, FeatureSpec, SequenceSpec

DEFAULT_MIX = (0.4, 0.3, 0.2, 0.1)


def _zipf_ids(rng: np.random.Generator, n: int, vocab: int, a: float) -> np.ndarray:
    """n ids in [0, vocab) with P(rank k) ~ (k + 1)^-a, ranks mapped to ids by a fixed random permutation."""
    p = 1.0 / np.arange(1, vocab + 1, dtype=np.float64) ** a
    ranks = rng.choice(vocab, size=n, p=p / p.sum())
    return rng.permutation(vocab)[ranks]


def synthetic_features(num_users=2000, num_items=3000, num_categories=50, num_contexts=32, num_segments=64,
                       num_tags=500, seq_len=20) -> tuple[list, SequenceSpec]:
    """The feature list (user and item scenario-aware) and the behaviour-sequence spec of the generator."""
    feats = [FeatureSpec("user", num_users, True), FeatureSpec("item", num_items, True),
             FeatureSpec("category", num_categories, False), FeatureSpec("segment", num_segments, False),
             FeatureSpec("context", num_contexts, False), FeatureSpec("tags", num_tags, False)]
    return feats, SequenceSpec("hist_item", num_items + 1, seq_len, True)


def make_synthetic(num_samples: int = 100_000, *, num_scenarios: int = 4,
                   scenario_mix: Optional[Sequence[float]] = None, num_users: int = 2000, num_items: int = 3000,
                   num_categories: int = 50, num_contexts: int = 32, num_segments: int = 64, num_tags: int = 500,
                   seq_len: int = 20, zipf: float = 1.1, shared_rank: int = 8, specific_rank: int = 4,
                   specific_strength: float = 1.0, base_ctr: float = 0.2, seed: int = 0) -> CTRData:
    """Generate ``num_samples`` samples (see the module docstring for the click model).

    scenario_mix: probabilities of the M scenarios (default 0.4/0.3/0.2/0.1 for M = 4, uniform otherwise).
    specific_strength: alpha, the weight of the scenario-specific affinity (0 = scenarios differ only in bias).
    Same arguments and seed -> bitwise the same data. ``data.logit`` holds the true logit of every sample (the
    Bayes-optimal score: its AUC is the best any model can reach).
    """
    if num_samples < 0:
        raise ValueError(f"make_synthetic: num_samples must be >= 0, got {num_samples}")
    M = int(num_scenarios)
    if M < 1:
        raise ValueError(f"make_synthetic: num_scenarios must be >= 1, got {num_scenarios}")
    if scenario_mix is None:
        mix = np.array(DEFAULT_MIX if M == 4 else [1.0 / M] * M, dtype=np.float64)
    else:
        mix = np.asarray(scenario_mix, dtype=np.float64)
        if mix.shape != (M,) or (mix < 0).any() or mix.sum() <= 0:
            raise ValueError(f"make_synthetic: scenario_mix must be {M} non-negative weights, got {scenario_mix!r}")
    mix = mix / mix.sum()
    rng = np.random.default_rng(seed)
    N, U, I, C = num_samples, num_users, num_items, num_categories

    # ---- the world: latent factors and biases (fixed by the seed)
    P = rng.normal(0, shared_rank ** -0.25, (U, shared_rank))
    Q = rng.normal(0, shared_rank ** -0.25, (I, shared_rank))
    Ps = rng.normal(0, specific_rank ** -0.25, (M, U, specific_rank))
    Qs = rng.normal(0, specific_rank ** -0.25, (M, I, specific_rank))
    item_bias = rng.normal(0, 0.8, I)
    user_bias = rng.normal(0, 0.5, U)
    item_bias_s = rng.normal(0, 1.0, (M, I))
    user_bias_s = rng.normal(0, 0.5, (M, U))
    ctx_bias = rng.normal(0, 0.5, (M, num_contexts))
    scen_bias = rng.normal(0, 0.3, M)
    beta = np.linspace(0.25, 1.5, M)[rng.permutation(M)]
    item_cat = rng.integers(0, C, I)
    item_cat[:C] = np.arange(C)  # every category owns at least one item
    by_cat = np.argsort(item_cat, kind="stable")
    cat_start = np.searchsorted(item_cat[by_cat], np.arange(C))
    cat_count = np.bincount(item_cat, minlength=C)
    user_pref = rng.integers(0, C, (U, 3))
    user_seg = rng.integers(0, num_segments, U)

    def items_of(cats: np.ndarray) -> np.ndarray:
        return by_cat[cat_start[cats] + (rng.random(cats.shape) * cat_count[cats]).astype(np.int64)]

    # ---- samples
    scenario = rng.choice(M, size=N, p=mix).astype(np.int64)
    user = _zipf_ids(rng, N, U, zipf)
    item = _zipf_ids(rng, N, I, zipf)
    from_pref = rng.random(N) < 0.3
    pref_cat = user_pref[user, rng.integers(0, 3, N)]
    item = np.where(from_pref, items_of(pref_cat), item)
    context = rng.integers(0, num_contexts, N)
    tag_len = rng.integers(0, 5, N)
    tags = rng.integers(0, num_tags, int(tag_len.sum()))
    price = rng.random(N).astype(np.float32)
    activity = rng.random(N).astype(np.float32)

    L = seq_len
    seq_lengths = rng.integers(0, L + 1, N)
    seq_lengths[rng.random(N) < 0.05] = 0  # some users have no history at all
    hist_pref = user_pref[np.repeat(user, L), rng.integers(0, 3, N * L)].reshape(N, L)
    hist = np.where(rng.random((N, L)) < 0.7, items_of(hist_pref), _zipf_ids(rng, N * L, I, zipf).reshape(N, L))
    valid = np.arange(L)[None, :] < seq_lengths[:, None]
    seq_ids = np.where(valid, hist + 1, 0).astype(np.int64)

    # ---- clicks
    match = ((item_cat[hist] == item_cat[item][:, None]) & valid).sum(1) / np.maximum(seq_lengths, 1)
    logit = (scen_bias[scenario] + item_bias[item] + user_bias[user] + 0.7 * (P[user] * Q[item]).sum(1)
             + specific_strength * (item_bias_s[scenario, item] + user_bias_s[scenario, user]
                                    + 0.5 * (Ps[scenario, user] * Qs[scenario, item]).sum(1))
             + beta[scenario] * 3.0 * match + ctx_bias[scenario, context] - 0.5 * price)
    logit = logit - np.quantile(logit, 1.0 - base_ctr) if N else logit  # calibrate the base click rate
    label = (rng.random(N) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)

    feats, seq = synthetic_features(U, I, C, num_contexts, num_segments, num_tags, L)
    ones = np.ones(N, dtype=np.int64)
    values = [user, item, item_cat[item], user_seg[user], context, tags]
    lengths = [ones, ones, ones, ones, ones, tag_len.astype(np.int64)]
    return CTRData(features=feats, values=[v.astype(np.int64) for v in values], lengths=lengths, scenario=scenario,
                   label=label, num_scenarios=M, dense=np.stack([price, activity], 1), dense_names=("price", "activity"),
                   sequence=seq, seq_ids=seq_ids, seq_lengths=seq_lengths.astype(np.int64),
                   scenario_names=tuple(f"scenario{m}" for m in range(M)), logit=logit)
