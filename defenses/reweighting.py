"""Baselines that weight the clients' updates by trust: FoolsGold (Fung et al., RAID 2020) and
FLTrust (Cao et al., NDSS 2021). Same interface as robust_rules.py; a client whose weight is 0
counts as rejected."""

import logging

import numpy as np
import torch

from defenses.registry import VectorResult, server_rule
from settings import Field, positive

logger = logging.getLogger(__name__)


def feature_slice(ctx, foolsgold_features):
    """The columns of the update matrix that FoolsGold compares: the classifier's weight (the
    last trainable parameter named ``*weight``, else the last one; `foolsgold_features:
    classifier`) or every trainable parameter."""
    if foolsgold_features == "all":
        return slice(None)
    start, weight, last = 0, None, None
    for name, size in ctx.layout:
        last = slice(start, start + size)
        if name.endswith("weight"):
            weight = last
        start += size
    return weight or last


def weighted_mean(U, weights):
    """Σ w_i U_i / Σ w_i, or None when every weight is 0."""
    total = float(weights.sum())
    if total <= 0:
        return None
    return (weights[:, None] * U).sum(0) / total


def foolsgold_weights(H):
    """FoolsGold's per-client weights from the clients' (historical) update features ``H``: low
    for clients whose histories are too similar to another's (sybils), with pardoning of honest
    clients that resemble a sybil and the logit confidence spread (κ = 1)."""
    n = len(H)
    unit = H / H.norm(dim=1, keepdim=True).clamp_min(1e-12)
    cs = (unit @ unit.T).numpy() - np.eye(n)
    max_cs = cs.max(axis=1)
    for i in range(n):
        for j in range(n):
            if i != j and max_cs[i] < max_cs[j]:
                cs[i, j] *= max_cs[i] / max_cs[j]
    wv = np.clip(1 - cs.max(axis=1), 0, 1)
    if wv.max() > 0:
        wv = wv / wv.max()
    wv[wv == 1] = 0.99
    with np.errstate(divide="ignore"):
        wv = np.log(wv / (1 - wv)) + 0.5
    return np.clip(np.nan_to_num(wv, nan=0.0, posinf=1.0, neginf=0.0), 0, 1)


@server_rule("foolsgold", label="FoolsGold", client_columns=["foolsgold_weight"],
             settings={"foolsgold_memory": Field("bool", True),
                       "foolsgold_features": Field("str", "classifier", choices=["classifier", "all"])})
def foolsgold(U, n_samples, ctx, foolsgold_memory, foolsgold_features):
    """Weighted mean of the updates with FoolsGold's weights. With `foolsgold_memory` each
    client's features are the sum of all its updates so far (kept in the server state, and so in
    the resume checkpoint); otherwise this round's update alone."""
    cols = feature_slice(ctx, foolsgold_features)
    features = U[:, cols].float()
    if foolsgold_memory:
        history = ctx.server_state.setdefault("foolsgold_history", {})
        for cid, row in zip(ctx.client_ids, features):
            history[cid] = history[cid] + row if cid in history else row.clone()
        features = torch.stack([history[cid] for cid in ctx.client_ids])
    weights = torch.as_tensor(foolsgold_weights(features.double()), dtype=U.dtype)
    update = weighted_mean(U, weights)
    if update is None:
        logger.warning("FoolsGold: every client has weight 0; the global model is unchanged")
        update = torch.zeros_like(U[0])
    return VectorResult(update, (weights > 0).numpy(), client_stats={"foolsgold_weight": weights.tolist()})


@server_rule("fltrust", label="FLTrust", client_columns=["fltrust_trust"],
             root_set={"fltrust_root_size": Field("int", 100, positive, ">= 1")})
def fltrust(U, n_samples, ctx):
    """FLTrust: the server trains on its root set (``ctx.root_update``, flattened like ``U``);
    each client's trust score is ReLU(cosine to the server update), each update is rescaled to
    the server update's norm, and the aggregate is the trust-weighted mean."""
    g0 = ctx.root_update
    norms = U.norm(dim=1).clamp_min(1e-12)
    trust = torch.relu(U @ g0 / (norms * g0.norm().clamp_min(1e-12)))
    update = weighted_mean(U * (g0.norm() / norms)[:, None], trust)
    if update is None:
        logger.warning("FLTrust: no client update points the server's way; the global model is unchanged")
        update = torch.zeros_like(g0)
    return VectorResult(update, (trust > 0).numpy(), client_stats={"fltrust_trust": trust.tolist()})
