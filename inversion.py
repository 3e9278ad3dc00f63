"""FLIP's trigger inversion kernel (docs/algorithms.md §4): Neural-Cleanse style masks and patterns,
tanh-reparameterised, with the adaptive cost, solved for many requests at once over stacked,
frozen client models (``invert_batch``).

Requests of different lengths share one batched loop; a request leaves the stacked batch as soon
as it has run its steps (or, with the opt-in adaptive budget, once its best trigger has stopped
improving), so no FLOPs go to finished requests. Requests of different image counts are padded to
one stacked batch; on a CPU, where padded images cost their full FLOPs, the forward and backward
passes run per request over its own images only, the requests spread over torch's threads
(``Solver``). Every constant comes from the YAML group `flip`.
"""

import copy
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call

EPS_TANH = 1e-7  # value = tanh(theta) / (2 - EPS_TANH) + 0.5 keeps atanh finite at 0 and 1

ADAM_BETAS = (0.5, 0.9)

INVERSION_KINDS = ("warmup", "pair", "refine", "retry", "single_refine", "single_retry")


@dataclass
class Invert:
    """Find up to two triggers at once: trigger g turns the samples whose ``group`` is g into
    their ``labels``. ``init`` holds a stored (mask, pattern) per trigger, or None (random).
    ``kind`` (one of INVERSION_KINDS) only labels the request in the profile."""
    x: torch.Tensor
    labels: torch.Tensor
    group: torch.Tensor
    n_triggers: int
    steps: int
    cost: float
    init: list
    kind: str = "pair"


@dataclass
class InvertResult:
    masks: torch.Tensor      # (T, H, W) best mask per trigger (zeros where none succeeded)
    patterns: torch.Tensor   # (T, C, H, W)
    sizes: np.ndarray        # (T,) L1 of the best mask; 0 where no trigger succeeded
    success: np.ndarray      # (T,) bool
    accuracy: np.ndarray     # (T,) stamped accuracy of the returned trigger
    steps_run: int = 0       # Adam steps run (fewer than requested when the adaptive budget stops early)
    last_improved: np.ndarray = None  # (T,) steps run when the best trigger last improved; 0: never


def to_theta(value):
    """Inverse of the tanh reparameterisation."""
    return torch.atanh((value.clamp(0.0, 1.0) - 0.5) * (2 - EPS_TANH))


def from_theta(theta):
    return torch.tanh(theta) / (2 - EPS_TANH) + 0.5


def apply_trigger(x, mask, pattern):
    """(1 − m)·x + m·p, clipped to [0, 1]; ``mask`` broadcasts over channels."""
    mask = mask.unsqueeze(-3)
    return ((1 - mask) * x + mask * pattern).clamp(0.0, 1.0)


def per_image(values, group):
    """Each image's trigger: ``values`` (..., T, *trigger shape) picked by ``group`` (..., N),
    broadcastable to (..., N, *trigger shape). Written as broadcast ``where``s, not as indexing:
    the backward of an index with repeated entries accumulates in parallel on a multi-threaded
    CPU, and from 64 images on its sums changed from run to run (torch 2.15, two threads)."""
    dim = group.dim() - 1
    group = group.view(*group.shape, *[1] * (values.dim() - dim - 1))
    out = values.select(dim, 0).unsqueeze(dim)
    for g in range(1, values.shape[dim]):
        out = torch.where(group == g, values.select(dim, g).unsqueeze(dim), out)
    return out


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


