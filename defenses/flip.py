"""FLIP's benign clients (docs/algorithms.md §4) as a client defense: `invert: true` turns it on,
the YAML group `flip` holds its settings; the work itself is in invert.py, flip_client.py and
inversion.py."""

import logging

import invert
from defenses.registry import ClientDefense, client_defense
from settings import Field, resolve_group

logger = logging.getLogger(__name__)

# Defaults are the reference's Fashion-MNIST values; utils/<dataset>.yaml sets each dataset's own.
SETTINGS = {
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

METRIC_COLUMNS = ("flip_inversions", "flip_mask_l1", "flip_success", "flip_hardened", "flip_stamped_to_target",
                  "flip_oversize_skips")


def resolve_settings(group, dataset_type):
    """The `flip` group validated, with the defaults of ``SETTINGS`` for the keys it lacks."""
    out, missing = resolve_group("flip", SETTINGS, group)
    if missing and group:
        logger.info("flip: defaults used for %s", ", ".join(missing))
    elif missing:
        logger.warning("invert is on but the YAML has no `flip` group: using the default FLIP "
                       "constants (the reference's Fashion-MNIST values) for %s", dataset_type)
    return out


def summarize(stats, params, round_no):
    """The round's FLIP numbers for metrics.csv, and two log lines: totals, and inversions by kind."""
    row = invert.summarize_round(stats, params["poison_label_swap"])
    logger.info("round %d FLIP: %d inversions, mean mask L1 %.2f, mean stamped success %.3f, "
                "%d hardening steps (%d stamping a trigger toward label %d), %d skipped by the size cap",
                round_no, row["flip_inversions"], row["flip_mask_l1"], row["flip_success"],
                row["flip_hardened"], row["flip_stamped_to_target"], params["poison_label_swap"],
                row["flip_oversize_skips"])
    logger.info("round %d FLIP inversions by kind: %s", round_no, "; ".join(
        f"{kind} {p['count']}x {p['images']:.0f} images, {p['steps_run']:.0f}/{p['steps_asked']:.0f} steps, "
        f"last gain at step {p['last_improvement']:.0f}" for kind, p in invert.profile_round(stats).items()))
    return row


FLIP = client_defense(ClientDefense(name="flip", label="FLIP", switch="invert", group="flip", settings=SETTINGS,
                                    resolve=resolve_settings, train_round=invert.flip_round, summarize=summarize,
                                    metric_columns=METRIC_COLUMNS))
