"""FLIP on benign clients: trigger inversion and hardening (REFERENCE.md §4), for any dataset.

Each benign client runs ``client_program``: plain sequential code that *yields* requests
(``Invert``: find the smallest trigger turning some samples into a label; ``Harden``: one Adam
step of the client's model on a batch) and receives their results. An executor runs the programs
of a round, either one client after the other, or in lockstep with every pending inversion of the
round solved in one batched kernel (``invert_batch``: client models stacked and frozen, vmapped).
Both paths use the same kernels, so they give the same results up to float rounding.

Image shape and class count come from the data; every constant comes from the YAML group `flip`.
"""

import copy
import logging
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call, stack_module_state
from tqdm import tqdm

from helper import PhaseTimer

logger = logging.getLogger(__name__)

EPS_TANH = 1e-7  # value = tanh(theta) / (2 - EPS_TANH) + 0.5 keeps atanh finite at 0 and 1

ADAM_BETAS = (0.5, 0.9)


# ---------------------------------------------------------------------------------------------
# Requests a client program yields, and what it gets back.

@dataclass
class Invert:
    """Find up to two triggers at once: trigger g turns the samples whose ``group`` is g into
    their ``labels``. ``init`` holds a stored (mask, pattern) per trigger, or None (random)."""
    x: torch.Tensor
    labels: torch.Tensor
    group: torch.Tensor
    n_triggers: int
    steps: int
    cost: float
    init: list


@dataclass
class InvertResult:
    masks: torch.Tensor      # (T, H, W) best mask per trigger (zeros where none succeeded)
    patterns: torch.Tensor   # (T, C, H, W)
    sizes: np.ndarray        # (T,) L1 of the best mask; 0 where no trigger succeeded
    success: np.ndarray      # (T,) bool
    accuracy: np.ndarray     # (T,) stamped accuracy of the returned trigger


@dataclass
class Harden:
    x: torch.Tensor
    y: torch.Tensor


@dataclass
class ClientStats:
    inversions: int = 0
    mask_l1: list = field(default_factory=list)
    success: list = field(default_factory=list)
    hardened: int = 0                # hardening steps taken
    oversize_skips: int = 0          # batches not hardened because a trigger exceeded the cap
    stamped: Counter = field(default_factory=Counter)  # target label -> hardening steps stamping a trigger toward it

    def record(self, result):
        """Count one inversion and keep its triggers' sizes and stamped accuracies."""
        self.inversions += 1
        self.mask_l1.extend(result.sizes.tolist())
        self.success.extend(result.accuracy.tolist())

    def as_dict(self):
        return {"inversions": self.inversions,
                "mask_l1": float(np.mean(self.mask_l1)) if self.mask_l1 else 0.0,
                "success": float(np.mean(self.success)) if self.success else 0.0,
                "hardened": self.hardened, "oversize_skips": self.oversize_skips,
                "stamped": dict(self.stamped)}


# ---------------------------------------------------------------------------------------------
# Kernels.

def to_theta(value):
    """Inverse of the tanh reparameterisation."""
    return torch.atanh((value.clamp(0.0, 1.0) - 0.5) * (2 - EPS_TANH))


def from_theta(theta):
    return torch.tanh(theta) / (2 - EPS_TANH) + 0.5


def apply_trigger(x, mask, pattern):
    """(1 − m)·x + m·p, clipped to [0, 1]; ``mask`` broadcasts over channels."""
    mask = mask.unsqueeze(-3)
    return ((1 - mask) * x + mask * pattern).clamp(0.0, 1.0)


def initial_trigger(init, n_triggers, shape, region, generator, device):
    """Masks (T, H, W) and patterns (T, C, H, W): stored ones where given, else uniform random.
    ``region`` (opt-in, the reference's CIFAR behaviour) sets new masks to 1 over
    rows [r0, r1) and columns [c0, c1)."""
    c, h, w = shape
    masks = torch.rand((n_triggers, h, w), generator=generator, device=device)
    patterns = torch.rand((n_triggers, c, h, w), generator=generator, device=device)
    for g in range(n_triggers):
        if init[g] is not None:
            masks[g], patterns[g] = init[g][0].to(device), init[g][1].to(device)
        elif region:
            masks[g, region[0]:region[1], region[2]:region[3]] = 1.0
    return masks, patterns