def stack_requests(requests, fp, shape, generators, device):
    """The requests as one padded batch: a dict of tensors whose first dimension is the request.
    Each request's generator draws its initial trigger, then its re-initialisation noise for every
    step it may run (uniform in [-0.01, 0.01)), in that order."""
    k, T = len(requests), max(r.n_triggers for r in requests)
    N, S = max(len(r.x) for r in requests), max(r.steps for r in requests)
    c, h, w = shape
    b = {"x": torch.zeros((k, N, c, h, w), device=device),
         "labels": torch.zeros((k, N), dtype=torch.long, device=device),
         "group": torch.zeros((k, N), dtype=torch.long, device=device),
         "weight": torch.zeros((k, N), device=device),
         "m0": torch.zeros((k, T, h, w), device=device), "p0": torch.zeros((k, T, c, h, w), device=device),
         "valid": torch.zeros((k, T), dtype=torch.bool, device=device),
         "noise_m": torch.zeros((k, S, T, h, w), device=device),
         "noise_p": torch.zeros((k, S, T, c, h, w), device=device)}
    for i, (r, g) in enumerate(zip(requests, generators)):
        n, t = len(r.x), r.n_triggers
        b["x"][i, :n], b["labels"][i, :n], b["group"][i, :n], b["weight"][i, :n] = r.x, r.labels, r.group, 1.0
        b["m0"][i, :t], b["p0"][i, :t] = initial_trigger(r.init, t, shape, fp["init_mask_region"], g, device)
        b["valid"][i, :t] = True
        b["noise_m"][i, :r.steps, :t] = torch.rand((r.steps, t, h, w), generator=g, device=device)
        b["noise_p"][i, :r.steps, :t] = torch.rand((r.steps, t, c, h, w), generator=g, device=device)
    b["noise_m"], b["noise_p"] = 0.02 * b["noise_m"] - 0.01, 0.02 * b["noise_p"] - 0.01
    b["count"] = torch.zeros((k, T), device=device).scatter_add_(1, b["group"], b["weight"]).clamp_min(1.0)
    b["cost"] = torch.tensor([float(r.cost) for r in requests], device=device).unsqueeze(1).expand(k, T).clone()
    b["best_reg"] = torch.full((k, T), float("inf"), device=device)
    b["ref_reg"] = torch.full((k, T), float("inf"), device=device)
    for name in ("best_acc", "last_acc"):
        b[name] = torch.zeros((k, T), device=device)
    for name in ("up", "down", "stale", "last_improved"):
        b[name] = torch.zeros((k, T), dtype=torch.long, device=device)
    b["best_m"], b["best_p"] = torch.zeros_like(b["m0"]), torch.zeros_like(b["p0"])
    return b


def adaptive_done(b, steps_run, fp):
    """Requests (bool, host) whose every trigger has either stopped improving by more than
    `adaptive_min_gain` of its size for `adaptive_patience` steps after its first success, or not
    succeeded by step `adaptive_give_up`."""
    found = torch.isfinite(b["best_reg"])
    settled = found & (b["stale"] >= fp["adaptive_patience"])
    if fp["adaptive_give_up"] is not None:
        settled |= ~found & (steps_run >= fp["adaptive_give_up"])
    return (settled | ~b["valid"]).all(dim=1).cpu().numpy()


PER_IMAGE = ("x", "labels", "group", "weight")  # batch entries of shape (k, N, ...)


def channels_last(t):
    """A 4-d tensor restrided to channels-last (also when a dimension of size 1 makes it look
    contiguous already; the convolution picks its layout from the strides); others unchanged."""
    return torch.empty_like(t, memory_format=torch.channels_last).copy_(t) if t.dim() == 4 else t


class ImageConv2d(nn.Conv2d):
    """A Conv2d on the input images, computed by torch's native im2col + GEMM convolution
    (``aten.thnn_conv2d``, NCHW) instead of oneDNN's, whose backward-data convolution is slow for
    a layer with an image's 1–3 input channels: forward and input gradient of 8 images take
    0.20 ms against oneDNN's 1.05 ms for MnistNet's first layer, 0.46 against 0.92 ms for the
    CIFAR ResNet's, on one CPU thread. The output is returned channels-last for the oneDNN layers
    after it."""

    def forward(self, x):
        out = torch.ops.aten.thnn_conv2d(x.contiguous(), self.weight, self.kernel_size, self.bias, self.stride,
                                         self.padding)
        return channels_last(out)


