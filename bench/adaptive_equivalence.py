"""Does the adaptive FLIP budget keep the defense? A client-level study on real Fashion-MNIST.

From a backdoored global model (round 208 of the no-defense single-shot run, BA near 100 %),
the same benign clients (round 209's participants, first-time FLIP clients) harden their models
once with the reference budget and once with `flip.adaptive_budget`; each client's local MA/BA
after hardening and those of the average of the hardened models are printed side by side, with
each mode's inversion seconds.

    python bench/adaptive_equivalence.py                  # makes the round-208 model first if missing
    python bench/adaptive_equivalence.py --set flip.adaptive_patience=30
    python bench/adaptive_equivalence.py --control      # reference budget twice, other client seeds

`--control` replaces the adaptive run by a second reference run whose clients draw their seeds
(batch order, inversion noise) as in another round: the run-to-run spread the adaptive budget's
differences should be judged against.

The backdoored start is the no-defense single-shot run to round 208 (`python main.py --params
utils/fashion_mnist.yaml --set invert=false --set epochs=208 --run-dir
experiments/results/equivalence_start`, a few minutes on a CPU).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import config  # noqa: E402
import invert  # noqa: E402
import test  # noqa: E402
import train  # noqa: E402

START = os.path.join(ROOT, "experiments", "results", "equivalence_start")


def backdoored_model(folder, round_no, threads):
    """Path of the no-defense single-shot run's model at ``round_no``, made if missing."""
    path = os.path.join(folder, f"model_last.pt.tar.epoch_{round_no}")
    if not os.path.isfile(path):
        print(f"making the backdoored start model: no-defense single-shot run to round {round_no}", file=sys.stderr)
        subprocess.run([sys.executable, os.path.join(ROOT, "main.py"), "--params", "utils/fashion_mnist.yaml",
                        "--run-dir", folder, "--set", f"epochs={round_no}", "--set", "seed=1",
                        "--set", "invert=false", "--set", "aggregation_methods=mean", "--threads", str(threads)],
                       cwd=ROOT, check=True)
    return path


def evaluate(fed, state):
    fed.model.load_state_dict(state)
    metrics = test.evaluate(fed.model, fed.data, fed.params, fed.triggers)
    return round(metrics["main_acc"], 2), round(metrics["backdoor_acc"], 2)


def average(states):
    return {k: (sum(s[k].float() for s in states) / len(states)).to(states[0][k].dtype) for k in states[0]}


def harden(fed, cids, seed_round, flip):
    """The clients' FLIP hardening from the global model, with the client seeds of round
    ``seed_round``; (local states, seconds, inversions)."""
    params = {**fed.params, "flip": flip}
    seeds = [fed.client_seed(seed_round, cid) for cid in cids]
    start = time.perf_counter()
    results = invert.flip_round(fed.model, fed.global_state, fed.data, cids, params, {}, seeds, fed.device)
    seconds = time.perf_counter() - start
    return [state for state, _, _ in results], seconds, sum(s["inversions"] for _, _, s in results)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--round", type=int, default=208, help="round of the backdoored start model")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="overrides, as main.py")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=torch.get_num_threads())
    p.add_argument("--start-dir", default=START, help="folder of the backdoored start run")
    p.add_argument("--control", action="store_true",
                   help="second mode: the reference budget with other client seeds, instead of the adaptive budget")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    start = backdoored_model(args.start_dir, args.round, args.threads)
    params = config.load_config(os.path.join(ROOT, "utils", "fashion_mnist.yaml"),
                                [f"resumed_model_name={start}", "invert=true", "seed=1"] + args.set)
    with tempfile.TemporaryDirectory() as run_dir:
        fed = train.Federation(params, run_dir, args.device)
    round_no = args.round + 1
    cids = train.choose_participants(params, round_no, fed.schedule)
    reference = {**params["flip"], "adaptive_budget": False}
    second = "reference, other seeds" if args.control else "adaptive"
    modes = {"reference": (reference, round_no),
             second: (reference, round_no + 1000) if args.control else ({**reference, "adaptive_budget": True}, round_no)}
    global_ma, global_ba = evaluate(fed, fed.global_state)
    print(f"start: round {args.round}, MA {global_ma} BA {global_ba}; clients {cids}", file=sys.stderr)
    rows = {}
    for name, (flip, seed_round) in modes.items():
        states, seconds, inversions = harden(fed, cids, seed_round, flip)
        rows[name] = {"seconds": round(seconds, 1), "inversions": inversions,
                      "clients": [evaluate(fed, s) for s in states], "average": evaluate(fed, average(states))}
        print(json.dumps({"mode": name, **rows[name]}))
    print(f"\n| client | MA reference | BA reference | MA {second} | BA {second} |\n|---|---|---|---|---|")
    for cid, (ma_r, ba_r), (ma_a, ba_a) in zip(cids, rows["reference"]["clients"], rows[second]["clients"]):
        print(f"| {cid} | {ma_r} | {ba_r} | {ma_a} | {ba_a} |")
    (ma_r, ba_r), (ma_a, ba_a) = rows["reference"]["average"], rows[second]["average"]
    print(f"| average of the hardened models | {ma_r} | {ba_r} | {ma_a} | {ba_a} |")
    print(f"| inversion seconds (inversions) | {rows['reference']['seconds']} ({rows['reference']['inversions']}) | | "
          f"{rows[second]['seconds']} ({rows[second]['inversions']}) | |")
    print(f"\nstart model: MA {global_ma}, BA {global_ba}")


if __name__ == "__main__":
    main()
