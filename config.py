"""Load, resolve and validate an experiment's YAML configuration.

The configuration is a plain dict (``params``) keyed by the reference code's names. Every key we
use is declared in ``FIELDS`` with its type, default and range; the reference's keys that we do
not use are accepted with one warning; anything else is an error that names the closest valid key.
"""

import copy
import difflib
import logging
import os
import re
from dataclasses import dataclass
from typing import Any, Callable, Optional

import yaml

logger = logging.getLogger(__name__)

# Image shape (channels, height, width) and class count of the datasets we know by name.
DATASET_SHAPES = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar": ((3, 32, 32), 10),
}
DATASET_TYPES = sorted(DATASET_SHAPES) + ["synthetic"]
DEFAULT_MODEL = {"mnist": "MnistNet", "fashion_mnist": "MnistNet", "cifar": "ResNet18"}
MODELS = ["MnistNet", "MnistNetBN", "ResNet18"]
AGGREGATION_METHODS = ["mean", "weighted_mean", "flame", "krum", "multi_krum", "bulyan", "median",
                       "trimmed_mean", "rfa", "foolsgold", "norm_clipping", "weak_dp", "fltrust"]
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


class ConfigError(ValueError):
    """A configuration problem, reported to the user as one line naming the key."""


def _positive(v):
    return v > 0


def _non_negative(v):
    return v >= 0


def _unit_interval(v):
    return 0 <= v <= 1


@dataclass
class Field:
    kind: str  # int, float, bool, str, int_list, pixel_list, shape, dict
    default: Any = None
    check: Optional[Callable[[Any], bool]] = None
    rule: str = ""
    choices: Optional[list] = None
    required: bool = False
    optional: bool = False  # None allowed: derived from other keys when absent


FIELDS = {
    "type": Field("str", required=True, choices=DATASET_TYPES),
    "model": Field("str", optional=True, choices=MODELS),
    "seed": Field("int", 1),
    "data_dir": Field("str", "data"),
    "lr": Field("float", 0.1, _positive, "> 0"),
    "momentum": Field("float", 0.9, lambda v: 0 <= v < 1, "in [0, 1)"),
    "decay": Field("float", 5e-4, _non_negative, ">= 0"),
    "batch_size": Field("int", 64, _positive, ">= 1"),
    "test_batch_size": Field("int", 1000, _positive, ">= 1"),
    "epochs": Field("int", 300, _positive, ">= 1"),
    "internal_epochs": Field("int", 1, _positive, ">= 1"),
    "lr_para": Field("float", 0.1, _positive, "> 0"),
    "no_models": Field("int", 10, _positive, ">= 1"),
    "number_of_total_participants": Field("int", 100, _positive, ">= 1"),
    "sampling_dirichlet": Field("bool", True),
    "dirichlet_alpha": Field("float", 0.5, _positive, "> 0"),
    "aggregation_methods": Field("str", "mean", choices=AGGREGATION_METHODS),
    "flame_lambda": Field("float", 0.001, _non_negative, ">= 0"),
    "flame_whole_state_dict": Field("bool", False),
    "flame_admission": Field("str", "outlier_score", choices=["cluster", "outlier_score"]),
    "flame_outlier_max": Field("float", 0.5, lambda v: 0 <= v < 1, "in [0, 1)"),
    "flame_apply_lr_para": Field("bool", False),
    "robust_f": Field("int", 1, _non_negative, ">= 0"),
    "multi_krum_m": Field("int", optional=True, check=_positive, rule=">= 1"),
    "trim_fraction": Field("float", 0.1, lambda v: 0 <= v < 0.5, "in [0, 0.5)"),
    "rfa_iterations": Field("int", 10, _positive, ">= 1"),
    "rfa_smoothing": Field("float", 1e-6, _positive, "> 0"),
    "clip_norm": Field("float", 1.0, _positive, "> 0"),
    "dp_sigma": Field("float", 0.001, _non_negative, ">= 0"),
    "foolsgold_memory": Field("bool", True),
    "foolsgold_features": Field("str", "classifier", choices=["classifier", "all"]),
    "fltrust_root_size": Field("int", 100, _positive, ">= 1"),
    "is_poison": Field("bool", True),
    "attack_mode": Field("str", "single_shot", choices=ATTACK_MODES),
    "adversary_list": Field("int_list", []),
    "poison_label_swap": Field("int", 2, _non_negative, ">= 0"),
    "trigger_num": Field("int", optional=True, check=_positive, rule=">= 1"),
    "poisoning_per_batch": Field("int", 20, _non_negative, ">= 0"),
    "poison_lr": Field("float", 0.05, _positive, "> 0"),
    "poison_step_lr": Field("bool", True),
    "internal_poison_epochs": Field("int", 10, _positive, ">= 1"),
    "scale_weights_poison": Field("float", 100.0, _positive, "> 0"),
    "baseline": Field("bool", optional=True),
    "confidence_threshold": Field("float", optional=True, check=_unit_interval, rule="in [0, 1]"),
    "invert": Field("bool", False),
    "flip": Field("dict", {}),
    "save_model": Field("bool", True),
    "save_on_epochs": Field("int_list", []),
    "resumed_model": Field("bool", False),
    "resumed_model_name": Field("str", ""),
    "pretrain": Field("bool", True),
    "pretrain_rounds": Field("int", optional=True, check=_positive, rule=">= 1"),
    "progress_seconds": Field("float", 60.0, _positive, "> 0"),
    "synthetic_shape": Field("shape", [1, 28, 28]),
    "synthetic_classes": Field("int", 10, lambda v: v >= 2, ">= 2"),
    "synthetic_train_size": Field("int", 2000, _positive, ">= 1"),
    "synthetic_test_size": Field("int", 500, _positive, ">= 1"),
}


