"""FLIP on benign clients: the round's executor (docs/algorithms.md §4), for any dataset.

Each benign client runs ``flip_client.client_program``, which yields requests (``Invert``,
``Harden``) and receives their results. ``run_programs`` drives the programs of a round either one
client after the other, or in lockstep with every pending inversion of the round solved in one
batched kernel (``inversion.invert_batch``: client models stacked and frozen). Both paths
use the same kernels, so they give the same results up to float rounding.

Image shape and class count come from the data; every constant comes from the YAML group `flip`.
"""

import copy
import logging
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import stack_module_state
from tqdm import tqdm

from flip_client import ClientContext, Harden, client_program, new_state, planned_batches
from helper import PhaseTimer
from inversion import ADAM_BETAS, INVERSION_KINDS, Invert, invert_batch

logger = logging.getLogger(__name__)


class RoundProgress:
    """Counts a FLIP round's batches and inversions and logs a line every ``interval`` seconds
    (tqdm's bar is hidden when the output goes to a file, and a round can take many minutes)."""

    def __init__(self, total_batches, n_clients, interval):
        self.total_batches, self.n_clients, self.interval = total_batches, n_clients, interval
        self.batches = self.inversions = self.clients_done = 0
        self.start = self.last_log = time.perf_counter()

    def maybe_log(self):
        now = time.perf_counter()
        if now - self.last_log < self.interval:
            return
        self.last_log = now
        elapsed = now - self.start
        eta = elapsed * (self.total_batches - self.batches) / self.batches if self.batches else float("nan")
        logger.info("FLIP: %d/%d clients done, %d/%d batches, %d inversions, %.0f s elapsed, "
                    "about %.0f s left in this round", self.clients_done, self.n_clients, self.batches,
                    self.total_batches, self.inversions, elapsed, eta)


# ---------------------------------------------------------------------------------------------
# Executor.

class ClientModels:
    """The k benign clients' local models, each with its own Adam (hardening)."""

    def __init__(self, template, global_state, k, lr):
        self.template = template
        self.models = []
        for _ in range(k):
            model = copy.deepcopy(template)
            model.load_state_dict(global_state)
            self.models.append(model)
        self.optimizers = [torch.optim.Adam(m.parameters(), lr=lr, betas=ADAM_BETAS) for m in self.models]

    def frozen_stack(self, indices):
        """Detached, stacked parameters and buffers of the models at ``indices``."""
        params, buffers = stack_module_state([self.models[i] for i in indices])
        return ({k: v.detach() for k, v in params.items()}, {k: v.detach() for k, v in buffers.items()})

    def harden(self, i, request):
        model, optimizer = self.models[i], self.optimizers[i]
        model.train()
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(request.x), request.y).backward()
        optimizer.step()


def run_programs(models, programs, fp, shape, generators, batched, timer, progress):
    """Drive the client programs to completion; returns each one's ClientStats. ``timer``
    accumulates the seconds spent inverting and hardening; ``progress`` is logged as it goes."""
    template = models.template.eval()
    pending, stats = {}, {}
    bar = tqdm(total=len(programs), desc="FLIP clients", leave=False, disable=None)

    def advance(i, value):
        if isinstance(pending.get(i), Invert):
            progress.inversions += 1
        try:
            pending[i] = programs[i].send(value)
        except StopIteration as stop:
            pending.pop(i, None)
            stats[i] = stop.value
            progress.clients_done += 1
            bar.update()
        progress.maybe_log()

    for i in range(len(programs)):
        advance(i, None)
        while not batched and i in pending:
            advance(i, serve(models, template, [i], pending, fp, shape, generators, timer)[i])
    while pending:
        ready = sorted(pending)
        inverting = [i for i in ready if isinstance(pending[i], Invert)]
        results = serve(models, template, inverting or ready, pending, fp, shape, generators, timer)
        for i, value in results.items():
            advance(i, value)
    bar.close()
    return [stats[i] for i in range(len(programs))]


