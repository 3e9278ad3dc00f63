"""Defenses: every module of this package registers its rules when imported (see registry.py);
a new defense is a new module here."""

import importlib
import pkgutil

from defenses.registry import (CLIENT_DEFENSES, SERVER_RULES, Aggregation, ClientDefense,  # noqa: F401
                               RuleContext, VectorResult, active_client_defense, client_defense, flatten,
                               server_rule)

for _module in pkgutil.iter_modules(__path__):
    if _module.name != "registry":
        importlib.import_module(f"{__name__}.{_module.name}")