def request_models(template, params, buffers):
    """One frozen module per request: a copy of ``template`` holding request i's parameters
    and buffers, so that requests can run on separate threads. Weights are channels-last for
    oneDNN, except an ImageConv2d's, which the native convolution reads in NCHW."""
    # the copies leave out the template's own tensors (memo: None), replaced just below
    memo = {id(t): None for t in [*template.parameters(), *template.buffers()]}
    models = []
    for i in range(len(next(iter(params.values())))):
        model = copy.deepcopy(template, dict(memo))
        for name, value in params.items():
            module, _, attr = name.rpartition(".")
            owner = model.get_submodule(module)
            value = value[i] if isinstance(owner, ImageConv2d) else channels_last(value[i])
            setattr(owner, attr, nn.Parameter(value, requires_grad=False))
        for name, value in buffers.items():
            module, _, attr = name.rpartition(".")
            setattr(model.get_submodule(module), attr, value[i])
        models.append(model)
    return models


@contextmanager
def request_threads(workers):
    """A pool of ``workers`` threads, each running torch ops on one intra-op thread, and the
    caller's ops on one thread too while it is open (requests run side by side instead of each
    op being split across threads: small per-request convolutions scale poorly when split).
    Yields the pool's ``map``, or the built-in ``map`` for one worker."""
    if workers <= 1:
        yield map
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            yield pool.map
    finally:
        torch.set_num_threads(threads)


def with_image_convs(template, channels):
    """A copy of ``template`` whose plain convolutions with ``channels`` input channels (the
    layers that read the images) are ImageConv2d, under the same parameter names."""
    model = copy.deepcopy(template)
    for parent in list(model.modules()):
        for name, conv in list(parent.named_children()):
            if (type(conv) is nn.Conv2d and conv.in_channels == channels and conv.groups == 1
                    and conv.dilation == (1, 1) and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)):
                image_conv = ImageConv2d(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride,
                                         conv.padding, conv.dilation, bias=conv.bias is not None)
                image_conv.to(conv.weight).load_state_dict(conv.state_dict())
                setattr(parent, name, image_conv.requires_grad_(False))
    return model