def _coerce(key, value, f):
    """Return ``value`` converted to the field's kind, or raise a ConfigError naming ``key``."""
    kind = f.kind
    if kind == "bool":
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected true or false, got {value!r}")
    if kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: expected an integer, got {value!r}")
    if kind == "float":
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {value!r}") from None
    if kind == "str":
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if kind in ("int_list", "shape"):
        if isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            if kind == "shape" and (len(value) != 3 or min(value) < 1):
                raise ConfigError(f"{key}: expected [channels, height, width], got {value!r}")
            return list(value)
        raise ConfigError(f"{key}: expected a list of integers, got {value!r}")
    if kind == "pixel_list":
        ok = isinstance(value, list) and all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(c, int) for c in p) for p in value
        )
        if ok and value:
            return [list(p) for p in value]
        raise ConfigError(f"{key}: expected a non-empty list of [row, col] pairs, got {value!r}")
    if kind == "dict":
        if isinstance(value, dict):
            return dict(value)
        raise ConfigError(f"{key}: expected a mapping, got {value!r}")
    raise AssertionError(kind)


def _check_field(key, value, f):
    if value is None and f.optional:
        return None
    value = _coerce(key, value, f)
    if f.choices is not None and value not in f.choices:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, f.choices))}")
    if f.check is not None and not f.check(value):
        raise ConfigError(f"{key}: must be {f.rule}, got {value!r}")
    return value


