"""The server's aggregation step, for whichever rule `aggregation_methods` selects.

Rules live in defenses/ and register themselves (defenses/registry.py). This module drops
non-finite updates, calls the rule with its own settings, turns a matrix rule's aggregate into the
next global model (the same server step for every such rule), and records what the rule reports.
"""

import logging
from dataclasses import dataclass, field

import torch

from defenses import SERVER_RULES, Aggregation, RuleContext, flatten
from defenses.fedavg import apply_update

logger = logging.getLogger(__name__)


@dataclass
class RoundContext:
    """What the round loop hands the server: the configuration, the names of the model's
    trainable parameters (in a fixed order), a seeded generator on the model's device, the clients'
    ids, the server's state kept across rounds (saved in the resume checkpoint) and the server's
    update on its root set, when the rule asked for one."""
    params: dict
    trainable: list
    generator: torch.Generator
    client_ids: list = None
    server_state: dict = field(default_factory=dict)
    root_update: object = None


def rule_context(ctx, client_ids):
    return RuleContext(ctx.trainable, ctx.generator, client_ids, ctx.server_state, ctx.params["lr_para"],
                       ctx.params["no_models"], root_update=ctx.root_update)


def server_step(global_state, updates, result, rule_ctx):
    """The new global model from a matrix rule's result: trainable parameters G + lr_para ·
    aggregate (+ the rule's noise); floating buffers (BatchNorm statistics) G + lr_para · the mean
    of the admitted clients' buffer updates; integer buffers keep the global value."""
    step = rule_ctx.server_lr
    chosen = [i for i in range(len(updates)) if result.admitted[i]]
    pieces = dict(zip(rule_ctx.trainable, result.update.split([size for _, size in rule_ctx.layout])))
    combined = {}
    for k, v in global_state.items():
        if k in pieces:
            combined[k] = step * pieces[k].view(v.shape)
            if result.model_noise:
                combined[k] = combined[k] + result.model_noise * torch.randn(
                    v.shape, generator=rule_ctx.generator, device=v.device, dtype=combined[k].dtype)
        elif v.is_floating_point() and chosen:
            combined[k] = step * sum(updates[i][k].float() for i in chosen) / len(chosen)
        else:
            combined[k] = torch.zeros_like(v)
    return Aggregation(apply_update(global_state, combined), result.admitted.tolist(), result.stats,
                       result.client_stats)


def check_declared(rule, result):
    """A rule's numbers must be the columns it declared: anything else would never be recorded."""
    for kind, names, declared in (("stats", result.stats, rule.metric_columns),
                                  ("client_stats", result.client_stats, rule.client_columns)):
        undeclared = sorted(set(names) - set(declared))
        if undeclared:
            column = "metric_columns" if kind == "stats" else "client_columns"
            raise ValueError(f"rule '{rule.name}' returned {kind} {', '.join(undeclared)} that its "
                             f"registration does not declare in {column}")
    return result


def apply_rule(name, global_state, updates, n_samples, ctx):
    """Rule ``name`` on these updates (all finite), with its settings from ``ctx.params``."""
    rule = SERVER_RULES[name]
    settings = rule.own_settings(ctx.params)
    rule_ctx = rule_context(ctx, ctx.client_ids or list(range(len(updates))))
    if not rule.on_matrix:
        return check_declared(rule, rule.function(global_state, updates, n_samples, rule_ctx, **settings))
    rule_ctx.layout = [(k, global_state[k].numel()) for k in ctx.trainable]
    if ctx.root_update is not None:
        rule_ctx.root_update = flatten(ctx.root_update, ctx.trainable)
    U = torch.stack([flatten(u, ctx.trainable) for u in updates])
    result = check_declared(rule, rule.function(U, n_samples, rule_ctx, **settings))
    return server_step(global_state, updates, result, rule_ctx)


def is_finite_update(update):
    """True when every floating entry of a client update is finite."""
    return all(bool(torch.isfinite(v).all()) for v in update.values() if v.is_floating_point())


def aggregate(global_state, updates, n_samples, ctx):
    """Apply the configured rule to the clients whose updates are finite. A client sending NaN or
    Inf is rejected (its ``admitted`` flag is False) and named in a warning; if no client is left,
    or the rule's result is not finite, the global model stays as it was. The rule's per-client
    numbers come back one per client of the round (NaN for the rejected ones)."""
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
    kept_ctx = RoundContext(ctx.params, ctx.trainable, ctx.generator, [ids[i] for i in kept], ctx.server_state,
                            ctx.root_update)
    result = apply_rule(ctx.params["aggregation_methods"], global_state, [updates[i] for i in kept],
                        [n_samples[i] for i in kept], kept_ctx)
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
