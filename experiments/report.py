"""Results tables (Markdown) and one MA/BA plot per attack from experiments/results/*/.

    python experiments/report.py                    # the main table; writes experiments/<attack>.png
    python experiments/report.py --flame-admission  # FLAME's admission rules (flame_admission.sh)
"""

import csv
import json
import os
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
ATTACKS = {"single_shot": "single-shot DBA (x100, rounds 202/204/206/208)",
           "continuous": "continuous DBA (every round, threshold 0.4)"}
DEFENSES = {"none": "no defense", "flip": "FLIP", "flame": "FLAME"}


def read_rows(run, name):
    """A run's CSV as dicts of floats (NaN for empty cells), or None when it has none."""
    path = os.path.join(RESULTS, run, name)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return [{k: float(v) if v != "" else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def load(run):
    return read_rows(run, "metrics.csv")


def wall_seconds(run):
    path = os.path.join(RESULTS, run, "summary.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f).get("total_seconds")


def table():
    lines = ["| attack | defense | rounds | MA | MA raw | BA | BA raw | peak BA | peak BA raw | "
             "attackers rejected / selected | benign rejected | wall time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack in ATTACKS:
        for defense in DEFENSES:
            rows = load(f"{attack}_{defense}")
            if not rows:
                lines.append(f"| {attack} | {DEFENSES[defense]} | not run | | | | | | | | | |")
                continue
            last = rows[-1]
            rejected = sum(r["attackers_rejected"] for r in rows)
            selected = sum(r["attackers_selected"] for r in rows)
            benign = sum(r["benign_rejected"] for r in rows)
            secs = wall_seconds(f"{attack}_{defense}")
            wall = f"{secs:.0f} s" if secs is not None else ""
            lines.append(
                f"| {attack} | {DEFENSES[defense]} | {int(rows[0]['round'])}-{int(last['round'])} | "
                f"{last['main_acc']:.2f} | {last['main_acc_raw']:.2f} | {last['backdoor_acc']:.2f} | "
                f"{last['backdoor_acc_raw']:.2f} | {max(r['backdoor_acc'] for r in rows):.2f} | "
                f"{max(r['backdoor_acc_raw'] for r in rows):.2f} | {int(rejected)} / {int(selected)} | "
                f"{int(benign)} | {wall} |")
    return "\n".join(lines)


def plot(attack):
    fig, (ax_ma, ax_ba) = plt.subplots(1, 2, figsize=(11, 4))
    for defense, label in DEFENSES.items():
        rows = load(f"{attack}_{defense}")
        if not rows:
            continue
        rounds = [r["round"] for r in rows]
        ax_ma.plot(rounds, [r["main_acc"] for r in rows], label=label)
        ax_ba.plot(rounds, [r["backdoor_acc"] for r in rows], label=label)
    for ax, name in ((ax_ma, "main accuracy (%)"), (ax_ba, "backdoor accuracy (%)")):
        ax.set_xlabel("round")
        ax.set_ylabel(name)
        ax.set_ylim(-2, 102)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"Fashion-MNIST, {ATTACKS[attack]}")
    fig.tight_layout()
    out = os.path.join(HERE, f"{attack}.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


ADMISSION_SCENARIOS = {"benign": "benign only", "single_shot": "single-shot", "continuous": "continuous"}
ADMISSION_ALPHAS = ["0.1", "0.5", "1.0", "iid"]
ADMISSION_RULES = ["cluster", "outlier_score"]


def percent(part, whole):
    return f"{100 * part / whole:.1f} % ({int(part)}/{int(whole)})" if whole else "–"


def admission_table():
    """Per scenario, Dirichlet alpha and rule: benign clients admitted (true-negative rate),
    attacker updates rejected (true-positive rate), MA/BA at the last round and peak BA."""
    lines = ["| scenario | alpha | rule | rounds | benign admitted | attackers rejected | MA | BA | peak BA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scenario, label in ADMISSION_SCENARIOS.items():
        for alpha in ADMISSION_ALPHAS:
            for rule in ADMISSION_RULES:
                run = os.path.join("flame_admission", f"{scenario}_{alpha}_{rule}")
                rows, clients = load(run), read_rows(run, "clients.csv")
                if not rows or not clients:
                    lines.append(f"| {label} | {alpha} | {rule} | not run | | | | | |")
                    continue
                benign = [c for c in clients if c["is_attacker"] == 0]
                attackers = [c for c in clients if c["is_attacker"] == 1]
                last = rows[-1]
                lines.append(
                    f"| {label} | {alpha} | {rule} | {int(rows[0]['round'])}-{int(last['round'])} | "
                    f"{percent(sum(c['admitted'] for c in benign), len(benign))} | "
                    f"{percent(sum(1 - c['admitted'] for c in attackers), len(attackers))} | "
                    f"{last['main_acc']:.2f} | {last['backdoor_acc']:.2f} | "
                    f"{max(r['backdoor_acc'] for r in rows):.2f} |")
    return "\n".join(lines)


def main():
    if "--flame-admission" in sys.argv[1:]:
        print(admission_table())
        return
    print(table())
    for attack in ATTACKS:
        if any(load(f"{attack}_{d}") for d in DEFENSES):
            print("wrote", plot(attack), file=sys.stderr)


if __name__ == "__main__":
    main()
