"""One benign client's FLIP procedure for one round (docs/algorithms.md §4), as plain sequential code.

``client_program`` is a generator: it *yields* requests (``Invert``: find the smallest trigger
turning some samples into a label; ``Harden``: one Adam step of the client's model on a batch)
and receives their results; the executor in invert.py answers them, for many clients at once.
The client's matrices and stored triggers persist across rounds in ``state``.
"""

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch

from inversion import Invert, apply_trigger


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
    profile: dict = field(default_factory=dict)  # inversion kind -> [(images, steps asked, steps run, last improvement)]

    def record(self, request, result):
        """Count one inversion, keep its triggers' sizes and stamped accuracies, and profile it."""
        self.inversions += 1
        self.mask_l1.extend(result.sizes.tolist())
        self.success.extend(result.accuracy.tolist())
        self.profile.setdefault(request.kind, []).append(
            (len(request.x), request.steps, result.steps_run, int(result.last_improved.max())))

    def as_dict(self):
        return {"inversions": self.inversions,
                "mask_l1": float(np.mean(self.mask_l1)) if self.mask_l1 else 0.0,
                "success": float(np.mean(self.success)) if self.success else 0.0,
                "hardened": self.hardened, "oversize_skips": self.oversize_skips,
                "stamped": dict(self.stamped), "profile": self.profile}


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
    progress: object = None  # invert.RoundProgress: counts batches for the progress log


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
        request = Invert(ctx.x[src], torch.full((len(src),), target, device=ctx.x.device),
                         torch.zeros(len(src), dtype=torch.long, device=ctx.x.device), 1,
                         ctx.fp["warmup_steps"], ctx.fp["init_cost"], [None], "warmup")
        result = yield request
        stats.record(request, result)
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
    """(steps, cost, kind) of a pair inversion, scheduled as in the reference code: a pair's first
    batch `pair_steps` at `init_cost`; a later batch after a failure the retry budget at
    `init_cost`, after a success the refine budget; combo and single-direction inversions have
    their own."""
    if not later:
        return fp["pair_steps"], fp["init_cost"], "pair"
    if failed:
        if combo:
            return fp["retry_steps"], fp["init_cost"], "retry"
        return fp["single_retry_steps"], fp["init_cost"], "single_retry"
    if combo:
        return fp["refine_steps"], fp["refine_cost"], "refine"
    return fp["single_refine_steps"], fp["single_refine_cost"], "single_refine"


def capped(idx_s, idx_t, cap, rng):
    """At most ``cap`` images for a pair inversion (`max_pair_images`, adaptive budget only),
    split evenly between the two directions, chosen at random; sorted as given."""
    if cap is None or len(idx_s) + len(idx_t) <= cap:
        return idx_s, idx_t
    half_t = min(len(idx_t), cap // 2) if len(idx_t) else 0
    half_s = min(len(idx_s), cap - half_t)
    half_t = min(len(idx_t), cap - half_s)
    return (np.sort(rng.choice(idx_s, half_s, replace=False)),
            np.sort(rng.choice(idx_t, half_t, replace=False)) if half_t else idx_t[:0])


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
    inv_s, inv_t = idx_s, (idx_t if combo else idx_t[:0])
    if ctx.fp["adaptive_budget"]:
        inv_s, inv_t = capped(inv_s, inv_t, ctx.fp["max_pair_images"], ctx.rng)
    device = ctx.x.device
    labels = np.concatenate([np.full(len(inv_s), t), np.full(len(inv_t), s)])
    group = np.concatenate([np.zeros(len(inv_s)), np.ones(len(inv_t))])
    steps, cost, kind = inversion_budget(ctx.fp, combo, later, failed)
    request = Invert(xb[torch.as_tensor(np.concatenate([inv_s, inv_t]), device=device)],
                     torch.as_tensor(labels, device=device), torch.as_tensor(group, dtype=torch.long, device=device),
                     len(directions), steps, cost, [ctx.state["triggers"].get(d) for d in directions], kind)
    result = yield request
    stats.record(request, result)
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
