"""FLIP client tests on a MnistNet with a planted patch backdoor (real Fashion-MNIST)."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import invert
import inversion
from defenses.flip import resolve_settings as resolve_flip_params
from image_helper import FederatedData, iid_split, load_arrays, stamp, trigger_mask
from models import build_model
from test import predict

TARGET = 2
PATCH = [[r, c] for r in range(24, 27) for c in range(24, 27)]  # 3x3 white square, 9 pixels
SMALL_FLIP = {"warmup_steps": 150, "pair_steps": 100, "refine_steps": 30, "retry_steps": 60,
              "local_passes": 2, "max_batch_steps": 14, "batch_size": 128}


def flip_params(**overrides):
    fp = resolve_flip_params({**SMALL_FLIP, **overrides}, "fashion_mnist")
    return {"flip": fp}


@pytest.fixture(scope="module")
def backdoored(tmp_path_factory):
    """A MnistNet trained on 12k Fashion-MNIST images, 10 % of them stamped with a 3x3 patch and
    relabelled to class 2; plus clean client data for hardening and a test set."""
    torch.manual_seed(0)
    data_dir = tmp_path_factory.mktemp("data")
    train_x, train_y, test_x, test_y = load_arrays({"type": "fashion_mnist", "data_dir": str(data_dir)})
    train_x, train_y = train_x[:12000], train_y[:12000]
    client_x, client_y = train_x[12000 - 3000:], train_y[12000 - 3000:]
    x, y = train_x[:9000].clone(), train_y[:9000].clone()
    mask = trigger_mask(PATCH, 28, 28)
    poison = torch.arange(0, 9000, 10)
    x[poison], y[poison] = stamp(x[poison], mask), TARGET
    model = build_model("MnistNet", (1, 28, 28), 10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        for idx in torch.randperm(9000, generator=g).split(64):
            opt.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    return {"model": model.eval(), "mask": mask, "test_x": test_x[:3000], "test_y": test_y[:3000],
            "client_x": client_x, "client_y": client_y}


@pytest.fixture
def float64():
    """Run a test in double precision. Elementwise kernels round the tail of a tensor that is no
    multiple of their vector width differently (FMA or not), so the same request computes
    different last bits alone and in a stack; the discrete success and re-initialisation
    decisions of a long inversion can turn float32 last-bit differences into different triggers.
    In float64 such differences stay far below the tolerance, so equality checks test the batching."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


def accuracies(model, bd):
    pred, _ = predict(model, bd["test_x"], 1000)
    ma = float((pred == bd["test_y"]).float().mean()) * 100
    keep = bd["test_y"] != TARGET
    pred_bd, _ = predict(model, bd["test_x"][keep], 1000, bd["mask"])
    return ma, float((pred_bd == TARGET).float().mean()) * 100


def universal_trigger(model, x, target, steps=300, seed=0, **flip):
    fp = resolve_flip_params(flip, "fashion_mnist")
    params, buffers = invert.ClientModels(model, model.state_dict(), 1, 0.01).frozen_stack([0])
    request = inversion.Invert(x, torch.full((len(x),), target), torch.zeros(len(x), dtype=torch.long), 1,
                            steps, fp["init_cost"], [None])
    return inversion.invert_batch(model, params, buffers, [request], fp, (1, 28, 28),
                               [torch.Generator().manual_seed(seed)])[0]


def test_planted_backdoor_is_planted(backdoored):
    ma, ba = accuracies(backdoored["model"], backdoored)
    assert ma > 75 and ba > 95


def test_inversion_finds_the_planted_patch(backdoored):
    model, bd = backdoored["model"], backdoored
    x = bd["test_x"][bd["test_y"] != TARGET][:60]
    toward_target = universal_trigger(model, x, TARGET)
    assert toward_target.success[0]
    mask = toward_target.masks[0]
    l1 = float(mask.sum())
    assert l1 < 20, l1
    on_patch = float(mask[bd["mask"]].sum()) / l1
    assert on_patch > 0.5, on_patch
    clean_label = 1  # trousers: no backdoor leads there
    x_clean = bd["test_x"][bd["test_y"] != clean_label][:60]
    toward_clean = universal_trigger(model, x_clean, clean_label)
    clean_l1 = float(toward_clean.sizes[0]) if toward_clean.success[0] else 28 * 28
    assert clean_l1 > 3 * l1, (clean_l1, l1)


