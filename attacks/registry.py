"""The registry of attacks, and the frame every attack shares.

An attack decides what a scheduled attacker trains (``@attack``). The frame around it is the same
for all: which clients attack (`adversary_list`), in which rounds (`attack_mode`, or explicit
`<k>_poison_epochs` lists), the target label (`poison_label_swap`), the triggers
(`<k>_poison_pattern`) and model replacement (the update times `scale_weights_poison`, unless
`baseline`).
"""

import sys
from dataclasses import dataclass
from typing import Callable, Optional

from settings import ConfigError


@dataclass
class Attack:
    name: str
    label: str
    train: Callable
    settings: dict
    trigger_index: Callable[[int, int], int]
    check: Optional[Callable[[dict], Optional[str]]]
    module: str  # the module that registered it (a plugin's entries serve the configurations naming it)

    def declared(self):
        return self.settings

    def own_settings(self, params):
        """The attack's settings, by name, out of a full configuration."""
        return {key: params[key] for key in self.settings}

    def problem(self, params):
        """Why the configuration cannot run this attack (a message naming the key), or None."""
        return self.check(params) if self.check else None


ATTACKS = {}


def attack(name, label=None, settings=None, trigger_index=None, check=None):
    """Register the training function of an attack under the name the YAML key `attack` selects.

    The function is ``train(model, data, client_id, trigger, generator, training, **settings)``:
    it trains ``model`` (which holds the global model) in place on the client's data and returns
    the client's sample count; ``trigger`` is the boolean H x W mask the attacker stamps,
    ``training`` the federation's `batch_size`, `momentum`, `decay` and the `target` label.
    ``trigger_index(slot, n_attackers)``: which trigger attacker number ``slot`` stamps (its local
    trigger k, or -1 for the global trigger, the union of all local ones). ``check(params)``: a
    message naming the key when the configuration cannot run the attack.
    """
    module = sys._getframe(1).f_globals.get("__name__", "")

    def register(train):
        if name in ATTACKS:
            raise ValueError(f"attack '{name}' is registered twice")
        ATTACKS[name] = Attack(name, label or name, train, dict(settings or {}), trigger_index, check, module)
        return train
    return register


def attacker_rounds(params, start_round):
    """Rounds in which each attacker poisons: explicit `k_poison_epochs` lists win; otherwise a
    continuous attack poisons in every round from ``start_round``; single-shot needs the lists."""
    rounds = []
    for k in range(len(params["adversary_list"])):
        explicit = params.get(f"{k}_poison_epochs")
        if explicit is not None:
            rounds.append(list(explicit))
        elif params["attack_mode"] == "continuous":
            rounds.append(list(range(start_round, params["epochs"] + 1)))
        else:
            raise ConfigError(f"{k}_poison_epochs: required for attacker {k} in single_shot mode")
    return rounds


def local_training(params):
    """What an attack's training takes from the federation's settings."""
    return {"batch_size": params["batch_size"], "momentum": params["momentum"], "decay": params["decay"],
            "target": params["poison_label_swap"]}


def scale_update(update, factor):
    """Model replacement: w = G + factor·(w − G) is the update times ``factor``. Integer buffers
    (BatchNorm's num_batches_tracked) are not scaled."""
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}
