"""Attacks: every module of this package registers its attack when imported (see registry.py);
a new attack is a new module here."""

import importlib
import pkgutil

from attacks.registry import (ATTACKS, Attack, attack, attacker_rounds, local_training,  # noqa: F401
                              scale_update)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")
