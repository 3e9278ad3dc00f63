"""The registries of defenses, and what a defense receives and returns.

Server rules decide how the server turns the clients' updates into the next global model
(``@server_rule``); client defenses replace a benign client's plain local training
(``client_defense``). Each entry declares its YAML settings with their defaults and checks, what it
needs of the federation, and the columns it adds to metrics.csv and clients.csv; config.py builds
the YAML's choices and checks from these entries, and the round loop calls them without knowing
which one runs.
"""

import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np
import torch

from settings import Field


def flatten(state, names):
    """One float64 vector of the entries ``names`` of a state dict, in that order."""
    return torch.cat([state[k].reshape(-1).to(torch.float64) for k in names])


@dataclass
class Aggregation:
    """A state-dict rule's answer: the new global state_dict, which clients it admitted, per-round
    numbers (its ``metric_columns``) and per-client ones (its ``client_columns``)."""
    state: dict
    admitted: list
    stats: dict = field(default_factory=dict)
    client_stats: dict = field(default_factory=dict)


@dataclass
class VectorResult:
    """A matrix rule's answer: the aggregate update of the trainable parameters, which clients
    entered it, its statistics, and the std of Gaussian noise to add to the new global trainable
    parameters."""
    update: torch.Tensor
    admitted: np.ndarray
    stats: dict = field(default_factory=dict)
    client_stats: dict = field(default_factory=dict)
    model_noise: float = 0.0


@dataclass
class RuleContext:
    """What a rule may need besides its settings and the updates: the names of the model's
    trainable parameters (in a fixed order) and, for matrix rules, their sizes; a seeded generator
    on the model's device; this round's client ids (those with finite updates); state the server
    keeps across rounds (saved in the resume checkpoint); the server step `lr_para` and
    `no_models`; the server's own update on its root set, for rules that ask for one."""
    trainable: list
    generator: Optional[torch.Generator]
    client_ids: list
    server_state: dict
    server_lr: float
    clients_per_round: int
    layout: list = None
    root_update: object = None


@dataclass
class ServerRule:
    name: str
    function: Callable
    label: str
    settings: dict
    on_matrix: bool
    check: Optional[Callable[[dict, int], Optional[str]]]
    metric_columns: tuple
    client_columns: tuple
    root_set: Optional[dict]
    module: str  # the module that registered it (a plugin's entries serve the configurations naming it)

    def declared(self):
        """Every YAML key the rule declares: its settings and its root-set size."""
        return {**self.settings, **(self.root_set or {})}

    def own_settings(self, params):
        """The rule's settings, by name, out of a full configuration."""
        return {key: params[key] for key in self.settings}

    def problem(self, params):
        """Why the configuration cannot run this rule (a message naming the key), or None."""
        return self.check(self.own_settings(params), params["no_models"]) if self.check else None

    def root_set_size(self, params):
        """How many training images the server holds out as its root set (0: none)."""
        return params[next(iter(self.root_set))] if self.root_set else 0


@dataclass
class ClientDefense:
    name: str
    label: str
    switch: str  # the YAML bool that turns it on
    group: str  # the YAML group of its settings
    settings: dict
    resolve: Callable[[dict, str], dict]  # (the YAML group, dataset type) -> checked settings with defaults
    train_round: Callable
    summarize: Callable
    metric_columns: tuple
    module: str = ""  # the module that registered it (a plugin's entries serve the configurations naming it)

    def declared(self):
        """Its YAML keys: the switch and the group."""
        return {self.switch: Field("bool", False), self.group: Field("dict", {})}


SERVER_RULES = {}
CLIENT_DEFENSES = {}


def server_rule(name, label=None, settings=None, on_matrix=True, check=None, metric_columns=(),
                client_columns=(), root_set=None):
    """Register an aggregation rule under the name `aggregation_methods` selects.

    ``on_matrix``: the function is ``f(U, n_samples, ctx, **settings) -> VectorResult`` with
    ``U`` the clients' trainable-parameter updates as an (n, d) float64 matrix, and the server
    applies the same step to every such rule (defense.py); otherwise it is
    ``f(global_state, updates, n_samples, ctx, **settings) -> Aggregation`` over state dicts.
    ``settings``: YAML key -> settings.Field, passed to the function as keyword arguments.
    ``check(settings, clients_per_round)``: a message naming the key when the federation cannot
    run the rule. ``metric_columns`` / ``client_columns``: the keys of the result's ``stats`` /
    ``client_stats``, recorded in metrics.csv / clients.csv. ``root_set``: for rules that need the
    server's own update on a root data set held out of the clients' data (``ctx.root_update``),
    the one setting that sizes it, ``{key: Field}`` (not passed to the function).
    """
    module = sys._getframe(1).f_globals.get("__name__", "")

    def register(function):
        if name in SERVER_RULES:
            raise ValueError(f"aggregation rule '{name}' is registered twice")
        SERVER_RULES[name] = ServerRule(name, function, label or name, dict(settings or {}), on_matrix, check,
                                        tuple(metric_columns), tuple(client_columns), root_set, module)
        return function
    return register


def client_defense(entry):
    """Register a client defense (a ``ClientDefense``)."""
    if entry.name in CLIENT_DEFENSES:
        raise ValueError(f"client defense '{entry.name}' is registered twice")
    entry.module = sys._getframe(1).f_globals.get("__name__", "")
    CLIENT_DEFENSES[entry.name] = entry
    return entry


def active_client_defense(params):
    """The client defense the configuration turns on, or None for plain local training."""
    on = [d for d in CLIENT_DEFENSES.values() if params.get(d.switch)]
    return on[0] if on else None
