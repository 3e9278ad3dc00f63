"""Server-side aggregation rules behind one interface.

An aggregation rule takes the global state_dict G, the clients' updates (w_i − G, one dict per
client, same keys as G) and their sample counts, and returns an ``Aggregation``: the new global
state_dict and which clients it admitted. Select one with `aggregation_methods` in the YAML.
"""

import logging
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
import torch

import reweighting
import robust_rules

logger = logging.getLogger(__name__)


@dataclass
class Aggregation:
    state: dict
    admitted: list
    stats: dict = field(default_factory=dict)
    client_stats: dict = field(default_factory=dict)  # name -> one value per client (clients.csv)


@dataclass
class RoundContext:
    """What a rule may need beyond the updates: config, the names of the model's trainable
    parameters (in a fixed order), a seeded generator on the model's device, the clients' ids,
    the server's state kept across rounds (saved in the resume checkpoint), FLTrust's server
    update on its root set, and (set by ``vector_rule``) the trainable parameters' sizes."""
    params: dict
    trainable: list
    generator: torch.Generator
    client_ids: list = None
    server_state: dict = field(default_factory=dict)
    root_update: object = None
    layout: list = None


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


@dataclass
class Admission:
    admitted: np.ndarray        # bool per client
    outlier_scores: np.ndarray  # HDBSCAN's GLOSH score per client (NaN where not computed)
    majority_ratios: np.ndarray  # j / h: distance at which a client joins the majority / at which it forms


def _everyone(n, why):
    logger.warning("FLAME: %s; all admitted", why)
    return Admission(np.ones(n, dtype=bool), np.full(n, np.nan), np.full(n, np.nan))


