"""The federated round loop: choose clients, train them, aggregate, evaluate, record, checkpoint."""

import copy
import logging
import os
import shutil
import time

import numpy as np
import torch
from tqdm import tqdm

import attacks
import defense
import defenses
import helper
import image_train
import run_folder
import test
from config import pretrain_rounds
from image_helper import DataError, load_federated_data, trigger_mask, trigger_name, trigger_pixels
from models import build_model

logger = logging.getLogger(__name__)

CLIENT_COLUMNS = ["round", "client_id", "is_attacker", "n_samples", "update_norm", "admitted"]


def local_trigger_count(params):
    """Per-trigger BA is measured in attacked runs only; a clean run reports the global trigger."""
    return params["trigger_num"] if params["is_poison"] else 0


def metric_columns(params):
    cols = ["round", "main_acc", "backdoor_acc", "main_acc_raw", "backdoor_acc_raw",
            "rejected_frac", "backdoor_rejected_frac"]
    for k in range(local_trigger_count(params)):
        cols += [f"ba_trigger_{k}", f"ba_trigger_{k}_raw"]
    cols += ["attackers_selected", "attackers_rejected", "benign_selected", "benign_rejected", "tpr", "fpr"]
    client_defense = defenses.active_client_defense(params)
    if client_defense:
        cols += client_defense.metric_columns
    return cols + list(defenses.SERVER_RULES[params["aggregation_methods"]].metric_columns) + ["seconds"]


def client_columns(params):
    return CLIENT_COLUMNS + list(defenses.SERVER_RULES[params["aggregation_methods"]].client_columns)