def test_adaptive_budget_stops_early_with_a_trigger_as_small_as_the_full_budgets(backdoored):
    model, bd = backdoored["model"], backdoored
    x = bd["test_x"][bd["test_y"] != TARGET][:60]
    full = universal_trigger(model, x, TARGET, steps=600)
    adaptive = universal_trigger(model, x, TARGET, steps=600, adaptive_budget=True, adaptive_patience=40,
                                 adaptive_min_gain=0.01)
    print(f"full: {full.sizes[0]:.2f} px, last improved at {full.last_improved[0]}; adaptive: "
          f"{adaptive.sizes[0]:.2f} px after {adaptive.steps_run} steps")
    assert full.steps_run == 600 and full.success[0] and adaptive.success[0]
    assert adaptive.steps_run < 400, adaptive.steps_run
    assert float(adaptive.sizes[0]) <= 1.25 * float(full.sizes[0]) + 1.0, (adaptive.sizes, full.sizes)
    # the full budget still improves after the adaptive stop, but by little (the bound above)
    assert adaptive.steps_run < int(full.last_improved[0]) <= 600
    # no success by the give-up step: stopped there, reported as failed
    hopeless = universal_trigger(model, x, TARGET, steps=600, adaptive_budget=True, adaptive_give_up=20,
                                 success_threshold=1.0, init_cost=10.0)
    assert not hopeless.success[0] and hopeless.steps_run == 20


def target_requests(x, shapes, fp):
    """Single-trigger requests towards TARGET, one per (steps, images) in ``shapes``, request i on
    images x[20 i : 20 i + images]."""
    return [inversion.Invert(x[20 * i:20 * i + n], torch.full((n,), TARGET), torch.zeros(n, dtype=torch.long), 1,
                             steps, fp["init_cost"], [None]) for i, (steps, n) in enumerate(shapes)]


def distinct_client_models(model, n):
    """ClientModels of ``n`` clients whose weights differ (model + seeded noise), so that a
    request run on another request's model would show."""
    models = invert.ClientModels(model, model.state_dict(), n, 0.01)
    with torch.no_grad():
        for i, m in enumerate(models.models):
            for p in m.parameters():
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(i)))
    return models


@pytest.mark.parametrize("name, shape", [("MnistNet", (1, 28, 28)), ("ResNet18", (3, 32, 32))])
def test_image_convs_give_the_library_input_gradient(name, shape, float64):
    """The per-request pass's image layers (torch's native convolution) give the same logits and
    input gradient as the model itself, and only the layers that read the image are replaced."""
    torch.manual_seed(0)
    model = build_model(name, shape, 10).eval().requires_grad_(False)
    fast = inversion.with_image_convs(model, shape[0])
    replaced = [n for n, m in fast.named_modules() if isinstance(m, inversion.ImageConv2d)]
    assert replaced == ["conv1"]
    assert fast.state_dict().keys() == model.state_dict().keys()
    x = torch.rand(5, *shape, requires_grad=True)
    weights = torch.randn(5, 10)
    expected = torch.autograd.grad((model(x) * weights).sum(), x)[0]
    got = torch.autograd.grad((fast(x) * weights).sum(), x)[0]
    assert torch.allclose(model(x), fast(x), atol=1e-12)
    assert torch.allclose(got, expected, atol=1e-12) and expected.abs().max() > 1e-4


def test_per_request_threads_give_the_numbers_of_one_thread(backdoored):
    """With two threads the requests run side by side, each on one intra-op thread: every
    request computes exactly what it computes with one thread, and the caller's thread count
    is restored."""
    model = backdoored["model"]
    x = backdoored["test_x"][backdoored["test_y"] != TARGET]
    fp = resolve_flip_params({}, "fashion_mnist")
    requests = target_requests(x, ((40, 9), (25, 17), (40, 4)), fp)
    models = distinct_client_models(model, len(requests))
    params, buffers = models.frozen_stack(list(range(len(requests))))
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            runs.append(inversion.invert_batch(model, params, buffers, requests, fp, (1, 28, 28),
                                               [torch.Generator().manual_seed(i) for i in range(3)], per_request=True))
            assert torch.get_num_threads() == threads
    finally:
        torch.set_num_threads(before)
    for one, two in zip(*runs):
        assert torch.equal(one.masks, two.masks) and torch.equal(one.patterns, two.patterns)
    assert not torch.equal(runs[0][0].masks, runs[0][1].masks)


