"""Load, resolve and validate an experiment's YAML configuration.

The configuration is a plain dict (``params``) keyed by the reference code's names. Every key we
use is declared with its type, default and range: the federation's in ``FIELDS``, each defense's
and attack's in its own file (``all_fields`` gathers them from the registries). The reference's
keys that we do not use are accepted with one warning; anything else is an error that names the
closest valid key.
"""

import importlib.util
import logging
import os
import re
import sys

import yaml

import attacks
import defenses
from image_helper import DATASET_SHAPES, image_shape
from settings import (ConfigError, Field, check_value, coerce, merge_declarations, non_negative, positive,
                      unit_interval, unknown_key)

logger = logging.getLogger(__name__)

DATASET_TYPES = sorted(DATASET_SHAPES) + ["synthetic"]
DEFAULT_MODEL = {"mnist": "MnistNet", "fashion_mnist": "MnistNet", "cifar": "ResNet18"}
MODELS = ["MnistNet", "MnistNetBN", "ResNet18"]
ATTACK_MODES = ["single_shot", "continuous"]
# Confidence threshold each attack mode implies when the YAML does not set one (docs/algorithms.md §2).
MODE_THRESHOLD = {"single_shot": 0.0, "continuous": 0.4}

# Keys of the reference's YAML files that this implementation does not use.
REFERENCE_UNUSED_KEYS = {
    "aggr_epoch_interval", "geom_median_maxiter", "fg_use_memory", "participants_namelist",
    "is_random_namelist", "is_random_adversary", "centralized_test_trigger", "save_each_model",
    "log_interval", "poison_momentum", "poison_decay", "results_json", "alpha_loss",
    "diff_privacy", "sigma", "poison_epochs",
}

PATTERN_KEY = re.compile(r"^(\d+)_poison_pattern$")
EPOCHS_KEY = re.compile(r"^(\d+)_poison_epochs$")