# The `flip` group of the YAML: name -> field. Defaults are the reference's Fashion-MNIST values;
# utils/<dataset>.yaml sets each dataset's own.
FLIP_FIELDS = {
    "batched": Field("bool", True),
    "local_passes": Field("int", 5, lambda v: v >= 1, ">= 1"),
    "batch_size": Field("int", 128, lambda v: v >= 1, ">= 1"),
    "max_batch_steps": Field("int", 110, lambda v: v >= 1, ">= 1"),
    "harden_lr": Field("float", 0.01, lambda v: v > 0, "> 0"),
    "portion": Field("float", 0.6, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "size_min": Field("int", 1, lambda v: v >= 1, ">= 1"),
    "warmup_steps": Field("int", 600, lambda v: v >= 1, ">= 1"),
    "pair_steps": Field("int", 400, lambda v: v >= 1, ">= 1"),
    "refine_steps": Field("int", 100, lambda v: v >= 1, ">= 1"),
    "retry_steps": Field("int", 400, lambda v: v >= 1, ">= 1"),
    "single_refine_steps": Field("int", 400, lambda v: v >= 1, ">= 1"),
    "single_refine_cost": Field("float", 1e-3, lambda v: v >= 0, ">= 0"),
    "single_retry_steps": Field("int", 400, lambda v: v >= 1, ">= 1"),
    "pair_batches": Field("int", 2, lambda v: v >= 1, ">= 1"),
    "explore_prob": Field("float", 0.3, lambda v: 0 <= v <= 1, "in [0, 1]"),
    "success_threshold": Field("float", 0.9, lambda v: 0 < v <= 1, "in (0, 1]"),
    "init_cost": Field("float", 1e-3, lambda v: v >= 0, ">= 0"),
    "refine_cost": Field("float", 1e-2, lambda v: v >= 0, ">= 0"),
    "cost_patience": Field("int", 10, lambda v: v >= 1, ">= 1"),
    "cost_up": Field("float", 1.5, lambda v: v >= 1, ">= 1"),
    "cost_down": Field("float", 1.5 ** 1.5, lambda v: v >= 1, ">= 1"),
    "inversion_lr": Field("float", 0.1, lambda v: v > 0, "> 0"),
    "max_trigger_frac": Field("float", 0.125, lambda v: 0 < v <= 1, "in (0, 1]"),
    "init_mask_region": Field("int_list", [], lambda v: len(v) in (0, 4), "[] or [row0, row1, col0, col1]"),
    # Opt-in adaptive budget (off: every inversion runs the reference's step counts).
    "adaptive_budget": Field("bool", False),
    # Its knobs' defaults are the ones the equivalence study measured (docs/performance.md).
    "adaptive_patience": Field("int", 30, lambda v: v >= 1, ">= 1"),
    "adaptive_min_gain": Field("float", 0.05, lambda v: 0 <= v < 1, "in [0, 1)"),
    "adaptive_give_up": Field("int", 200, lambda v: v >= 1, ">= 1", optional=True),
    "adaptive_check_every": Field("int", 10, lambda v: v >= 1, ">= 1"),
    "max_pair_images": Field("int", 32, lambda v: v >= 2, ">= 2", optional=True),
}


def resolve_flip_params(group, dataset_type):
    """Validate the `flip` group; missing keys take the defaults of ``FLIP_FIELDS``."""
    out = {}
    for key, value in (group or {}).items():
        if key not in FLIP_FIELDS:
            close = difflib.get_close_matches(key, FLIP_FIELDS, n=1, cutoff=0.5)
            raise ConfigError(f"unknown key 'flip.{key}'" + (f"; did you mean 'flip.{close[0]}'?" if close else ""))
        out[key] = _check_field(f"flip.{key}", value, FLIP_FIELDS[key])
    missing = [k for k in FLIP_FIELDS if k not in out]
    if missing and group:
        logger.info("flip: defaults used for %s", ", ".join(missing))
    elif missing:
        logger.warning("invert is on but the YAML has no `flip` group: using the default FLIP "
                       "constants (the reference's Fashion-MNIST values) for %s", dataset_type)
    for key in missing:
        out[key] = copy.copy(FLIP_FIELDS[key].default)
    return out


def _unknown_key_error(key, valid):
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return ConfigError(f"unknown key '{key}'{hint} (valid keys: see config.FIELDS or README)")


def image_shape(params):
    """(channels, height, width) and class count of the configured dataset."""
    if params["type"] == "synthetic":
        return tuple(params["synthetic_shape"]), params["synthetic_classes"]
    return DATASET_SHAPES[params["type"]]


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


def _validate_defense(params):
    """Robust rules that assume f attackers among the n clients of a round need enough clients."""
    rule, n, f = params["aggregation_methods"], params["no_models"], params["robust_f"]
    needed = {"krum": 2 * f + 3, "multi_krum": 2 * f + 3, "bulyan": 4 * f + 3}.get(rule)
    if needed and n < needed:
        raise ConfigError(f"robust_f: {rule} with f={f} assumed attackers needs at least {needed} "
                          f"clients per round (no_models={n})")
    if rule == "multi_krum" and params["multi_krum_m"] and params["multi_krum_m"] > n:
        raise ConfigError(f"multi_krum_m: {params['multi_krum_m']} exceeds no_models={n}")


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
    if params["poisoning_per_batch"] > params["batch_size"]:
        raise ConfigError("poisoning_per_batch: exceeds batch_size")
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
    params, unused = {}, []
    for key, value in raw.items():
        key = str(key)
        if key in FIELDS:
            params[key] = None if value is None and FIELDS[key].optional else _check_field(key, value, FIELDS[key])
        elif PATTERN_KEY.match(key):
            params[key] = _coerce(key, value, Field("pixel_list"))
        elif EPOCHS_KEY.match(key):
            if value is not None:  # null: no explicit list, the attack mode decides
                params[key] = _coerce(key, value, Field("int_list"))
        elif key in REFERENCE_UNUSED_KEYS:
            unused.append(key)
        else:
            raise _unknown_key_error(key, list(FIELDS) + ["<k>_poison_pattern", "<k>_poison_epochs"])
    if unused:
        logger.warning("ignoring keys of the reference code that this implementation does not use: %s",
                       ", ".join(sorted(unused)))
    for key, f in FIELDS.items():
        if key not in params:
            if f.required:
                raise ConfigError(f"{key}: missing (one of {', '.join(f.choices)})")
            params[key] = f.default if not isinstance(f.default, (list, dict)) else type(f.default)(f.default)
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
    _validate_defense(params)
    if params["resumed_model"] and not os.path.isfile(params["resumed_model_name"]):
        if not params["pretrain"]:
            raise ConfigError(
                f"resumed_model_name: checkpoint '{params['resumed_model_name']}' not found (pretrain is "
                "off: drop --no-pretrain to train it first, or set resumed_model: false)")
        pretrain_rounds(params)
    if params["invert"]:
        params["flip"] = resolve_flip_params(params["flip"], params["type"])
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
            if not isinstance(raw.get(group, {}), dict) or FIELDS.get(group, Field("")).kind != "dict":
                raise ConfigError(f"--set {key}: '{group}' is not a group of keys")
            raw[group] = {**(raw.get(group) or {}), sub: value}
        else:
            raw[key] = value
    return raw


def load_config(path, overrides=()):
    """Read a YAML file, apply ``key=value`` overrides and return resolved params."""
    return resolve(apply_overrides(load_raw(path), overrides))
