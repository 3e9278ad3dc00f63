"""FedAvg, as the reference does it and weighted by sample counts."""

from defenses.registry import Aggregation, server_rule


def apply_update(global_state, combined):
    """G + combined update for floating entries; integer buffers keep the global value."""
    return {k: (v + combined[k].to(v.dtype)) if v.is_floating_point() else v.clone()
            for k, v in global_state.items()}


def weighted_sum(updates, weights):
    return {k: sum(w * u[k].float() for w, u in zip(weights, updates)) for k in updates[0]}


@server_rule("mean", label="no defense", on_matrix=False)
def fedavg(global_state, updates, n_samples, ctx):
    """Reference FedAvg over the whole state_dict: G += lr_para / no_models · Σ updates."""
    coef = ctx.server_lr / ctx.clients_per_round
    state = apply_update(global_state, weighted_sum(updates, [coef] * len(updates)))
    return Aggregation(state, [True] * len(updates))


@server_rule("weighted_mean", label="weighted FedAvg", on_matrix=False)
def weighted_fedavg(global_state, updates, n_samples, ctx):
    """FedAvg weighted by sample counts: G += lr_para · Σ (n_i / Σn) · update_i."""
    total = float(sum(n_samples)) or 1.0
    weights = [ctx.server_lr * n / total for n in n_samples]
    return Aggregation(apply_update(global_state, weighted_sum(updates, weights)), [True] * len(updates))