# The federation's own keys; the defenses' and attacks' keys are added from their registries below.
FIELDS = {
    "type": Field("str", required=True, choices=DATASET_TYPES),
    "model": Field("str", optional=True, choices=MODELS),
    "seed": Field("int", 1),
    "data_dir": Field("str", "data"),
    "lr": Field("float", 0.1, positive, "> 0"),
    "momentum": Field("float", 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay": Field("float", 5e-4, non_negative, ">= 0"),
    "batch_size": Field("int", 64, positive, ">= 1"),
    "test_batch_size": Field("int", 1000, positive, ">= 1"),
    "epochs": Field("int", 300, positive, ">= 1"),
    "internal_epochs": Field("int", 1, positive, ">= 1"),
    "lr_para": Field("float", 0.1, positive, "> 0"),
    "no_models": Field("int", 10, positive, ">= 1"),
    "number_of_total_participants": Field("int", 100, positive, ">= 1"),
    "sampling_dirichlet": Field("bool", True),
    "dirichlet_alpha": Field("float", 0.5, positive, "> 0"),
    "aggregation_methods": Field("str", "mean"),  # choices: the registered rules (all_fields)
    "is_poison": Field("bool", True),
    "attack": Field("str", "dba"),  # choices: the registered attacks (all_fields)
    "attack_mode": Field("str", "single_shot", choices=ATTACK_MODES),
    "adversary_list": Field("int_list", []),
    "poison_label_swap": Field("int", 2, non_negative, ">= 0"),
    "trigger_num": Field("int", optional=True, check=positive, rule=">= 1"),
    "scale_weights_poison": Field("float", 100.0, positive, "> 0"),
    "baseline": Field("bool", optional=True),
    "confidence_threshold": Field("float", optional=True, check=unit_interval, rule="in [0, 1]"),
    "save_model": Field("bool", True),
    "save_on_epochs": Field("int_list", []),
    "resumed_model": Field("bool", False),
    "resumed_model_name": Field("str", ""),
    "pretrain": Field("bool", True),
    "pretrain_rounds": Field("int", optional=True, check=positive, rule=">= 1"),
    "pretrain_lr_para": Field("float", optional=True, check=positive, rule="> 0"),  # default: lr_para
    "progress_seconds": Field("float", 60.0, positive, "> 0"),
    "synthetic_shape": Field("shape", [1, 28, 28]),
    "synthetic_classes": Field("int", 10, lambda v: v >= 2, ">= 2"),
    "synthetic_train_size": Field("int", 2000, positive, ">= 1"),
    "synthetic_test_size": Field("int", 500, positive, ">= 1"),
    "plugins": Field("str_list", []),
}


PLUGIN_PREFIX = "plugin_"


def plugin_module_name(path):
    return PLUGIN_PREFIX + re.sub(r"\W", "_", os.path.abspath(path))


def available(registry, plugins=()):
    """The entries of a registry that a configuration may use: those of this repository and those
    registered by the plugin files it names (a plugin loaded for another configuration of the same
    process stays out of this one)."""
    modules = {plugin_module_name(p) for p in plugins}
    return {name: entry for name, entry in registry.items()
            if not entry.module.startswith(PLUGIN_PREFIX) or entry.module in modules}


def all_fields(plugins=()):
    """Every key a configuration may set: the federation's (``FIELDS``) and those its available
    defenses and attacks declare, with their names as the choices of `aggregation_methods` and
    `attack`."""
    rules, attack_entries = available(defenses.SERVER_RULES, plugins), available(attacks.ATTACKS, plugins)
    fields = dict(FIELDS)
    fields["aggregation_methods"] = Field("str", "mean", choices=sorted(rules))
    fields["attack"] = Field("str", "dba", choices=sorted(attack_entries))
    entries = [*rules.values(), *attack_entries.values(), *available(defenses.CLIENT_DEFENSES, plugins).values()]
    for entry in entries:
        try:
            merge_declarations(entry.name, entry.declared(), fields)
        except ValueError as e:
            raise ConfigError(f"{e} (registered in {entry.module})") from None
    return fields


def load_plugins(paths):
    """Import the Python files listed in `plugins` (defenses or attacks kept outside this
    repository), so that their registrations happen; each file is imported once per process."""
    for path in paths:
        if not os.path.isfile(path):
            raise ConfigError(f"plugins: file '{path}' not found")
        name = plugin_module_name(path)
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            del sys.modules[name]
            raise ConfigError(f"plugins: '{path}' failed to load: {type(e).__name__}: {e}") from None


def _unknown_key_error(key, valid):
    error = unknown_key(key, valid)
    return ConfigError(f"{error} (valid keys: README, 'Options and YAML switches')")


def drop_spelled_out_schedule(raw):
    """A continuous attack's `k_poison_epochs` lists that spell out every round from their first
    to `epochs` (as the params.yaml of runs made before the schedule was left derived) are removed,
    so that a resumed run given a later `epochs` poisons to its new end, as a run made to that end
    in one go does. Returns the names of the keys removed."""
    if raw.get("attack_mode") != "continuous" or not isinstance(raw.get("epochs"), int):
        return []
    keys = [k for k in raw if EPOCHS_KEY.match(str(k)) and isinstance(raw[k], list) and raw[k]]
    spelled = [k for k in keys if raw[k] == list(range(raw[k][0], raw["epochs"] + 1))]
    if not spelled or len(spelled) != len(keys) or len({raw[k][0] for k in spelled}) != 1:
        return []
    for k in spelled:
        del raw[k]
    return spelled


def _validate_defense(params, client_defenses):
    """The selected rule's own checks (e.g. Krum's n ≥ 2f + 3), and at most one client defense."""
    problem = defenses.SERVER_RULES[params["aggregation_methods"]].problem(params)
    if problem:
        raise ConfigError(problem)
    on = [d.switch for d in client_defenses.values() if params[d.switch]]
    if len(on) > 1:
        raise ConfigError(f"{on[1]}: only one client defense can run at a time ({', '.join(on)} are on)")


def _validate_attack(params):
    shape, classes = image_shape(params)
    _, height, width = shape
    n_total = params["number_of_total_participants"]
    if params["no_models"] > n_total:
        raise ConfigError(
            f"no_models: {params['no_models']} clients per round exceeds "
            f"number_of_total_participants={n_total}"
        )
    for cid in params["adversary_list"]:
        if not 0 <= cid < n_total:
            raise ConfigError(f"adversary_list: id {cid} is outside [0, {n_total - 1}]")
    if len(set(params["adversary_list"])) != len(params["adversary_list"]):
        raise ConfigError("adversary_list: ids must be distinct")
    if params["poison_label_swap"] >= classes:
        raise ConfigError(f"poison_label_swap: {params['poison_label_swap']} is not a class (0..{classes - 1})")
    problem = attacks.ATTACKS[params["attack"]].problem(params)
    if problem:
        raise ConfigError(problem)
    n_patterns = len([k for k in params if PATTERN_KEY.match(k)])
    if params["trigger_num"] is None:
        params["trigger_num"] = n_patterns
    for k in range(params["trigger_num"]):
        key = f"{k}_poison_pattern"
        if key not in params:
            raise ConfigError(f"{key}: missing (trigger_num={params['trigger_num']})")
        for row, col in params[key]:
            if not (0 <= row < height and 0 <= col < width):
                raise ConfigError(f"{key}: pixel [{row}, {col}] is outside the {height}x{width} image")
    if params["is_poison"]:
        n_adv = len(params["adversary_list"])
        if n_adv == 0:
            raise ConfigError("adversary_list: is_poison is true but no attacker is listed")
        if n_adv > 1 and params["trigger_num"] < n_adv:
            raise ConfigError(f"trigger_num: {params['trigger_num']} local triggers for {n_adv} attackers")
        if params["trigger_num"] == 0:
            raise ConfigError("0_poison_pattern: is_poison is true but no trigger pattern is given")


def resolve(raw):
    """Validate a raw YAML mapping and return the resolved params dict (defaults filled in)."""
    if not isinstance(raw, dict):
        raise ConfigError("the YAML file must be a mapping of keys to values")
    plugins = check_value("plugins", raw.get("plugins") or [], FIELDS["plugins"])
    load_plugins(plugins)
    fields = all_fields(plugins)
    params, unused = {}, []
    for key, value in raw.items():
        key = str(key)
        if key in fields:
            params[key] = None if value is None and fields[key].optional else check_value(key, value, fields[key])
        elif PATTERN_KEY.match(key):
            params[key] = coerce(key, value, Field("pixel_list"))
        elif EPOCHS_KEY.match(key):
            if value is not None:  # null: no explicit list, the attack mode decides
                params[key] = coerce(key, value, Field("int_list"))
        elif key in REFERENCE_UNUSED_KEYS:
            unused.append(key)
        else:
            raise _unknown_key_error(key, list(fields) + ["<k>_poison_pattern", "<k>_poison_epochs"])
    if unused:
        logger.warning("ignoring keys of the reference code that this implementation does not use: %s",
                       ", ".join(sorted(unused)))
    for key, f in fields.items():
        if key not in params:
            if f.required:
                raise ConfigError(f"{key}: missing (one of {', '.join(f.choices)})")
            params[key] = f.default_value()
    if params["model"] is None:
        params["model"] = DEFAULT_MODEL.get(params["type"], "MnistNet")
    if params["baseline"] is None:
        params["baseline"] = params["attack_mode"] == "continuous"
    if params["confidence_threshold"] is None:
        params["confidence_threshold"] = MODE_THRESHOLD[params["attack_mode"]]
    for key in params:
        m = EPOCHS_KEY.match(key)
        if m and int(m.group(1)) >= max(len(params["adversary_list"]), 1):
            raise ConfigError(f"{key}: there is no attacker {m.group(1)} in adversary_list")
    _validate_attack(params)
    _validate_defense(params, available(defenses.CLIENT_DEFENSES, plugins))
    if params["resumed_model"] and not os.path.isfile(params["resumed_model_name"]):
        if not params["pretrain"]:
            raise ConfigError(
                f"resumed_model_name: checkpoint '{params['resumed_model_name']}' not found (pretrain is "
                "off: drop --no-pretrain to train it first, or set resumed_model: false)")
        pretrain_rounds(params)
    for entry in available(defenses.CLIENT_DEFENSES, plugins).values():
        if params[entry.switch]:
            params[entry.group] = entry.resolve(params[entry.group], params["type"])
    return params


def pretrain_rounds(params):
    """How many clean rounds make the missing start model: `pretrain_rounds`, else the `epoch_N`
    suffix of `resumed_model_name` (the reference's file names)."""
    if params["pretrain_rounds"] is not None:
        return params["pretrain_rounds"]
    match = re.search(r"epoch_(\d+)$", params["resumed_model_name"])
    if not match or int(match.group(1)) < 1:
        raise ConfigError(f"pretrain_rounds: needed to make '{params['resumed_model_name']}', whose name "
                          "does not end in epoch_<rounds>")
    return int(match.group(1))


def parse_override(text):
    """Parse one ``--set key=value`` (value as YAML) into (key, value)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value is not valid YAML ({e.problem})") from None


def load_raw(path):
    if not os.path.isfile(path):
        stem, ext = os.path.splitext(path)
        other = stem + {".yml": ".yaml", ".yaml": ".yml"}.get(ext, ext)
        hint = f"; did you mean '{other}'?" if other != path and os.path.isfile(other) else ""
        raise ConfigError(f"--params: file '{path}' not found{hint}")
    with open(path) as f:
        try:
            return yaml.safe_load(f) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML ({e})") from None


def apply_overrides(raw, overrides):
    """Apply ``key=value`` overrides to a raw YAML mapping; ``group.key=value`` sets one key of a
    group (``flip.batched=false``)."""
    for text in overrides:
        key, value = parse_override(text)
        group, dot, sub = key.partition(".")
        if dot:
            if not isinstance(raw.get(group, {}), dict) or all_fields().get(group, Field("")).kind != "dict":
                raise ConfigError(f"--set {key}: '{group}' is not a group of keys")
            raw[group] = {**(raw.get(group) or {}), sub: value}
        else:
            raw[key] = value
    return raw


def load_config(path, overrides=()):
    """Read a YAML file, apply ``key=value`` overrides and return resolved params."""
    return resolve(apply_overrides(load_raw(path), overrides))