def stacked_forward(template):
    """f(params, buffers, x) for a batch of models: vmap of the template's functional call."""
    def one(params, buffers, x):
        return functional_call(template, (params, buffers), (x,))

    return torch.vmap(one)


def invert_batch(template, params, buffers, requests, fp, shape, generators):
    """Solve k inversion requests at once, request i on the model (params[i], buffers[i]).

    Everything in the step loop stays on the device: success checks, the adaptive cost, the
    best-trigger bookkeeping and the re-initialisation near a new best are tensor operations;
    numbers are read out once at the end.
    """
    device = next(iter(params.values())).device
    k, T = len(requests), max(r.n_triggers for r in requests)
    N = max(len(r.x) for r in requests)
    c, h, w = shape
    x = torch.zeros((k, N, c, h, w), device=device)
    labels = torch.zeros((k, N), dtype=torch.long, device=device)
    group = torch.zeros((k, N), dtype=torch.long, device=device)
    weight = torch.zeros((k, N), device=device)
    m0 = torch.zeros((k, T, h, w), device=device)
    p0 = torch.zeros((k, T, c, h, w), device=device)
    valid = torch.zeros((k, T), dtype=torch.bool, device=device)
    for i, r in enumerate(requests):
        n = len(r.x)
        x[i, :n], labels[i, :n], group[i, :n], weight[i, :n] = r.x, r.labels, r.group, 1.0
        m0[i, :r.n_triggers], p0[i, :r.n_triggers] = initial_trigger(
            r.init, r.n_triggers, shape, fp["init_mask_region"], generators[i], device)
        valid[i, :r.n_triggers] = True
    steps = torch.tensor([r.steps for r in requests], device=device)
    cost = torch.tensor([r.cost for r in requests], device=device).unsqueeze(1).expand(k, T).clone()
    count = torch.zeros((k, T), device=device).scatter_add_(1, group, weight).clamp_min(1.0)
    theta_m, theta_p = to_theta(m0).requires_grad_(), to_theta(p0).requires_grad_()
    optimizer = torch.optim.Adam([theta_m, theta_p], lr=fp["inversion_lr"], betas=ADAM_BETAS)
    forward = stacked_forward(template)
    rows = torch.arange(k, device=device).unsqueeze(1)

    best_reg = torch.full((k, T), float("inf"), device=device)
    best_acc = torch.zeros((k, T), device=device)
    last_acc = torch.zeros((k, T), device=device)
    best_m, best_p = torch.zeros_like(m0), torch.zeros_like(p0)
    total_steps = int(max(r.steps for r in requests))
    # Uniform noise for re-initialising near a new best, drawn up front from each request's
    # generator: (steps, k, T, ...) in [-0.01, 0.01).
    noise_m = torch.zeros((total_steps, k, T, h, w), device=device)
    noise_p = torch.zeros((total_steps, k, T, c, h, w), device=device)
    for i, (r, g) in enumerate(zip(requests, generators)):
        noise_m[:r.steps, i, :r.n_triggers] = torch.rand((r.steps, r.n_triggers, h, w), generator=g, device=device)
        noise_p[:r.steps, i, :r.n_triggers] = torch.rand((r.steps, r.n_triggers, c, h, w), generator=g, device=device)
    noise_m, noise_p = 0.02 * noise_m - 0.01, 0.02 * noise_p - 0.01
    up = torch.zeros((k, T), dtype=torch.long, device=device)
    down = torch.zeros_like(up)
    for step in range(total_steps):
        active = valid & (step < steps).unsqueeze(1)
        mask, pattern = from_theta(theta_m), from_theta(theta_p)
        x_adv = apply_trigger(x, mask[rows, group], pattern[rows, group])
        logits = forward(params, buffers, x_adv)
        ce = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(k, N)
        ce_t = torch.zeros((k, T), device=device).scatter_add(1, group, ce * weight) / count
        hits = (logits.argmax(-1) == labels).float() * weight
        acc = torch.zeros((k, T), device=device).scatter_add(1, group, hits) / count
        reg = mask.abs().sum(dim=(-2, -1))
        loss = ((ce_t + cost * reg) * valid).sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        with torch.no_grad():
            success = acc >= fp["success_threshold"]
            improved = active & success & (reg < best_reg)
            best_reg = torch.where(improved, reg, best_reg)
            best_acc = torch.where(improved, acc, best_acc)
            last_acc = torch.where(active, acc, last_acc)
            best_m = torch.where(improved[..., None, None], mask, best_m)
            best_p = torch.where(improved[..., None, None, None], pattern, best_p)
            theta_m.copy_(torch.where(improved[..., None, None], to_theta(mask + noise_m[step]), theta_m))
            theta_p.copy_(torch.where(improved[..., None, None, None], to_theta(pattern + noise_p[step]), theta_p))
            up = torch.where(active, torch.where(success, up + 1, 0), up)
            down = torch.where(active, torch.where(success, 0, down + 1), down)
            raise_cost, lower_cost = up >= fp["cost_patience"], down >= fp["cost_patience"]
            cost = torch.where(raise_cost, cost * fp["cost_up"],
                               torch.where(lower_cost, cost / fp["cost_down"], cost))
            up = torch.where(raise_cost, 0, up)
            down = torch.where(lower_cost & ~raise_cost, 0, down)
    found = torch.isfinite(best_reg)
    sizes = torch.where(found, best_reg, torch.zeros_like(best_reg)).cpu().numpy()
    accuracy = torch.where(found, best_acc, last_acc).cpu().numpy()
    found = found.cpu().numpy()
    return [InvertResult(best_m[i, :r.n_triggers], best_p[i, :r.n_triggers], sizes[i, :r.n_triggers],
                         found[i, :r.n_triggers], accuracy[i, :r.n_triggers])
            for i, r in enumerate(requests)]