def record_value(value):
    """A rule's number as the CSV records it: rounded to 6 decimals; empty when missing or NaN."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return ""
    return round(float(value), 6) if isinstance(value, float) else value


def choose_participants(params, round_no, schedule):
    """The attackers scheduled for this round, then random others (benign clients and the
    attackers not scheduled now) up to `no_models`; seeded by (seed, round)."""
    scheduled = [adv for adv, rounds in zip(params["adversary_list"], schedule)
                 if params["is_poison"] and round_no in rounds]
    pool = sorted(set(range(params["number_of_total_participants"])) - set(scheduled))
    rng = np.random.default_rng(helper.derived_seed(params["seed"], round_no, helper.STREAM_SELECTION))
    others = rng.choice(pool, params["no_models"] - len(scheduled), replace=False)
    return scheduled + [int(c) for c in others]


def describe_rounds(rounds):
    """``[201, 202, 203]`` as "rounds 201-203"; other lists as they are."""
    if len(rounds) > 2 and rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"rounds {rounds[0]}-{rounds[-1]}"
    return f"rounds {rounds}" if rounds else "no round"


def detection_counts(poisoned, admitted):
    """How well the server's admission separated this round's poisoned updates from the benign
    ones (rates as helper.detection_rates; empty when there is nothing to divide by)."""
    counts = {"attackers_selected": sum(poisoned),
              "attackers_rejected": sum(p and not a for p, a in zip(poisoned, admitted)),
              "benign_selected": len(poisoned) - sum(poisoned),
              "benign_rejected": sum(not p and not a for p, a in zip(poisoned, admitted))}
    rates = helper.detection_rates(counts)
    return {**counts, **{k: "" if v is None else v for k, v in rates.items()}}


class Federation:
    """Everything a run holds between rounds; ``state()`` is what the full checkpoint stores."""

    def __init__(self, params, run_dir, device):
        self.params, self.run_dir, self.device = params, run_dir, device
        self.rule = defenses.SERVER_RULES[params["aggregation_methods"]]
        self.attack = attacks.ATTACKS[params["attack"]]
        self.client_defense = defenses.active_client_defense(params)
        torch.manual_seed(params["seed"])
        helper.use_repeatable_kernels(device)
        self.data = load_federated_data(params, device, self.rule.root_set_size(params))
        self.model = build_model(params["model"], self.data.image_shape, self.data.num_classes).to(device)
        self.trainable = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.first_round = 1
        if params["resumed_model"]:
            epoch = helper.load_reference_checkpoint(params["resumed_model_name"], self.model)
            self.first_round = epoch + 1
            logger.info("loaded %s (round %d)", params["resumed_model_name"], epoch)
        self.model.to(device)
        self.global_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.client_states = {}
        self.server_state = {}
        self.last_defense_stats = []  # the client defense's per-client stats of the last round
        self.last_round = self.first_round - 1
        self.timer = helper.PhaseTimer(device)
        _, h, w = self.data.image_shape
        indices = [-1] + list(range(local_trigger_count(params))) if params["trigger_num"] else []
        self.triggers = {trigger_name(k): trigger_mask(trigger_pixels(params, k), h, w, device) for k in indices}
        self.schedule = attacks.attacker_rounds(params, self.first_round) if params["is_poison"] else []
        for k, rounds in enumerate(self.schedule):
            logger.info("attacker %d (client %d) poisons in %s", k, params["adversary_list"][k],
                        describe_rounds(rounds))

    def state(self):
        return {"round": self.last_round, "first_round": self.first_round,
                "global_state": self.global_state, "client_states": self.client_states,
                "server_state": self.server_state, "torch_rng": torch.get_rng_state()}

    def restore(self, ckpt):
        self.last_round, self.first_round = ckpt["round"], ckpt["first_round"]
        self.global_state = {k: v.to(self.device) for k, v in ckpt["global_state"].items()}
        self.client_states = ckpt["client_states"]
        self.server_state = ckpt.get("server_state", {})
        torch.set_rng_state(ckpt["torch_rng"])

    def root_update(self, round_no):
        """The server's own update, for rules that hold a root set: the clients' benign training
        on it from the global model."""
        if self.data.root_indices is None:
            return None
        self.model.load_state_dict(self.global_state)
        gen = torch.Generator().manual_seed(helper.derived_seed(self.params["seed"], round_no, helper.STREAM_SERVER))
        image_train.sgd_passes(self.model, self.data, self.data.root_indices, self.params, gen)
        return image_train.state_difference(self.model.state_dict(), self.global_state)

    def client_seed(self, round_no, cid):
        return helper.derived_seed(self.params["seed"], round_no, helper.STREAM_CLIENT, cid)

    def is_poisoning(self, cid, round_no):
        params = self.params
        return (params["is_poison"] and cid in params["adversary_list"]
                and round_no in self.schedule[params["adversary_list"].index(cid)])

    def train_attacker(self, cid, round_no):
        """The attack's training from the global model, then model replacement unless
        `baseline`; returns (update, n_samples)."""
        params = self.params
        self.model.load_state_dict(self.global_state)
        gen = torch.Generator().manual_seed(self.client_seed(round_no, cid))
        slot = params["adversary_list"].index(cid)
        trigger = self.triggers[trigger_name(self.attack.trigger_index(slot, len(params["adversary_list"])))]
        n = self.attack.train(self.model, self.data, cid, trigger, gen, attacks.local_training(params),
                              **self.attack.own_settings(params))
        update = image_train.state_difference(self.model.state_dict(), self.global_state)
        if not params["baseline"]:
            update = attacks.scale_update(update, params["scale_weights_poison"])
        return update, n

    def train_benign(self, cids, round_no):
        """Benign local training of ``cids``: plain SGD, or the client defense the configuration
        turns on (all of the round's benign clients together). Returns a list of (update,
        n_samples, the client defense's stats)."""
        seeds = [self.client_seed(round_no, cid) for cid in cids]
        if self.client_defense:
            results = self.client_defense.train_round(self.model, self.global_state, self.data, cids, self.params,
                                                      self.client_states, seeds, self.device, self.timer)
            return [(image_train.state_difference(state, self.global_state), n, stats)
                    for state, n, stats in results]
        out = []
        for cid, seed in zip(tqdm(cids, desc=f"round {round_no}", leave=False, disable=None), seeds):
            self.model.load_state_dict(self.global_state)
            n = image_train.benign_train(self.model, self.data, cid, self.params, torch.Generator().manual_seed(seed))
            out.append((image_train.state_difference(self.model.state_dict(), self.global_state), n, None))
        return out

    def run_round(self, round_no):
        """One round; returns (metrics row, client rows)."""
        params = self.params
        participants = choose_participants(params, round_no, self.schedule)
        logger.info("round %d: clients %s", round_no, participants)
        self.timer = helper.PhaseTimer(self.device)
        poisoned = [self.is_poisoning(cid, round_no) for cid in participants]
        with self.timer("local_training"):
            benign = iter(self.train_benign([c for c, p in zip(participants, poisoned) if not p], round_no))
            results = [(*self.train_attacker(cid, round_no), None) if p else next(benign)
                       for cid, p in zip(participants, poisoned)]
        updates, n_samples, defense_stats = (list(x) for x in zip(*results))
        ctx = defense.RoundContext(params, self.trainable,
                                   helper.generator(self.device, params["seed"], round_no, helper.STREAM_SERVER),
                                   participants, self.server_state)
        with self.timer("aggregation"):
            ctx.root_update = self.root_update(round_no)
            result = defense.aggregate(self.global_state, updates, n_samples, ctx)
            self.global_state = result.state
        self.model.load_state_dict(self.global_state)
        with self.timer("evaluation"):
            row = {"round": round_no, **test.evaluate(self.model, self.data, params, self.triggers)}
        row.update(detection_counts(poisoned, result.admitted))
        if self.client_defense:
            self.last_defense_stats = defense_stats
            row.update(self.client_defense.summarize(defense_stats, params, round_no))
        row.update({name: record_value(result.stats.get(name)) for name in self.rule.metric_columns})
        logger.info("round %d phases (s): %s", round_no,
                    ", ".join(f"{k} {v:.2f}" for k, v in self.timer.seconds.items()))
        norms = [float(defense.flatten(u, self.trainable).norm()) for u in updates]
        client_rows = [{"round": round_no, "client_id": cid, "is_attacker": int(p), "n_samples": n,
                        "update_norm": round(norm, 6), "admitted": int(a)}
                       for cid, p, n, norm, a in zip(participants, poisoned, n_samples, norms, result.admitted)]
        for name in self.rule.client_columns:
            for client_row, value in zip(client_rows, result.client_stats.get(name, [None] * len(client_rows))):
                client_row[name] = record_value(value)
        return row, client_rows


def clean_params(params, rounds):
    """The run that makes a start model: the experiment's federation and training settings from
    round 1 to ``rounds`` (the server step `pretrain_lr_para` when set), with no attack and no
    defense."""
    clean = copy.deepcopy(params)
    clean.update(resumed_model=False, is_poison=False, aggregation_methods="mean",
                 epochs=rounds, save_model=True, save_on_epochs=[rounds])
    if params["pretrain_lr_para"] is not None:
        clean["lr_para"] = params["pretrain_lr_para"]
    clean.update({entry.switch: False for entry in defenses.CLIENT_DEFENSES.values()})
    return clean


def ensure_start_model(params, run_dir, device):
    """Train the clean start model named by `resumed_model_name` when it does not exist yet: a
    FedAvg run in its folder (log, metrics and plot beside it), resumed if it was interrupted."""
    path = params["resumed_model_name"]
    if not params["resumed_model"] or os.path.isfile(path):
        return
    rounds = pretrain_rounds(params)
    folder = os.path.dirname(path) or "."
    created = run_folder.usable_folder(folder, "resumed_model_name")
    with run_folder.FolderLock(folder, "pretraining folder"):
        resume = os.path.isfile(os.path.join(folder, helper.FULL_CHECKPOINT))
        logger.info("resumed_model_name '%s' does not exist: %s the clean start model first (%d FedAvg "
                    "rounds, no attack, no defense) in %s; its log gives the time left after every round",
                    path, "continuing" if resume else "training", rounds, folder)
        helper.setup_logging(folder)
        try:
            run(clean_params(params, rounds), folder, device, resume=resume)
        except (DataError, helper.CheckpointError):
            if created and not os.path.isfile(os.path.join(folder, helper.FULL_CHECKPOINT)):
                helper.close_logging()
                shutil.rmtree(folder, ignore_errors=True)
            raise
        finally:
            helper.setup_logging(run_dir)
    made = os.path.join(folder, f"model_last.pt.tar.epoch_{rounds}")
    if os.path.abspath(made) != os.path.abspath(path):
        shutil.copyfile(made, path)
    logger.info("start model ready: %s", path)


def run(params, run_dir, device, resume=False, stop_requested=lambda: False):
    """Run (or resume) an experiment in ``run_dir``; returns the summary dict, or None when
    ``stop_requested()`` turned true and the run stopped after a round, before its last."""
    if not resume:
        ensure_start_model(params, run_dir, device)
    fed = Federation(params, run_dir, device)
    ckpt_path = os.path.join(run_dir, helper.FULL_CHECKPOINT)
    if resume:
        fed.restore(helper.load_full_checkpoint(ckpt_path))
        logger.info("resuming after round %d", fed.last_round)
    run_folder.write_params(run_dir, params)
    segments = run_folder.record_segment(run_dir, fed.last_round + 1, params["epochs"], device)
    segment = segments[-1]
    logger.info("rounds %d-%d run on %s, %s", segment["first_round"], segment["last_round"],
                run_folder.describe_code(segment), segment["gpu"] or segment["cpu"])
    changes = run_folder.repeatability_changes(segments)
    if changes:
        logger.warning("rounds %d-%d run with other settings than the rounds before (%s): from here the "
                       "numbers do not repeat bit for bit those of a run that kept them (segments.csv)",
                       segment["first_round"], segment["last_round"], "; ".join(changes))
    keep = fed.last_round if resume else None
    metrics = helper.CsvLog(os.path.join(run_dir, "metrics.csv"), metric_columns(params), keep)
    clients = helper.CsvLog(os.path.join(run_dir, "clients.csv"), client_columns(params), keep)
    metrics_path = metrics.path
    rounds = range(fed.last_round + 1, params["epochs"] + 1)
    durations = []
    for round_no in tqdm(rounds, desc="rounds", disable=None):
        start = time.perf_counter()
        row, client_rows = fed.run_round(round_no)
        row["seconds"] = round(time.perf_counter() - start, 3)
        fed.last_round = round_no
        metrics.append([row])
        clients.append(client_rows)
        durations.append(row["seconds"])
        logger.info("round %d: MA %.2f%% BA %.2f%% (raw MA %.2f%% BA %.2f%%; test inputs rejected by the "
                    "threshold %.3f; clients rejected by the rule %d of %d) in %.1fs; %d round(s) left, about %.0f s",
                    round_no, row["main_acc"], row["backdoor_acc"], row["main_acc_raw"],
                    row["backdoor_acc_raw"], row["rejected_frac"],
                    row["attackers_rejected"] + row["benign_rejected"],
                    row["attackers_selected"] + row["benign_selected"], row["seconds"],
                    params["epochs"] - round_no, np.mean(durations) * (params["epochs"] - round_no))
        if params["save_model"] and (round_no in params["save_on_epochs"] or round_no == params["epochs"]):
            helper.save_reference_checkpoint(os.path.join(run_dir, f"model_last.pt.tar.epoch_{round_no}"),
                                             fed.global_state, round_no, params["lr"])
        helper.save_full_checkpoint(fed.state(), ckpt_path)
        if round_no < params["epochs"] and stop_requested():
            logger.info("stopped on request after round %d, its checkpoint written; continue with: "
                        "python main.py --resume %s", round_no, run_dir)
            break
    helper.plot_metrics(metrics_path, os.path.join(run_dir, "metrics.png"),
                        f"{params['type']} · {params['aggregation_methods']}"
                        f"{' + ' + fed.client_defense.label if fed.client_defense else ''}")
    if fed.last_round < params["epochs"]:
        return None
    return helper.write_summary(run_dir, metrics_path, {
        "dataset": params["type"], "aggregation": params["aggregation_methods"],
        "invert": params["invert"], "attack": params["attack"], "attack_mode": params["attack_mode"],
        "is_poison": params["is_poison"], "first_round": fed.first_round, "rounds": params["epochs"],
        "code": run_folder.read_segments(run_dir),
    })
