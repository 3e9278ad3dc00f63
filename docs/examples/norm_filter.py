"""A server rule in one file: reject every update whose norm exceeds `norm_filter_factor` times
the round's median norm, and average the rest.

Use it from anywhere with `plugins: [docs/examples/norm_filter.py]` and
`aggregation_methods: norm_filter` in the YAML, or copy it into defenses/ (then no `plugins` key
is needed).
"""

from defenses import VectorResult, server_rule
from settings import Field


def at_least_two_clients(settings, clients_per_round):
    if clients_per_round < 2:
        return f"no_models: norm_filter needs at least 2 clients per round to take a median (no_models={clients_per_round})"
    return None


@server_rule("norm_filter", label="norm filter",
             settings={"norm_filter_factor": Field("float", 3.0, lambda v: v >= 1, ">= 1")},
             check=at_least_two_clients, metric_columns=["norm_filter_bound"], client_columns=["norm_filter_ratio"])
def norm_filter(U, n_samples, ctx, norm_filter_factor):
    """``U``: one row per client, its update of the trainable parameters (float64). The median
    of an even count is the lower middle value (torch.median)."""
    norms = U.norm(dim=1)
    median = norms.median()
    bound = norm_filter_factor * median
    admitted = (norms <= bound).numpy()
    update = U[admitted].mean(0)
    return VectorResult(update, admitted, stats={"norm_filter_bound": float(bound)},
                        client_stats={"norm_filter_ratio": (norms / median).tolist()})