def test_per_image_picks_each_images_trigger_with_a_gradient_that_repeats_bit_for_bit():
    """``per_image`` gives values[group] (one request, and a stack of three) and each trigger's
    gradient is the sum over its images; at two threads that gradient has the same bits on every
    run (the index it replaces changed them from run to run with 64 images or more)."""
    torch.manual_seed(0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for shape, group in (((2, 28, 28), torch.randint(0, 2, (128,))), ((3, 2, 28, 28), torch.randint(0, 2, (3, 96)))):
            values, upstream = torch.rand(shape), torch.randn(*group.shape, *shape[-2:])
            expected = values[group] if group.dim() == 1 else torch.stack([v[g] for v, g in zip(values, group)])
            grads = []
            for _ in range(20):
                leaf = values.clone().requires_grad_()
                picked = inversion.per_image(leaf, group).expand_as(upstream)
                assert torch.equal(picked, expected)
                grads.append(torch.autograd.grad((picked * upstream).sum(), leaf)[0])
            onehot = F.one_hot(group, 2).to(upstream.dtype)
            assert torch.allclose(grads[0], torch.einsum("...ng,...nhw->...ghw", onehot, upstream), atol=1e-4)
            assert all(torch.equal(g, grads[0]) for g in grads)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("per_request", [True, False])
def test_requests_of_different_lengths_in_one_call_match_each_run_alone(backdoored, per_request, float64):
    """Requests of different step and image counts in one call (sorted by image count, finished
    ones leaving the stacked batch, the padding trimmed) give each one's result run alone, with
    either forward pass (per request, channels-last: the CPU's; vmapped over the padded stack)."""
    model, bd = copy.deepcopy(backdoored["model"]).double(), backdoored
    fp = resolve_flip_params({}, "fashion_mnist")
    x = bd["test_x"][bd["test_y"] != TARGET].double()
    requests = target_requests(x, ((30, 12), (50, 20), (45, 7), (40, 19)), fp)   # (steps, images)
    models = distinct_client_models(model, len(requests))
    params, buffers = models.frozen_stack(list(range(len(requests))))
    together = inversion.invert_batch(model, params, buffers, requests, fp, (1, 28, 28),
                                      [torch.Generator().manual_seed(i) for i in range(len(requests))], per_request)
    for i, request in enumerate(requests):
        p, b = models.frozen_stack([i])
        alone, = inversion.invert_batch(model, p, b, [request], fp, (1, 28, 28), [torch.Generator().manual_seed(i)],
                                        per_request=True)
        assert together[i].steps_run == request.steps == alone.steps_run
        assert torch.allclose(together[i].masks, alone.masks, atol=1e-4)
        assert together[i].sizes == pytest.approx(alone.sizes, rel=1e-4)


def client_data(bd, n_clients):
    x, y = bd["client_x"], bd["client_y"]
    splits = iid_split(len(y), n_clients, np.random.default_rng(0))
    return FederatedData(x, y, bd["test_x"], bd["test_y"], [torch.as_tensor(s) for s in splits],
                         (1, 28, 28), 10)


def harden(model, data, params, states, seeds):
    results = invert.flip_round(model, model.state_dict(), data, list(range(len(seeds))), params,
                                states, seeds, "cpu")
    averaged = {k: torch.stack([r[0][k].float() for r in results]).mean(0) for k in results[0][0]}
    hardened = copy.deepcopy(model)
    hardened.load_state_dict(averaged)
    return hardened.eval(), results


@pytest.mark.slow
def test_flip_hardening_removes_the_backdoor_and_keeps_accuracy(backdoored):
    """One FLIP round of 5 clients, their hardened models averaged (server step 1, so the
    hardening lr is lowered from the reference's 0.01, which runs under a server step of 0.1).
    A control with the same Adam steps but nothing stamped (portion 0) shows that the backdoor
    goes away because of the inverted triggers, not because of fine-tuning."""
    model, bd = backdoored["model"], backdoored
    ma_before, ba_before = accuracies(model, bd)
    data, seeds = client_data(bd, 5), [11, 12, 13, 14, 15]
    hardened, results = harden(model, data, flip_params(harden_lr=0.003), {}, seeds)
    control, _ = harden(model, data, flip_params(harden_lr=0.003, portion=0.0), {}, seeds)
    ma_after, ba_after = accuracies(hardened, bd)
    ma_control, ba_control = accuracies(control, bd)
    print(f"planted backdoor: MA {ma_before:.1f} -> {ma_after:.1f}, BA {ba_before:.1f} -> {ba_after:.1f} "
          f"(fine-tuning control: MA {ma_control:.1f}, BA {ba_control:.1f})")
    assert ba_after < ba_before - 40
    assert ba_after < ba_control - 20
    assert ma_after > ma_before - 6
    assert all(r[2]["inversions"] > 0 for r in results)


@pytest.mark.slow
def test_state_persists_and_second_selection_skips_warmup(backdoored, monkeypatch):
    model, bd = backdoored["model"], backdoored
    data = client_data(bd, 2)
    seen_steps = []
    original = inversion.invert_batch

    def recording(template, params, buffers, requests, fp, shape, generators):
        seen_steps.extend(r.steps for r in requests)
        return original(template, params, buffers, requests, fp, shape, generators)

    monkeypatch.setattr(invert, "invert_batch", recording)
    params = flip_params(warmup_steps=37, max_batch_steps=12)
    states = {}
    harden(model, data, params, states, [1, 2])
    assert seen_steps.count(37) == 2 * 10  # both clients warm up on all 10 targets
    assert all(states[c]["flip"]["warmed"] for c in (0, 1))
    warm = copy.deepcopy(states[0]["flip"]["mat_warm"])
    assert (warm[np.arange(10) != np.arange(10)[:, None]] > 0).mean() > 0.5
    seen_steps.clear()
    harden(model, data, params, states, [3, 4])
    assert seen_steps and 37 not in seen_steps
    # a client whose round ends mid warm-up continues it where it stopped next time
    short = flip_params(warmup_steps=37, max_batch_steps=4)
    partial = {}
    harden(model, data, short, partial, [1, 2])
    assert partial[0]["flip"]["next_warmup_target"] == 4 and not partial[0]["flip"]["warmed"]
    seen_steps.clear()
    harden(model, data, short, partial, [3, 4])
    assert seen_steps.count(37) == 2 * 4 and partial[0]["flip"]["next_warmup_target"] == 8
    # the resume checkpoint round-trips the state
    buffer = __import__("io").BytesIO()
    torch.save({"client_states": states}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)["client_states"]
    assert np.array_equal(loaded[0]["flip"]["mat_diff"], states[0]["flip"]["mat_diff"])
    assert loaded[1]["flip"]["triggers"].keys() == states[1]["flip"]["triggers"].keys()
    for key, (m, p) in states[1]["flip"]["triggers"].items():
        assert torch.equal(loaded[1]["flip"]["triggers"][key][0], m)


def test_batched_inversion_equals_one_at_a_time(backdoored, float64):
    """The batched kernel solves each request as if alone (requests with one and two triggers)."""
    model = copy.deepcopy(backdoored["model"]).double()
    x = backdoored["test_x"][:30].reshape(3, 10, 1, 28, 28).double()
    fp = resolve_flip_params({}, "fashion_mnist")
    requests = [inversion.Invert(x[i], torch.full((10,), TARGET), torch.arange(10) % (1 + i % 2), 1 + i % 2,
                              15 + 5 * i, fp["init_cost"], [None] * (1 + i % 2)) for i in range(3)]
    models = invert.ClientModels(model, model.state_dict(), 3, 0.01)

    def solve(indices):
        params, buffers = models.frozen_stack(indices)
        return inversion.invert_batch(model, params, buffers, [requests[i] for i in indices], fp, (1, 28, 28),
                                   [torch.Generator().manual_seed(i) for i in indices])

    together = solve([0, 1, 2])
    for i in range(3):
        alone = solve([i])[0]
        assert alone.masks.shape == together[i].masks.shape == (1 + i % 2, 28, 28)
        assert torch.allclose(alone.masks, together[i].masks, atol=1e-4)
        assert torch.allclose(alone.patterns, together[i].patterns, atol=1e-4)
        assert np.array_equal(alone.success, together[i].success)


@pytest.mark.slow
def test_flip_is_seeded_and_batched_matches_sequential(backdoored, float64):
    """Three clients' whole FLIP round, one client after the other (twice) and batched: the same
    bits twice in a row, and batched equal to sequential up to float rounding (in float64, where
    rounding cannot flip a success decision)."""
    model, bd = copy.deepcopy(backdoored["model"]).double(), dict(backdoored)
    bd["client_x"], bd["test_x"] = bd["client_x"].double(), bd["test_x"].double()
    data = client_data(bd, 3)
    params = flip_params(max_batch_steps=12, harden_lr=0.003)
    runs = {}
    for name, batched in (("seq", False), ("seq2", False), ("batched", True)):
        params["flip"]["batched"] = batched
        hardened, results = harden(model, data, params, {}, [5, 6, 7])
        runs[name] = ([r[0] for r in results], [r[2] for r in results], accuracies(hardened, bd))
    for a, b in zip(runs["seq"][0], runs["seq2"][0]):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert runs["seq"][1] == runs["seq2"][1]
    for a, b in zip(runs["seq"][0], runs["batched"][0]):
        assert all(torch.allclose(a[k].double(), b[k].double(), rtol=0, atol=1e-8) for k in a)
    for a, b in zip(runs["seq"][1], runs["batched"][1]):
        assert a.keys() == b.keys()
        for key in a:  # counts and the profile exactly, mask sizes and accuracies up to rounding
            expected = a[key] if isinstance(a[key], dict) else pytest.approx(a[key], rel=1e-6, abs=1e-9)
            assert b[key] == expected, key
    assert runs["batched"][2] == pytest.approx(runs["seq"][2], abs=1e-9)