def flame_admission(distances, rule, outlier_max):
    """Which clients FLAME admits, from HDBSCAN on a precomputed distance matrix
    (min_cluster_size n//2+1, min_samples 1, single cluster allowed).

    ``cluster``: the largest cluster's members, as the public implementations do. With a single
    root cluster, HDBSCAN labels as members only the clients still in it when it dies, about
    n//2+1 of them however benign the rest are. ``outlier_score``: clients whose GLOSH score
    1 − h/j is at most ``outlier_max`` (h: the distance at which the majority forms, j: the one
    at which the client joins it), i.e. whose ratio j/h is at most 1/(1 − outlier_max).
    Degenerate rounds (one client, identical models, everyone noise) admit everyone with a
    warning; when n//2+1 or more models are identical (h = 0) the ratio is undefined and the
    ``cluster`` rule decides, with a warning.
    """
    import hdbscan

    n = distances.shape[0]
    if n < 2:
        return _everyone(n, f"{n} client(s) this round, nothing to cluster")
    if float(distances.max()) < 1e-12:
        return _everyone(n, "all client models are identical")
    clusterer = hdbscan.HDBSCAN(metric="precomputed", min_cluster_size=n // 2 + 1, min_samples=1,
                                allow_single_cluster=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        labels = clusterer.fit_predict(distances.cpu().numpy())
    scores = np.asarray(clusterer.outlier_scores_, dtype=float)
    with np.errstate(divide="ignore"):
        ratios = np.where(scores < 1.0, 1.0 / (1.0 - scores), np.inf)
    clustered = labels[labels >= 0]
    if clustered.size == 0:
        return _everyone(n, "HDBSCAN labelled every client as noise")
    in_cluster = labels == np.bincount(clustered).argmax()
    if rule == "cluster":
        return Admission(in_cluster, scores, ratios)
    if majority_height(clusterer, n) < 1e-12:
        logger.warning("FLAME: %d or more client models are identical, so outlier scores are "
                       "undefined; admitting by the cluster rule", n // 2 + 1)
        return Admission(in_cluster, scores, ratios)
    return Admission(scores <= outlier_max, scores, ratios)


def majority_height(clusterer, n):
    """The distance at which n//2+1 clients first form one group in the single-linkage tree."""
    tree = clusterer.single_linkage_tree_.to_numpy()
    return float(tree[tree[:, 3] >= n // 2 + 1, 2].min())


def flame(global_state, updates, n_samples, ctx):
    """FLAME (Nguyen et al., 2022) as in docs/algorithms.md §5: cluster the client models by cosine
    distance over trainable parameters, clip admitted updates to the median norm, average, add
    Gaussian noise N(0, (λS)²) to the trainable parameters; buffers are the admitted average."""
    trainable = ctx.trainable
    cluster_keys = ([k for k in global_state] if ctx.params["flame_whole_state_dict"] else trainable)
    g_vec = flatten(global_state, cluster_keys)
    models = torch.stack([g_vec + flatten(u, cluster_keys) for u in updates])
    admission = flame_admission(cosine_distances(models), ctx.params["flame_admission"],
                                ctx.params["flame_outlier_max"])
    admitted = admission.admitted

    norms = torch.stack([flatten(u, trainable).norm() for u in updates])
    bound = norms.median()
    scales = (bound / norms.clamp_min(1e-12)).clamp(max=1.0)
    chosen = [i for i in range(len(updates)) if admitted[i]]
    step = ctx.params["lr_para"] if ctx.params["flame_apply_lr_para"] else 1.0
    trainable_set = set(trainable)
    combined = {}
    for k in global_state:
        if k in trainable_set:
            mean = sum(updates[i][k].double() * scales[i] for i in chosen) / len(chosen)
            noise = torch.randn(mean.shape, generator=ctx.generator, device=mean.device, dtype=mean.dtype)
            combined[k] = step * mean + ctx.params["flame_lambda"] * bound * noise
        else:
            combined[k] = sum(updates[i][k].float() for i in chosen) / len(chosen)
    stats = {"flame_clip_bound": float(bound)}
    client_stats = {"outlier_score": admission.outlier_scores.tolist(),
                    "majority_ratio": admission.majority_ratios.tolist()}
    return Aggregation(_apply(global_state, combined), admitted.tolist(), stats, client_stats)


def vector_rule(rule):
    """An aggregation rule from a rule of robust_rules.py or reweighting.py, which sees the
    clients' trainable parameters as one update matrix. Server step, the same for every such
    rule (and FedAvg): trainable parameters G + lr_para · aggregate (+ the rule's noise); floating
    buffers (BatchNorm statistics) G + lr_para · the mean of the admitted clients' buffer updates;
    integer buffers keep the global value."""
    def aggregate_rule(global_state, updates, n_samples, ctx):
        ctx = replace(ctx, layout=[(k, global_state[k].numel()) for k in ctx.trainable],
                      root_update=None if ctx.root_update is None else flatten(ctx.root_update, ctx.trainable))
        U = torch.stack([flatten(u, ctx.trainable) for u in updates])
        result = rule(U, n_samples, ctx)
        step = ctx.params["lr_para"]
        chosen = [i for i in range(len(updates)) if result.admitted[i]]
        pieces = dict(zip(ctx.trainable, result.update.split([size for _, size in ctx.layout])))
        combined = {}
        for k, v in global_state.items():
            if k in pieces:
                combined[k] = step * pieces[k].view(v.shape)
                if result.model_noise:
                    combined[k] = combined[k] + result.model_noise * torch.randn(
                        v.shape, generator=ctx.generator, device=v.device, dtype=combined[k].dtype)
            elif v.is_floating_point() and chosen:
                combined[k] = step * sum(updates[i][k].float() for i in chosen) / len(chosen)
            else:
                combined[k] = torch.zeros_like(v)
        return Aggregation(_apply(global_state, combined), result.admitted.tolist(), result.stats)

    aggregate_rule.__doc__ = rule.__doc__
    return aggregate_rule


# The aggregation rules by their `aggregation_methods` name: to add one, write it in
# robust_rules.py or reweighting.py (update matrix in, VectorResult out) and register it here.
AGGREGATORS = {
    "mean": fedavg, "weighted_mean": weighted_fedavg, "flame": flame,
    **{name: vector_rule(getattr(robust_rules, name)) for name in
       ("krum", "multi_krum", "bulyan", "median", "trimmed_mean", "rfa", "norm_clipping", "weak_dp")},
    **{name: vector_rule(getattr(reweighting, name)) for name in ("foolsgold", "fltrust")},
}


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
        global_state, [updates[i] for i in kept], [n_samples[i] for i in kept],
        replace(ctx, client_ids=[ids[i] for i in kept]))
    admitted = [False] * len(updates)
    client_stats = {name: [float("nan")] * len(updates) for name in result.client_stats}
    for j, i in enumerate(kept):
        admitted[i] = bool(result.admitted[j])
        for name, values in result.client_stats.items():
            client_stats[name][i] = values[j]
    if not is_finite_update(result.state):
        logger.warning("the aggregate is not finite (overflow); the global model is unchanged")
        return Aggregation(unchanged, admitted, result.stats, client_stats)
    return Aggregation(result.state, admitted, result.stats, client_stats)