def serve(models, template, indices, pending, fp, shape, generators, timer):
    """Answer the pending requests of clients ``indices``: their inversions in one batched call
    (requests of any length: each leaves the batch when it is done), hardening steps client by
    client."""
    inverting = [i for i in indices if isinstance(pending[i], Invert)]
    answers = {}
    if inverting:
        with timer("inversion"):
            params, buffers = models.frozen_stack(inverting)
            results = invert_batch(template, params, buffers, [pending[i] for i in inverting], fp, shape,
                                   [generators[i] for i in inverting])
        answers.update(zip(inverting, results))
    hardening = [i for i in indices if isinstance(pending[i], Harden)]
    if hardening:
        with timer("hardening"):
            for i in hardening:
                models.harden(i, pending[i])
                answers[i] = None
    template.eval()
    return answers


def flip_round(template, global_state, data, client_ids, params, client_states, seeds, device, timer=None):
    """FLIP local training of the benign clients ``client_ids`` from the global state.

    Returns, per client, (local state_dict, sample count, stats dict). ``client_states`` holds
    each client's persistent FLIP state and is updated in place.
    """
    fp = params["flip"]
    models = ClientModels(template, global_state, len(client_ids), fp["harden_lr"])
    programs, generators = [], []
    progress = RoundProgress(sum(planned_batches(len(data.client_indices[c]), fp) for c in client_ids),
                             len(client_ids), params.get("progress_seconds", 60.0))
    for cid, seed in zip(client_ids, seeds):
        rows = data.client_indices[cid]
        y = data.train_y[rows]
        state = client_states.setdefault(cid, {}).setdefault("flip", new_state(data.num_classes))
        ctx = ClientContext(data.train_x[rows], y, y.cpu().numpy(), data.num_classes, fp, state,
                            np.random.default_rng(seed), torch.Generator().manual_seed(seed), progress)
        programs.append(client_program(ctx))
        generators.append(torch.Generator(device=device).manual_seed(seed))
    stats = run_programs(models, programs, fp, data.image_shape, generators, fp["batched"],
                         timer or PhaseTimer(device), progress)
    return [(m.state_dict(), len(data.client_indices[cid]), s.as_dict())
            for m, cid, s in zip(models.models, client_ids, stats)]


def summarize_round(stats, target_label):
    """Per-round FLIP numbers for metrics.csv; ``target_label`` is the attack's target, for
    counting the hardening steps that stamped a trigger aimed at it."""
    stats = [s for s in stats if s is not None]
    runs = [s for s in stats if s["inversions"]]
    return {"flip_inversions": sum(s["inversions"] for s in stats),
            "flip_mask_l1": round(float(np.mean([s["mask_l1"] for s in runs])), 4) if runs else 0.0,
            "flip_success": round(float(np.mean([s["success"] for s in runs])), 4) if runs else 0.0,
            "flip_hardened": sum(s["hardened"] for s in stats),
            "flip_stamped_to_target": sum(s["stamped"].get(target_label, 0) for s in stats),
            "flip_oversize_skips": sum(s["oversize_skips"] for s in stats)}


def profile_round(stats):
    """Per inversion kind, over the clients' stats dicts: how many ran, mean images, mean steps
    asked and run, the mean step of the best trigger's last improvement, and the share of the
    steps run after it (spent once the trigger had converged)."""
    rows = {}
    for s in stats:
        for kind, records in (s or {}).get("profile", {}).items():
            rows.setdefault(kind, []).extend(records)
    out = {}
    for kind in INVERSION_KINDS:
        records = np.array(rows.get(kind, []), dtype=float).reshape(-1, 4)
        if not len(records):
            continue
        images, asked, run, last = records.T
        out[kind] = {"count": len(records), "images": round(float(images.mean()), 1),
                     "steps_asked": round(float(asked.mean()), 1), "steps_run": round(float(run.mean()), 1),
                     "last_improvement": round(float(last.mean()), 1),
                     "after_last_improvement": round(float(1 - last.sum() / run.sum()), 3),
                     "image_steps": int((images * run).sum())}
    return out
