"""Results tables (Markdown) and one MA/BA plot per attack from experiments/results/*/.

    python experiments/report.py                    # the main table; writes experiments/<attack>.png
                                                    # and, with baseline runs, <attack>_defenses.png
    python experiments/report.py --flame-admission  # FLAME's admission rules (docs/flame_admission.md)
    python experiments/report.py --flame-batchnorm  # FLAME on a BatchNorm model (docs/flame_admission.md)
    python experiments/report.py --flip-rounds=single_shot   # FLIP vs no defense, round by round
    python experiments/report.py --sweep experiments/grids/fmnist_defenses.yaml   # a sweep's tables
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
sys.path.insert(0, os.path.dirname(HERE))
from defenses import SERVER_RULES  # noqa: E402

RESULTS = os.path.join(HERE, "results")
ATTACKS = {"single_shot": "single-shot DBA (x100, rounds 202/204/206/208)",
           "continuous": "continuous DBA (every round, threshold 0.4)"}
DEFENSES = {"none": "no defense", "flip": "FLIP", "flame": "FLAME"}
# Every other registered rule, under its own label (run folders are named <attack>_<rule>).
BASELINES = {name: rule.label for name, rule in SERVER_RULES.items() if name not in ("mean", "weighted_mean", "flame")}
ALL_DEFENSES = {**DEFENSES, **BASELINES}


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


def code_of(run):
    """Which commits ran the run's rounds (segments.csv, written since runs record it), e.g.
    "0437675 201-210, 9a1b2c3* 211-218" (* uncommitted changes); "not recorded" for older runs."""
    path = os.path.join(RESULTS, run, "segments.csv")
    if not os.path.exists(path):
        return "not recorded"
    with open(path) as f:
        segments = list(csv.DictReader(f))
    return ", ".join(f"{s['commit'][:7]}{'*' if s['dirty'] == 'True' else ''} {s['first_round']}-{s['last_round']}"
                     for s in segments)


def table():
    lines = ["| attack | defense | rounds | MA | MA raw | BA | BA raw | peak BA | peak BA raw | "
             "attackers rejected / selected | benign rejected | wall time | code |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for attack in ATTACKS:
        for defense, label in ALL_DEFENSES.items():
            rows = load(f"{attack}_{defense}")
            if not rows:
                if defense in DEFENSES:
                    lines.append(f"| {attack} | {label} | not run | | | | | | | | | | |")
                continue
            last = rows[-1]
            rejected = sum(r["attackers_rejected"] for r in rows)
            selected = sum(r["attackers_selected"] for r in rows)
            benign = sum(r["benign_rejected"] for r in rows)
            secs = wall_seconds(f"{attack}_{defense}")
            wall = f"{secs:.0f} s" if secs is not None else ""
            lines.append(
                f"| {attack} | {label} | {int(rows[0]['round'])}-{int(last['round'])} | "
                f"{last['main_acc']:.2f} | {last['main_acc_raw']:.2f} | {last['backdoor_acc']:.2f} | "
                f"{last['backdoor_acc_raw']:.2f} | {max(r['backdoor_acc'] for r in rows):.2f} | "
                f"{max(r['backdoor_acc_raw'] for r in rows):.2f} | {int(rejected)} / {int(selected)} | "
                f"{int(benign)} | {wall} | {code_of(f'{attack}_{defense}')} |")
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


def plot_peaks(attack):
    """Every defense's peak BA, last-round BA and last-round MA as grouped bars: readable with a
    dozen defenses, where a dozen BA curves are not."""
    runs = [(label, load(f"{attack}_{d}")) for d, label in ALL_DEFENSES.items()]
    runs = [(label, rows) for label, rows in runs if rows]
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.27
    series = (("peak BA", lambda rows: max(r["backdoor_acc"] for r in rows)),
              ("last-round BA", lambda rows: rows[-1]["backdoor_acc"]),
              ("last-round MA", lambda rows: rows[-1]["main_acc"]))
    for k, (name, value) in enumerate(series):
        ax.bar([i + (k - 1) * width for i in range(len(runs))], [value(rows) for _, rows in runs],
               width, label=name)
    ax.set_xticks(range(len(runs)), [label for label, _ in runs], rotation=30, ha="right")
    ax.set_ylabel("%")
    ax.set_ylim(0, 102)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(ncol=3, loc="upper center", bbox_to_anchor=(0.5, 1.13))
    ax.set_title(f"Fashion-MNIST, {ATTACKS[attack]}", pad=28)
    fig.tight_layout()
    out = os.path.join(HERE, f"{attack}_defenses.png")
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


ADMISSION_SCENARIOS = {"benign": "benign only", "single_shot": "single-shot", "continuous": "continuous"}
ADMISSION_ALPHAS = ["0.1", "0.5", "1.0", "iid"]
ADMISSION_RULES = ["cluster", "outlier_score"]
ADMISSION_VARIANTS = ["outlier_score_max0.5"]  # other flame_outlier_max values, listed where run


def percent(part, whole):
    return f"{100 * part / whole:.1f} % ({int(part)}/{int(whole)})" if whole else "–"


def admission_table():
    """Per scenario, Dirichlet alpha and rule: benign clients admitted (true-negative rate),
    attacker updates rejected (true-positive rate), MA/BA at the last round and peak BA."""
    lines = ["| scenario | alpha | rule | rounds | benign admitted | attackers rejected | MA | BA | peak BA |",
             "|---|---|---|---|---|---|---|---|---|"]
    for scenario, label in ADMISSION_SCENARIOS.items():
        for alpha in ADMISSION_ALPHAS:
            for rule in ADMISSION_RULES + ADMISSION_VARIANTS:
                run = os.path.join("flame_admission", f"{scenario}_{alpha}_{rule}")
                rows, clients = load(run), read_rows(run, "clients.csv")
                if not rows or not clients:
                    if rule in ADMISSION_RULES:
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


def batchnorm_table():
    """Benign admission of FLAME on a BatchNorm model: trainable parameters vs whole state_dict."""
    lines = ["| clustered on | rule | rounds | benign admitted | MA |", "|---|---|---|---|---|"]
    for vectors in ("trainable", "whole_state_dict"):
        for rule in ADMISSION_RULES:
            run = os.path.join("flame_batchnorm", f"{vectors}_{rule}")
            rows, clients = load(run), read_rows(run, "clients.csv")
            if not rows or not clients:
                lines.append(f"| {vectors} | {rule} | not run | | |")
                continue
            lines.append(f"| {vectors} | {rule} | {int(rows[0]['round'])}-{int(rows[-1]['round'])} | "
                         f"{percent(sum(c['admitted'] for c in clients), len(clients))} | "
                         f"{rows[-1]['main_acc']:.2f} |")
    return "\n".join(lines)


def share(sums):
    total, attacker = sums or (0.0, 0.0)
    return f"{100 * attacker / total:.1f} %" if total and attacker else "0"


def flip_rounds_table(attack):
    """FLIP against no defense round by round: MA, BA (thresholded and raw), how far each round
    moved BA in each run, and FLIP's hardening counts (steps, those stamping a trigger toward
    the attack's target label, batches skipped by the trigger-size cap), and the attackers' share
    of the summed update norms that FedAvg averages (each update enters with the same weight)."""
    flip, none = load(f"{attack}_flip"), load(f"{attack}_none")
    shares = {}
    for c in read_rows(f"{attack}_flip", "clients.csv") or []:
        total, attacker = shares.get(int(c["round"]), (0.0, 0.0))
        shares[int(c["round"])] = (total + c["update_norm"], attacker + c["update_norm"] * c["is_attacker"])
    if not flip or not none:
        return f"({attack}: the FLIP or the no-defense run is missing)"
    base = {int(r["round"]): r for r in none}
    lines = ["| round | attackers | MA FLIP | MA none | BA FLIP | BA raw FLIP | BA none | ΔBA FLIP | ΔBA none | "
             "hardening steps | toward target | skipped by cap | inversions | attackers' norm share |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    previous = None
    for r in flip:
        n = base.get(int(r["round"]))
        if n is None:
            continue
        delta_flip = f"{r['backdoor_acc'] - previous[0]:+.2f}" if previous else ""
        delta_none = f"{n['backdoor_acc'] - previous[1]:+.2f}" if previous else ""
        lines.append(f"| {int(r['round'])} | {int(r['attackers_selected'])} | {r['main_acc']:.2f} | "
                     f"{n['main_acc']:.2f} | {r['backdoor_acc']:.2f} | {r['backdoor_acc_raw']:.2f} | "
                     f"{n['backdoor_acc']:.2f} | {delta_flip} | {delta_none} | {int(r['flip_hardened'])} | "
                     f"{int(r['flip_stamped_to_target'])} | {int(r['flip_oversize_skips'])} | "
                     f"{int(r['flip_inversions'])} | {share(shares.get(int(r['round'])))} |")
        previous = (r["backdoor_acc"], n["backdoor_acc"])
    return "\n".join(lines)


def sweep_report(grid_path):
    """A sweep's mean ± std table (experiments/sweep.py), from its cells' records."""
    sys.path.insert(0, HERE)
    import sweep

    grid = sweep.load_grid(grid_path)
    rows = sweep.gather(grid)
    return sweep.report(grid, rows) if rows else f"no results yet in {grid['out']}"


def main():
    if "--sweep" in sys.argv[1:]:
        print(sweep_report(sys.argv[sys.argv.index("--sweep") + 1]))
        return
    for attack in ATTACKS:
        if f"--flip-rounds={attack}" in sys.argv[1:]:
            print(flip_rounds_table(attack))
            return
    if "--flame-admission" in sys.argv[1:]:
        print(admission_table())
        return
    if "--flame-batchnorm" in sys.argv[1:]:
        print(batchnorm_table())
        return
    print(table())
    for attack in ATTACKS:
        if any(load(f"{attack}_{d}") for d in BASELINES):
            print("wrote", plot_peaks(attack), file=sys.stderr)
        if any(load(f"{attack}_{d}") for d in DEFENSES):
            print("wrote", plot(attack), file=sys.stderr)


if __name__ == "__main__":
    main()
