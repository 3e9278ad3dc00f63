"""The answer over the authors' horizon: every defense of a horizon grid, round by round to its end.

    python experiments/horizon.py experiments/grids/fmnist_horizon.yaml

Reads the cells of the grid (experiments/sweep.py runs them; cells still running count with the
rounds they have reached) and writes into the sweep's folder:
- horizon.md: per attack and defense, the clean BA, the recovery round, the mean BA over the rounds
  after the last single-shot attack, the last round's MA and its cost against no defense; then,
  per attack, FLIP against no defense round by round (MA, BA thresholded and raw, the local
  triggers' BA, hardening steps toward the target, the attackers' share of the update norms);
- horizon_<attack>.png: BA and MA per round of every defense.

Clean level: BA at the first round of the single-shot run of the same defense (no attacker in it).
Recovery round: the first round after the last attack (single-shot) or after the first round
(continuous, whose attackers never stop) from which BA stays at most ``TOLERANCE`` points above the
clean level through the last round reached.
"""

import argparse
import csv
import os
import re
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import yaml  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import sweep  # noqa: E402

TOLERANCE = 2.0
DATASET_NAMES = {"mnist": "MNIST", "fashion_mnist": "Fashion-MNIST", "cifar": "CIFAR-10"}


def read_csv(path):
    """A CSV as dicts of floats (NaN for empty cells); [] when missing."""
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def recovery_round(rows, clean, after):
    """The first round > ``after`` from which every BA is at most clean + TOLERANCE; None if the
    last round reached is still above it (or no round is after ``after``)."""
    later = [r for r in rows if r["round"] > after]
    first = None
    for r in later:
        if r["backdoor_acc"] > clean + TOLERANCE:
            first = None
        elif first is None:
            first = int(r["round"])
    return first


def last_attack_round(run_dir):
    """The last round of the run's `<k>_poison_epochs` lists (its params.yaml); None without them."""
    path = os.path.join(run_dir, "params.yaml")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        params = yaml.safe_load(f) or {}
    rounds = [r for k, v in params.items() if re.fullmatch(r"\d+_poison_epochs", str(k)) and v for r in v]
    return max(rounds) if rounds else None


def mean_ba(rows, first_round):
    values = [r["backdoor_acc"] for r in rows if r["round"] >= first_round]
    return sum(values) / len(values) if values else None


def cells_by_defense(grid):
    """{attack_mode: {defense label: run folder}} of the grid's cells."""
    out = {}
    for name, cell, run_dir, _ in sweep.plan(grid):
        out.setdefault(cell.get("attack_mode", "single_shot"), {})[cell.get("_defense", name)] = run_dir
    return out


def summary_table(cells, last_round):
    """One row per attack and defense; the mean BA is over the rounds after the single-shot run's
    last attack, for both attacks."""
    single = cells.get("single_shot", {})
    ends = [r for r in (last_attack_round(p) for p in single.values()) if r is not None]
    after_attacks = (max(ends) if ends else 0) + 1
    lines = [f"| attack | defense | rounds | clean BA | recovery round | mean BA from {after_attacks} | BA last | "
             "MA last | MA vs none | MA raw last | raw MA vs none |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    clean = {d: rows[0]["backdoor_acc"] for d, rows in
             ((d, read_csv(os.path.join(p, "metrics.csv"))) for d, p in single.items()) if rows}
    for attack, runs in cells.items():
        none_rows = read_csv(os.path.join(runs.get("none", ""), "metrics.csv"))
        none_by_round = {int(r["round"]): r for r in none_rows}
        for defense, path in runs.items():
            rows = read_csv(os.path.join(path, "metrics.csv"))
            if not rows:
                lines.append(f"| {attack} | {defense} | not run | | | | | | | | |")
                continue
            last = rows[-1]
            reached = int(last["round"])
            level = clean.get(defense)
            after = last_attack_round(path) if attack == "single_shot" else int(rows[0]["round"])
            recovered = recovery_round(rows, level, after) if level is not None else None
            note = "" if reached >= last_round else " so far"
            cost = raw_cost = ""
            if reached in none_by_round:
                cost = f"{last['main_acc'] - none_by_round[reached]['main_acc']:+.2f}"
                raw_cost = f"{last['main_acc_raw'] - none_by_round[reached]['main_acc_raw']:+.2f}"
            mean = mean_ba(rows, after_attacks)
            if recovered:
                recovery = f"{recovered}{note}"
            else:
                recovery = "not yet" if reached < last_round else "never"
            row = [attack, defense, f"{int(rows[0]['round'])}-{reached}", number(level), recovery,
                   number(mean) + (note if mean is not None else ""), number(last["backdoor_acc"]),
                   number(last["main_acc"]), cost, number(last["main_acc_raw"]), raw_cost]
            lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def number(value):
    """A percentage for a table cell; empty when missing."""
    return "" if value is None else f"{value:.2f}"