# ---------------------------------------------------------------------------------------------
# One client's FLIP procedure.

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


def planned_batches(n, fp):
    """How many batches a client with ``n`` samples takes in a round."""
    return min(fp["max_batch_steps"], fp["local_passes"] * -(-n // fp["batch_size"]))


@dataclass
class ClientContext:
    x: torch.Tensor          # the client's samples (n, C, H, W) on the device
    y: torch.Tensor          # labels on the device
    y_host: np.ndarray       # the same labels on the host, for scheduling decisions
    num_classes: int
    fp: dict
    state: dict              # persists across rounds
    rng: np.random.Generator     # host-side choices
    torch_gen: torch.Generator   # batch order (CPU)
    progress: RoundProgress = None


def new_state(num_classes):
    return {"warmed": False, "next_warmup_target": 0,
            "mat_warm": np.zeros((num_classes, num_classes)),
            "mat_diff": np.full((num_classes, num_classes), -np.inf),
            "triggers": {}}


def present_classes(labels, size_min):
    """Classes with more than ``size_min`` samples among ``labels``."""
    counts = np.bincount(labels)
    return [int(c) for c in np.flatnonzero(counts > size_min)]


def warmup_samples(y_host, size_min):
    """Indices of the first `size_min` samples of every class with more than that many."""
    return np.concatenate([np.flatnonzero(y_host == c)[:size_min]
                           for c in present_classes(y_host, size_min)] or [np.zeros(0, dtype=np.int64)])


def stamp_portion(xb, positions, count, trigger, rng):
    """Stamp ``trigger`` on ``count`` randomly chosen samples among ``positions`` of ``xb``."""
    if count <= 0:
        return xb
    chosen = torch.as_tensor(rng.choice(positions, count, replace=False), device=xb.device)
    xb = xb.clone()
    xb[chosen] = apply_trigger(xb[chosen], trigger[0], trigger[1])
    return xb


def choose_pair(ctx, present, previous_source):
    """(source, target): with probability `explore_prob` a random present source and another
    target; else the pair with the largest mat_diff whose source is present and differs from the
    previous pair's source. None when no pair qualifies."""
    if ctx.rng.random() < ctx.fp["explore_prob"]:
        source = int(ctx.rng.choice(present))
        target = int(ctx.rng.choice([t for t in range(ctx.num_classes) if t != source]))
        return source, target
    diff = ctx.state["mat_diff"]
    for flat in np.argsort(-diff, axis=None, kind="stable"):
        s, t = divmod(int(flat), ctx.num_classes)
        if s != t and s in present and s != previous_source and np.isfinite(diff[s, t]):
            return s, t
    return None


def update_matrices(state, direction, sizes):
    """After a pair's batches: record its mean trigger size, and in mat_diff the relative change
    from the previous size, averaged with the old value (decayed by ½)."""
    s, t = direction
    size = float(np.mean(sizes))
    last = state["mat_warm"][s, t]
    if last == 0:
        state["mat_warm"][s, t] = size
        state["mat_diff"][s, t] = 0.0
        return
    state["mat_diff"][s, t] = (state["mat_diff"][s, t] + (size - last) / last) / 2
    if size != 0:
        state["mat_warm"][s, t] = size


def stored_trigger(result, g):
    """Trigger g of an inversion result as host tensors of its own: a view would keep (and
    checkpoint) the whole batched buffer it came from."""
    return result.masks[g].to("cpu", copy=True), result.patterns[g].to("cpu", copy=True)


def warmup_step(ctx, target, extra, xb, yb, stats):
    """Invert a universal trigger toward ``target`` from the warm-up samples of every other class;
    record it for each source class; return the batch with the trigger stamped on a portion of
    its non-target samples."""
    state = ctx.state
    src = extra[ctx.y_host[extra] != target]
    result = None
    if len(src):
        result = yield Invert(ctx.x[src], torch.full((len(src),), target, device=ctx.x.device),
                              torch.zeros(len(src), dtype=torch.long, device=ctx.x.device), 1,
                              ctx.fp["warmup_steps"], ctx.fp["init_cost"], [None])
        stats.record(result)
    sources = set(ctx.y_host[src].tolist())
    found = float(result.sizes[0]) if result is not None else 0.0
    stored = stored_trigger(result, 0) if found > 0 else None
    for s in range(ctx.num_classes):
        if s == target:
            continue
        size = found if s in sources else 0.0
        state["mat_warm"][s, target] = state["mat_diff"][s, target] = size
        if size > 0:
            state["triggers"][(s, target)] = stored
    if result is None or not result.success[0]:
        return xb
    others = np.flatnonzero(yb != target)
    count = int(len(others) * ctx.fp["portion"])
    if count > 0:
        stats.stamped[target] += 1
    return stamp_portion(xb, others, count, (result.masks[0], result.patterns[0]), ctx.rng)


def inversion_budget(fp, combo, later, failed):
    """(steps, cost) of a pair inversion, scheduled as in the reference code: a pair's first batch
    `pair_steps` at `init_cost`; a later batch after a failure the retry budget at `init_cost`,
    after a success the refine budget; combo and single-direction inversions have their own."""
    if not later:
        return fp["pair_steps"], fp["init_cost"]
    if failed:
        return fp["retry_steps" if combo else "single_retry_steps"], fp["init_cost"]
    if combo:
        return fp["refine_steps"], fp["refine_cost"]
    return fp["single_refine_steps"], fp["single_refine_cost"]


def stored_size(state, direction):
    """L1 size of the stored trigger of ``direction``, or None when there is none."""
    trigger = state["triggers"].get(direction)
    return float(trigger[0].abs().sum()) if trigger is not None else None


def pair_step(ctx, pair, later, failed, xb, yb, present, stats):
    """Invert s→t (and t→s when both classes are present: the "combo") on this batch.

    Returns (stamped batch, sizes, failed). A trigger larger than the cap skips the batch as in
    the reference: (None, None, ``failed`` unchanged). Otherwise ``sizes`` maps each direction to
    its new trigger's size, or, where the inversion failed, to the size of the stored trigger it
    started from (the reference records that one; a failure is not a trigger of size 0)."""
    s, t = pair
    idx_s, idx_t = np.flatnonzero(yb == s), np.flatnonzero(yb == t)
    combo = t in present
    directions = [(s, t), (t, s)] if combo else [(s, t)]
    idx = np.concatenate([idx_s, idx_t]) if combo else idx_s
    device = ctx.x.device
    labels = np.concatenate([np.full(len(idx_s), t), np.full(len(idx_t), s)]) if combo else np.full(len(idx_s), t)
    group = np.concatenate([np.zeros(len(idx_s)), np.ones(len(idx_t))]) if combo else np.zeros(len(idx_s))
    steps, cost = inversion_budget(ctx.fp, combo, later, failed)
    result = yield Invert(xb[torch.as_tensor(idx, device=device)], torch.as_tensor(labels, device=device),
                          torch.as_tensor(group, dtype=torch.long, device=device), len(directions),
                          steps, cost, [ctx.state["triggers"].get(d) for d in directions])
    stats.record(result)
    h, w = xb.shape[-2:]
    if result.sizes.max() > ctx.fp["max_trigger_frac"] * h * w:
        stats.oversize_skips += 1
        return None, None, failed
    length = int((min(len(idx_s), len(idx_t)) if combo else len(idx_s)) * ctx.fp["portion"])
    sizes = {}
    for g, (d, positions) in enumerate(zip(directions, (idx_s, idx_t))):
        if result.success[g]:
            ctx.state["triggers"][d] = stored_trigger(result, g)
            xb = stamp_portion(xb, positions, length, (result.masks[g], result.patterns[g]), ctx.rng)
            sizes[d] = float(result.sizes[g])
            if length > 0:
                stats.stamped[d[1]] += 1
        elif stored_size(ctx.state, d) is not None:
            sizes[d] = stored_size(ctx.state, d)
    return xb, sizes, not result.success.all()


def client_batches(n, fp, generator):
    """Batch indices over `local_passes` shuffled passes, at most `max_batch_steps` batches."""
    count = 0
    for _ in range(fp["local_passes"]):
        for idx in torch.randperm(n, generator=generator).split(fp["batch_size"]):
            if count >= fp["max_batch_steps"]:
                return
            count += 1
            yield idx


def client_program(ctx):
    """The FLIP procedure of one benign client for one round (a generator of requests).

    The first `num_classes` batches are the warm-up slot: a first-time client inverts one
    universal trigger per batch there; a returning client starts a new class pair on every batch
    of it (the reference's schedule). From then on a pair lasts `pair_batches` batches, and the
    matrices are updated when a pair ends."""
    fp, state, stats = ctx.fp, ctx.state, ClientStats()
    targets = [] if state["warmed"] else list(range(state["next_warmup_target"], ctx.num_classes))
    extra = warmup_samples(ctx.y_host, fp["size_min"])
    pair, pair_batch, previous_source, sizes, failed = None, 0, None, {}, False
    for batch_index, idx in enumerate(client_batches(len(ctx.y_host), fp, ctx.torch_gen)):
        if ctx.progress is not None:
            ctx.progress.batches += 1
        rows = idx.to(ctx.x.device)
        xb, yb, yb_device = ctx.x[rows], ctx.y_host[idx.numpy()], ctx.y[rows]
        if targets:
            xb = yield from warmup_step(ctx, targets.pop(0), extra, xb, yb, stats)
            state["next_warmup_target"] = ctx.num_classes - len(targets)
            if not targets:
                state["warmed"] = True
                top = state["mat_diff"].max()
                if top > 0:
                    state["mat_diff"] /= top
            stats.hardened += 1
            yield Harden(xb, yb_device)
            continue
        present = present_classes(yb, fp["size_min"])
        if pair_batch == 0:
            pair = choose_pair(ctx, present, previous_source) if present else None
            if pair is None:
                continue
            previous_source, sizes, failed = pair[0], {}, False
        later = pair_batch > 0
        pair_length = 1 if batch_index < ctx.num_classes else fp["pair_batches"]
        pair_batch = (pair_batch + 1) % pair_length
        found = None
        if pair[0] in present:
            xb, found, failed = yield from pair_step(ctx, pair, later, failed, xb, yb, present, stats)
            for d, size in (found or {}).items():
                sizes.setdefault(d, []).append(size)
        if pair_batch == 0 and found is not None:
            for d, values in sizes.items():
                update_matrices(state, d, values)
        if found is not None:
            stats.hardened += 1
            yield Harden(xb, yb_device)
    return stats


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
    """Answer the pending requests of clients ``indices``: inversions batched (one call per step
    count), hardening steps client by client."""
    inverting = [i for i in indices if isinstance(pending[i], Invert)]
    answers = {}
    # One batched call per step count, so that no request is padded to a longer one's steps.
    for steps in sorted({pending[i].steps for i in inverting}):
        group = [i for i in inverting if pending[i].steps == steps]
        with timer("inversion"):
            params, buffers = models.frozen_stack(group)
            results = invert_batch(template, params, buffers, [pending[i] for i in group], fp, shape,
                                   [generators[i] for i in group])
        answers.update(zip(group, results))
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