class Solver:
    """The live part of a batched inversion, for the requests still running: the stacked batch
    (requests sorted by image count, descending), their models (stacked, or one per request) and
    the Adam state; ``drop`` removes finished ones and trims the padding they needed.

    The forward and backward passes run either per request, over its own images only, on its own
    module in channels-last layout, the requests spread over ``map_requests``'s threads (``per_request``,
    the default on a CPU: padding costs its full FLOPs there and the layout is ~1.4x faster; the
    image layers in NCHW by ``ImageConv2d``), or as one vmapped call over the padded
    stack (on an accelerator, where kernel launches cost more than padding). Both compute the
    same numbers up to float rounding."""

    def __init__(self, template, batch, params, buffers, sizes, fp, per_request, map_requests=map):
        self.per_request, self.map_requests = per_request, map_requests
        self.b, self.sizes = batch, np.asarray(sizes)
        # the stacked parameters serve the vmapped pass only; the per-request pass has its modules
        self.params, self.buffers = ({}, {}) if per_request else (params, buffers)
        self.theta_m = to_theta(batch.pop("m0")).requires_grad_()
        self.theta_p = to_theta(batch.pop("p0")).requires_grad_()
        self.optimizer = torch.optim.Adam([self.theta_m, self.theta_p], lr=fp["inversion_lr"], betas=ADAM_BETAS)
        self.stacked = torch.vmap(lambda p, b, x: functional_call(template, (p, b), (x,)))
        self.models = request_models(with_image_convs(template, batch["x"].shape[2]), params, buffers) \
            if per_request else []

    def drop(self, keep):
        """Keep only the requests at positions ``keep`` (a sorted numpy index array)."""
        self.sizes = self.sizes[keep]
        width = int(self.sizes.max())
        if self.per_request:
            self.models = [self.models[i] for i in keep]
        keep = torch.as_tensor(keep, device=self.theta_m.device)
        self.b = {k: v[keep][:, :width] if k in PER_IMAGE else v[keep] for k, v in self.b.items()}
        self.params = {k: v[keep] for k, v in self.params.items()}
        self.buffers = {k: v[keep] for k, v in self.buffers.items()}
        old = self.optimizer
        thetas = [self.theta_m.detach()[keep].requires_grad_(), self.theta_p.detach()[keep].requires_grad_()]
        self.optimizer = torch.optim.Adam(thetas, **{k: old.defaults[k] for k in ("lr", "betas")})
        for before, after in zip((self.theta_m, self.theta_p), thetas):
            state = old.state[before]
            self.optimizer.state[after] = {"step": state["step"], "exp_avg": state["exp_avg"][keep],
                                           "exp_avg_sq": state["exp_avg_sq"][keep]}
        self.theta_m, self.theta_p = thetas

    def backward(self, mask, pattern, reg):
        """Backpropagate the loss Σ valid·(mean cross-entropy of the trigger's stamped images
        + cost·mask L1) into the thetas; returns each trigger's stamped accuracy (k, T)."""
        b = self.b
        reg_loss = (b["cost"] * reg * b["valid"]).sum()
        if not self.per_request:
            x_adv = apply_trigger(b["x"], per_image(mask, b["group"]), per_image(pattern, b["group"]))
            ce_t, acc = trigger_loss(self.stacked(self.params, self.buffers, x_adv), b["labels"], b["group"],
                                     b["weight"], b["count"])
            (reg_loss + (ce_t * b["valid"]).sum()).backward()
            return acc
        leaves = [(m.detach().requires_grad_(), p.detach().requires_grad_()) for m, p in zip(mask, pattern)]
        out = list(self.map_requests(self.request_gradient, range(len(leaves)), leaves))
        torch.autograd.backward([reg_loss, mask, pattern],
                                [None, torch.stack([o[0] for o in out]), torch.stack([o[1] for o in out])])
        return torch.stack([o[2] for o in out])

    def request_gradient(self, i, leaves):
        """Request i alone (its own images and module): the gradient of its cross-entropy terms
        with respect to its masks and patterns, and its triggers' stamped accuracy."""
        b, n, (mask, pattern) = self.b, self.sizes[i], leaves
        group, labels = b["group"][i, :n], b["labels"][i, :n]
        x_adv = apply_trigger(b["x"][i, :n], per_image(mask, group), per_image(pattern, group))
        logits = self.models[i](x_adv)
        ce_t, acc = trigger_loss(logits, labels, group, b["weight"][i, :n], b["count"][i])
        grad_mask, grad_pattern = torch.autograd.grad((ce_t * b["valid"][i]).sum(), (mask, pattern))
        return grad_mask, grad_pattern, acc


def trigger_loss(logits, labels, group, weight, count):
    """Per trigger (last dimension T): the mean cross-entropy and the accuracy of its stamped
    images, from logits (..., N, classes) and per-image labels, trigger index and weight."""
    ce = F.cross_entropy(logits.flatten(0, -2), labels.flatten(), reduction="none").view(labels.shape)
    zeros = torch.zeros_like(count)
    ce_t = zeros.scatter_add(-1, group, ce * weight) / count
    acc = zeros.scatter_add(-1, group, (logits.argmax(-1) == labels).float() * weight) / count
    return ce_t, acc