def norm_shares(path):
    """{round: the attackers' share of the round's summed update norms}."""
    sums = {}
    for c in read_csv(os.path.join(path, "clients.csv")):
        total, attacker = sums.get(int(c["round"]), (0.0, 0.0))
        sums[int(c["round"])] = (total + c["update_norm"], attacker + c["update_norm"] * c["is_attacker"])
    return {r: attacker / total for r, (total, attacker) in sums.items() if total}


def flip_rounds_table(flip_dir, none_dir):
    """FLIP against no defense round by round."""
    flip, none = read_csv(os.path.join(flip_dir, "metrics.csv")), read_csv(os.path.join(none_dir, "metrics.csv"))
    if not flip:
        return "(no FLIP rounds yet)"
    base = {int(r["round"]): r for r in none}
    shares = norm_shares(flip_dir)
    triggers = sorted(k for k in flip[0] if k.startswith("ba_trigger_") and not k.endswith("_raw"))
    lines = ["| round | attackers | MA FLIP | MA none | BA FLIP | BA raw FLIP | BA none | "
             + " | ".join(f"BA {t[3:]}" for t in triggers)
             + " | hardening toward target | attackers' norm share |",
             "|---" * (9 + len(triggers)) + "|"]
    for r in flip:
        n = base.get(int(r["round"]), {})
        row = [int(r["round"]), int(r["attackers_selected"]), number(r["main_acc"]), number(n.get("main_acc")),
               number(r["backdoor_acc"]), number(r["backdoor_acc_raw"]), number(n.get("backdoor_acc")),
               *(number(r[t]) for t in triggers), int(r["flip_stamped_to_target"]),
               f"{100 * shares.get(int(r['round']), 0):.1f} %"]
        lines.append("| " + " | ".join(map(str, row)) + " |")
    return "\n".join(lines)


def dataset_name(grid):
    """The grid's dataset as a title says it: its fixed `type`, else the base YAML's."""
    kind = sweep.setting(grid, {}, "type")
    return DATASET_NAMES.get(kind, str(kind))


def plot(attack, runs, dataset, out_path):
    fig, (ax_ba, ax_ma) = plt.subplots(1, 2, figsize=(12, 4.5))
    for defense, path in runs.items():
        rows = read_csv(os.path.join(path, "metrics.csv"))
        if not rows:
            continue
        rounds = [r["round"] for r in rows]
        width = 2.2 if defense in ("none", "flip", "flame") else 0.9
        ax_ba.plot(rounds, [r["backdoor_acc"] for r in rows], label=defense, lw=width)
        ax_ma.plot(rounds, [r["main_acc"] for r in rows], label=defense, lw=width)
    for ax, name in ((ax_ba, "BA (%)"), (ax_ma, "MA (%)")):
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(name)
        ax.set_ylim(-2, 102)
        ax.grid(alpha=0.3)
    if ax_ba.lines:
        ax_ba.legend(fontsize=7, ncol=2)
    fig.suptitle(f"{dataset} to the authors' horizon, {attack.replace('_', '-')} DBA")
    fig.tight_layout()
    fig.savefig(out_path, dpi=110)
    plt.close(fig)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("grid")
    args = parser.parse_args(argv)
    grid = sweep.load_grid(args.grid)
    cells = cells_by_defense(grid)
    last_round = max(sweep.last_epoch(grid, cell) for cell in sweep.expand(grid))
    dataset = dataset_name(grid)
    parts = [f"# {os.path.basename(grid['out'])}: {dataset}, every defense to round {last_round}", "",
             summary_table(cells, last_round), ""]
    for attack, runs in cells.items():
        if "flip" in runs and "none" in runs:
            parts += [f"## {attack}: FLIP against no defense, round by round", "",
                      flip_rounds_table(runs["flip"], runs["none"]), ""]
        plot(attack, runs, dataset, os.path.join(grid["out"], f"horizon_{attack}.png"))
    path = os.path.join(grid["out"], "horizon.md")
    with open(path, "w") as f:
        f.write("\n".join(parts))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
