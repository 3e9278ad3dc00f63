"""Robust aggregation baselines that FLIP is compared against, as functions of the update matrix.

Each rule takes ``U`` (n clients × d trainable parameters, float64, one row per client update
w_i − G), the clients' sample counts, the round context and its own settings as keyword arguments,
and returns a ``VectorResult``: one aggregate update vector and which clients it admitted.
defense.py turns that into the new global model (the same server step for every rule) and averages
the BatchNorm buffers over the admitted clients. References: Krum and Multi-Krum (Blanchard et al., NeurIPS 2017), Bulyan (El Mhamdi et
al., ICML 2018), coordinate-wise median and trimmed mean (Yin et al., ICML 2018), RFA (Pillutla
et al., IEEE TSP 2022), norm clipping and weak DP (Sun et al., 2019, "Can you really backdoor
federated learning?").
"""

import logging

import numpy as np
import torch

from defenses.registry import VectorResult, server_rule
from settings import Field, non_negative, positive

logger = logging.getLogger(__name__)

ROBUST_F = {"robust_f": Field("int", 1, non_negative, ">= 0")}
CLIP_NORM = {"clip_norm": Field("float", 1.0, positive, "> 0")}


def krum_min_clients(f):
    """Krum and Multi-Krum assume n ≥ 2f + 3."""
    return 2 * f + 3


def bulyan_min_clients(f):
    """Bulyan assumes n ≥ 4f + 3."""
    return 4 * f + 3


def enough_clients(rule, min_clients):
    """A rule's check: the clients per round its assumed attacker count `robust_f` needs."""
    def check(settings, n):
        f = settings["robust_f"]
        if n < min_clients(f):
            return (f"robust_f: {rule} with f={f} assumed attackers needs at least {min_clients(f)} "
                    f"clients per round (no_models={n})")
        return None
    return check


def multi_krum_check(settings, n):
    problem = enough_clients("multi_krum", krum_min_clients)(settings, n)
    if not problem and settings["multi_krum_m"] and settings["multi_krum_m"] > n:
        return f"multi_krum_m: {settings['multi_krum_m']} exceeds no_models={n}"
    return problem


def squared_distances(U):
    """Pairwise squared Euclidean distances between the rows of ``U``."""
    sq = (U * U).sum(1)
    return (sq[:, None] + sq[None, :] - 2 * U @ U.T).clamp_min(0.0)


def usable_f(n, f, needed, rule):
    """The assumed attacker count f, lowered (with a warning) when this round has too few clients
    for it (``needed(f)`` clients are required)."""
    while f > 0 and n < needed(f):
        f -= 1
        logger.warning("%s: %d clients are too few for f=%d attackers; using f=%d this round", rule, n, f + 1, f)
    return f


def krum_scores(U, f):
    """Krum score per client: the sum of squared distances to its n − f − 2 nearest others."""
    n = len(U)
    d = squared_distances(U)
    d.fill_diagonal_(float("inf"))
    k = max(n - f - 2, 1)
    return d.topk(k, dim=1, largest=False).values.sum(1)


@server_rule("krum", label="Krum", settings=ROBUST_F, check=enough_clients("krum", krum_min_clients),
             metric_columns=["krum_chosen"])
def krum(U, n_samples, ctx, robust_f):
    """The single update with the lowest Krum score (requires n ≥ 2f + 3); records the chosen
    client's id."""
    f = usable_f(len(U), robust_f, krum_min_clients, "krum")
    chosen = int(krum_scores(U, f).argmin())
    admitted = np.zeros(len(U), dtype=bool)
    admitted[chosen] = True
    return VectorResult(U[chosen].clone(), admitted, {"krum_chosen": ctx.client_ids[chosen]})


@server_rule("multi_krum", label="Multi-Krum", check=multi_krum_check,
             settings={**ROBUST_F, "multi_krum_m": Field("int", optional=True, check=positive, rule=">= 1")})
def multi_krum(U, n_samples, ctx, robust_f, multi_krum_m):
    """The mean of the m updates with the lowest Krum scores (m = `multi_krum_m`, default n − f)."""
    n = len(U)
    f = usable_f(n, robust_f, krum_min_clients, "multi_krum")
    m = min(multi_krum_m or n - f, n)
    chosen = krum_scores(U, f).argsort()[:m]
    admitted = np.zeros(n, dtype=bool)
    admitted[chosen.numpy()] = True
    return VectorResult(U[chosen].mean(0), admitted)