def adam_step(s, fp, step):
    """One Adam step of every live request, then the success, best-trigger, re-initialisation
    and cost bookkeeping as tensor operations (no host synchronisation)."""
    b = s.b
    mask, pattern = from_theta(s.theta_m), from_theta(s.theta_p)
    reg = mask.abs().sum(dim=(-2, -1))
    s.optimizer.zero_grad(set_to_none=True)
    acc = s.backward(mask, pattern, reg)
    s.optimizer.step()
    with torch.no_grad():
        valid = b["valid"]
        success = acc >= fp["success_threshold"]
        improved = valid & success & (reg < b["best_reg"])
        b["best_reg"] = torch.where(improved, reg, b["best_reg"])
        b["best_acc"] = torch.where(improved, acc, b["best_acc"])
        b["last_acc"] = torch.where(valid, acc, b["last_acc"])
        b["best_m"] = torch.where(improved[..., None, None], mask, b["best_m"])
        b["best_p"] = torch.where(improved[..., None, None, None], pattern, b["best_p"])
        s.theta_m.copy_(torch.where(improved[..., None, None], to_theta(mask + b["noise_m"][:, step]), s.theta_m))
        s.theta_p.copy_(torch.where(improved[..., None, None, None], to_theta(pattern + b["noise_p"][:, step]),
                                    s.theta_p))
        b["last_improved"] = torch.where(improved, step + 1, b["last_improved"])
        gain = improved & (reg < b["ref_reg"] * (1 - fp["adaptive_min_gain"]))
        b["ref_reg"] = torch.where(gain, reg, b["ref_reg"])
        b["stale"] = torch.where(gain, 0, torch.where(valid & torch.isfinite(b["best_reg"]), b["stale"] + 1, b["stale"]))
        up = torch.where(valid, torch.where(success, b["up"] + 1, 0), b["up"])
        down = torch.where(valid, torch.where(success, 0, b["down"] + 1), b["down"])
        raise_cost, lower_cost = up >= fp["cost_patience"], down >= fp["cost_patience"]
        b["cost"] = torch.where(raise_cost, b["cost"] * fp["cost_up"],
                                torch.where(lower_cost, b["cost"] / fp["cost_down"], b["cost"]))
        b["up"] = torch.where(raise_cost, 0, up)
        b["down"] = torch.where(lower_cost & ~raise_cost, 0, down)


def collect(b, positions, steps_run):
    """InvertResults of the live requests at ``positions`` (host reads, once per request)."""
    found = torch.isfinite(b["best_reg"][positions])
    sizes = torch.where(found, b["best_reg"][positions], 0.0).cpu().numpy()
    accuracy = torch.where(found, b["best_acc"][positions], b["last_acc"][positions]).cpu().numpy()
    last = b["last_improved"][positions].cpu().numpy()
    found = found.cpu().numpy()
    return [InvertResult(b["best_m"][p], b["best_p"][p], sizes[j], found[j], accuracy[j], steps_run, last[j])
            for j, p in enumerate(positions.tolist())]


def invert_batch(template, params, buffers, requests, fp, shape, generators, per_request=None):
    """Solve k inversion requests at once, request i on the model (params[i], buffers[i]);
    returns one InvertResult per request, trimmed to its own trigger count. ``per_request``
    (default: on a CPU) picks the Solver's forward pass."""
    device = next(iter(params.values())).device
    sizes = np.array([len(r.x) for r in requests])
    ids = np.argsort(-sizes, kind="stable")          # original position of each live request
    order = torch.as_tensor(ids, device=device)
    per_request = device.type == "cpu" if per_request is None else per_request
    with request_threads(min(torch.get_num_threads(), len(requests)) if per_request else 1) as pool_map:
        s = Solver(template, stack_requests([requests[i] for i in ids], fp, shape, [generators[i] for i in ids], device),
                   {k: v[order] for k, v in params.items()}, {k: v[order] for k, v in buffers.items()}, sizes[ids],
                   fp, per_request, pool_map)
        results = solve(s, requests, ids, fp, device)
    return [InvertResult(res.masks[:r.n_triggers], res.patterns[:r.n_triggers], res.sizes[:r.n_triggers],
                         res.success[:r.n_triggers], res.accuracy[:r.n_triggers], res.steps_run,
                         res.last_improved[:r.n_triggers])
            for res, r in zip(results, requests)]


def solve(s, requests, ids, fp, device):
    """Run the Solver's steps until every request has finished; the InvertResults in the
    requests' order (``ids``: the original position of each live request)."""
    budgets = np.array([r.steps for r in requests])
    results = [None] * len(requests)
    adaptive = fp["adaptive_budget"]
    for step in range(int(budgets.max())):
        adam_step(s, fp, step)
        run = step + 1
        done = budgets[ids] <= run
        if adaptive and run % fp["adaptive_check_every"] == 0:
            done |= adaptive_done(s.b, run, fp)
        if not done.any():
            continue
        finished = torch.as_tensor(np.flatnonzero(done), device=device)
        for i, result in zip(ids[done], collect(s.b, finished, run)):
            results[i] = result
        ids = ids[~done]
        if not len(ids):
            break
        s.drop(np.flatnonzero(~done))
    return results
