"""The centralized-trigger attack of the DBA paper: DBA's training, but every attacker stamps the
global trigger (the union of all local triggers) instead of its own part."""

from attacks.dba import SETTINGS, fits_batch, poison_train
from attacks.registry import attack


def global_trigger(slot, n_attackers):
    return -1


attack("centralized", label="centralized trigger", settings=SETTINGS, trigger_index=global_trigger,
       check=fits_batch)(poison_train)
