"""Server-side aggregation rules behind one interface.

An aggregation rule takes the global state_dict G, the clients' updates (w_i − G, one dict per
client, same keys as G) and their sample counts, and returns an ``Aggregation``: the new global
state_dict and which clients it admitted. Select one with `aggregation_methods` in the YAML.
"""

import logging
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class Aggregation:
    state: dict
    admitted: list
    stats: dict = field(default_factory=dict)


@dataclass
class RoundContext:
    """What a rule may need beyond the updates: config, the names of the model's trainable
    parameters (in a fixed order), a seeded generator on the model's device, and the clients'
    ids (for messages)."""
    params: dict
    trainable: list
    generator: torch.Generator
    client_ids: list = None


def _apply(global_state, combined):
    """G + combined update for floating entries; integer buffers keep the global value."""
    return {k: (v + combined[k].to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in global_state.items()}


def _weighted_sum(updates, weights):
    return {k: sum(w * u[k].float() for w, u in zip(weights, updates)) for k in updates[0]}


def fedavg(global_state, updates, n_samples, ctx):
    """Reference FedAvg over the whole state_dict: G += lr_para / no_models · Σ updates."""
    coef = ctx.params["lr_para"] / ctx.params["no_models"]
    state = _apply(global_state, _weighted_sum(updates, [coef] * len(updates)))
    return Aggregation(state, [True] * len(updates))


def weighted_fedavg(global_state, updates, n_samples, ctx):
    """FedAvg weighted by sample counts: G += lr_para · Σ (n_i / Σn) · update_i."""
    total = float(sum(n_samples)) or 1.0
    weights = [ctx.params["lr_para"] * n / total for n in n_samples]
    return Aggregation(_apply(global_state, _weighted_sum(updates, weights)), [True] * len(updates))


def flatten(state, names):
    """One float64 vector of the entries ``names`` of a state dict, in that order."""
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in names])


def cosine_distances(vectors):
    """Pairwise cosine distances (1 − cos) of the rows of ``vectors``, float64, zero diagonal."""
    unit = vectors / vectors.norm(dim=1, keepdim=True).clamp_min(1e-12)
    dist = (1.0 - unit @ unit.T).clamp_min(0.0)
    dist.fill_diagonal_(0.0)
    return dist


def largest_cluster(distances):
    """Boolean admission mask: the largest HDBSCAN cluster of a precomputed distance matrix.

    Falls back to admitting everyone (with a warning) when clustering cannot decide: a single
    client, identical models, or every client labelled noise.
    """
    import hdbscan

    n = distances.shape[0]
    if n < 2:
        logger.warning("FLAME: %d client(s) this round; nothing to cluster, all admitted", n)
        return np.ones(n, dtype=bool)
    if float(distances.max()) < 1e-12:
        logger.warning("FLAME: all client models are identical; all admitted")
        return np.ones(n, dtype=bool)
    clusterer = hdbscan.HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                                allow_single_cluster=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = clusterer.fit_predict(distances.cpu().numpy())
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        logger.warning("FLAME: HDBSCAN labelled every client as noise; all admitted")
        return np.ones(n, dtype=bool)
    return labels == np.bincount(clustered).argmax()


def flame(global_state, updates, n_samples, ctx):
    """FLAME (Nguyen et al., 2022) as in REFERENCE.md §5: cluster the client models by cosine
    distance over trainable parameters, clip admitted updates to the median norm, average, add
    Gaussian noise N(0, (λS)²) to the trainable parameters; buffers are the admitted average."""
    trainable = ctx.trainable
    cluster_keys = ([k for k in global_state] if ctx.params["flame_whole_state_dict"] else trainable)
    g_vec = flatten(global_state, cluster_keys)
    models = torch.stack([g_vec + flatten(u, cluster_keys) for u in updates])
    admitted = largest_cluster(cosine_distances(models))

    norms = torch.stack([flatten(u, trainable).norm() for u in updates])
    bound = norms.median()
    scales = (bound / norms.clamp_min(1e-12)).clamp(max=1.0)
    chosen = [i for i in range(len(updates)) if admitted[i]]
    trainable_set = set(trainable)
    combined = {}
    for k in global_state:
        if k in trainable_set:
            mean = sum(updates[i][k].double() * scales[i] for i in chosen) / len(chosen)
            noise = torch.randn(mean.shape, generator=ctx.generator, device=mean.device, dtype=mean.dtype)
            combined[k] = mean + ctx.params["flame_lambda"] * bound * noise
        else:
            combined[k] = sum(updates[i][k].float() for i in chosen) / len(chosen)
    stats = {"flame_clip_bound": float(bound)}
    return Aggregation(_apply(global_state, combined), admitted.tolist(), stats)


AGGREGATORS = {"mean": fedavg, "weighted_mean": weighted_fedavg, "flame": flame}


def is_finite_update(update):
    """True when every floating entry of a client update is finite."""
    return all(bool(torch.isfinite(v).all()) for v in update.values() if v.is_floating_point())


def aggregate(global_state, updates, n_samples, ctx):
    """Apply the configured rule to the clients whose updates are finite. A client sending NaN or
    Inf is rejected (its ``admitted`` flag is False) and named in a warning; if no client is left,
    or the rule's result is not finite, the global model stays as it was."""
    ids = ctx.client_ids or list(range(len(updates)))
    finite = [is_finite_update(u) for u in updates]
    for cid, ok in zip(ids, finite):
        if not ok:
            logger.warning("client %s sent a non-finite update (NaN or Inf): rejected", cid)
    kept = [i for i, ok in enumerate(finite) if ok]
    unchanged = {k: v.clone() for k, v in global_state.items()}
    if not kept:
        logger.warning("every update of this round was rejected; the global model is unchanged")
        return Aggregation(unchanged, [False] * len(updates))
    result = AGGREGATORS[ctx.params["aggregation_methods"]](
        global_state, [updates[i] for i in kept], [n_samples[i] for i in kept], ctx)
    admitted = [False] * len(updates)
    for i, ok in zip(kept, result.admitted):
        admitted[i] = bool(ok)
    if not is_finite_update(result.state):
        logger.warning("the aggregate is not finite (overflow); the global model is unchanged")
        return Aggregation(unchanged, admitted, result.stats)
    return Aggregation(result.state, admitted, result.stats)