@server_rule("bulyan", label="Bulyan", settings=ROBUST_F, check=enough_clients("bulyan", bulyan_min_clients))
def bulyan(U, n_samples, ctx, robust_f):
    """Bulyan: select θ = n − 2f updates by repeated Krum, then per coordinate average the
    β = θ − 2f values closest to their median (requires n ≥ 4f + 3)."""
    n = len(U)
    f = usable_f(n, robust_f, bulyan_min_clients, "bulyan")
    remaining, selected = list(range(n)), []
    while len(selected) < n - 2 * f:
        scores = krum_scores(U[remaining], min(f, max(len(remaining) - 3, 0) // 2))
        selected.append(remaining.pop(int(scores.argmin())))
    S = U[selected]
    beta = len(selected) - 2 * f
    median = coordinate_median(S)
    closest = (S - median).abs().argsort(dim=0)[:beta]
    admitted = np.zeros(n, dtype=bool)
    admitted[selected] = True
    return VectorResult(S.gather(0, closest).mean(0), admitted)


def coordinate_median(U):
    """Coordinate-wise median (the mean of the two middle values for an even count, as numpy)."""
    s = U.sort(dim=0).values
    n = len(U)
    return (s[(n - 1) // 2] + s[n // 2]) / 2


@server_rule("median", label="median")
def median(U, n_samples, ctx):
    return VectorResult(coordinate_median(U), np.ones(len(U), dtype=bool))


@server_rule("trimmed_mean", label="trimmed mean", metric_columns=["trimmed_per_side"],
             settings={"trim_fraction": Field("float", 0.1, lambda v: 0 <= v < 0.5, "in [0, 0.5)")})
def trimmed_mean(U, n_samples, ctx, trim_fraction):
    """Coordinate-wise mean after dropping the ⌊β·n⌋ largest and smallest values (β = `trim_fraction`)."""
    n = len(U)
    k = min(int(trim_fraction * n), (n - 1) // 2)
    s = U.sort(dim=0).values
    return VectorResult(s[k:n - k].mean(0), np.ones(n, dtype=bool), {"trimmed_per_side": k})


@server_rule("rfa", label="RFA", settings={"rfa_iterations": Field("int", 10, positive, ">= 1"),
                                           "rfa_smoothing": Field("float", 1e-6, positive, "> 0")})
def rfa(U, n_samples, ctx, rfa_iterations, rfa_smoothing):
    """RFA: the geometric median of the updates weighted by sample counts, by the smoothed
    Weiszfeld iteration (`rfa_iterations` steps, smoothing ν = `rfa_smoothing`)."""
    alpha = torch.as_tensor(n_samples, dtype=U.dtype)
    alpha = alpha / alpha.sum()
    v = (alpha[:, None] * U).sum(0)
    for _ in range(rfa_iterations):
        beta = alpha / (U - v).norm(dim=1).clamp_min(rfa_smoothing)
        v = (beta[:, None] * U).sum(0) / beta.sum()
    return VectorResult(v, np.ones(len(U), dtype=bool))


def clip_rows(U, bound):
    """Each row scaled to norm at most ``bound``."""
    return U * (bound / U.norm(dim=1, keepdim=True).clamp_min(1e-12)).clamp(max=1.0)


@server_rule("norm_clipping", label="norm clipping", settings=CLIP_NORM)
def norm_clipping(U, n_samples, ctx, clip_norm):
    """Every update clipped to norm `clip_norm`, then averaged (FedAvg)."""
    return VectorResult(clip_rows(U, clip_norm).mean(0), np.ones(len(U), dtype=bool))


@server_rule("weak_dp", label="weak DP", settings={**CLIP_NORM, "dp_sigma": Field("float", 0.001, non_negative, ">= 0")})
def weak_dp(U, n_samples, ctx, clip_norm, dp_sigma):
    """Norm clipping, then Gaussian noise N(0, `dp_sigma`²) on every trainable parameter of the
    new global model."""
    mean = clip_rows(U, clip_norm).mean(0)
    return VectorResult(mean, np.ones(len(U), dtype=bool), model_noise=dp_sigma)
