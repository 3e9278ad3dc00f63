"""FLAME (Nguyen et al., USENIX Security 2022) as in docs/algorithms.md §5: cluster the client
models by cosine distance, clip the admitted updates to the median norm, average, add noise."""

import logging
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from defenses.fedavg import apply_update
from defenses.registry import Aggregation, flatten, server_rule
from settings import Field, non_negative

logger = logging.getLogger(__name__)

SETTINGS = {
    "flame_lambda": Field("float", 0.001, non_negative, ">= 0"),
    "flame_whole_state_dict": Field("bool", False),
    "flame_admission": Field("str", "outlier_score", choices=["cluster", "outlier_score"]),
    "flame_outlier_max": Field("float", 0.5, lambda v: 0 <= v < 1, "in [0, 1)"),
    "flame_apply_lr_para": Field("bool", False),
}


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


def admit(distances, rule, outlier_max):
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


@server_rule("flame", label="FLAME", settings=SETTINGS, on_matrix=False, metric_columns=["flame_clip_bound"],
             client_columns=["outlier_score", "majority_ratio"])
def flame(global_state, updates, n_samples, ctx, flame_lambda, flame_whole_state_dict, flame_admission,
          flame_outlier_max, flame_apply_lr_para):
    """Cluster over the trainable parameters (or the whole state dict), clip the admitted updates
    to the median norm, average, add Gaussian noise N(0, (λS)²) to the trainable parameters;
    buffers are the admitted average."""
    trainable = ctx.trainable
    cluster_keys = [k for k in global_state] if flame_whole_state_dict else trainable
    g_vec = flatten(global_state, cluster_keys)
    models = torch.stack([g_vec + flatten(u, cluster_keys) for u in updates])
    admission = admit(cosine_distances(models), flame_admission, flame_outlier_max)
    admitted = admission.admitted

    norms = torch.stack([flatten(u, trainable).norm() for u in updates])
    bound = norms.median()
    scales = (bound / norms.clamp_min(1e-12)).clamp(max=1.0)
    chosen = [i for i in range(len(updates)) if admitted[i]]
    step = ctx.server_lr if flame_apply_lr_para else 1.0
    trainable_set = set(trainable)
    combined = {}
    for k in global_state:
        if k in trainable_set:
            mean = sum(updates[i][k].double() * scales[i] for i in chosen) / len(chosen)
            noise = torch.randn(mean.shape, generator=ctx.generator, device=mean.device, dtype=mean.dtype)
            combined[k] = step * mean + flame_lambda * bound * noise
        else:
            combined[k] = sum(updates[i][k].float() for i in chosen) / len(chosen)
    stats = {"flame_clip_bound": float(bound)}
    client_stats = {"outlier_score": admission.outlier_scores.tolist(),
                    "majority_ratio": admission.majority_ratios.tolist()}
    return Aggregation(apply_update(global_state, combined), admitted.tolist(), stats, client_stats)
