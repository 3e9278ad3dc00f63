"""FLIP's client schedule against the reference code, on a stubbed inversion: which class pairs a
client inverts on which batch, with how many steps at which cost, what the matrices record, and
when a batch is not hardened. No model runs here; the stub answers each inversion request."""

import numpy as np
import pytest
import torch

import flip_client
import inversion
from invert import summarize_round
from defenses.flip import resolve_settings as resolve_flip_params

H = W = 8                 # 64 pixels: the Fashion-MNIST cap 1/8 is 8 pixels
SMALL, OVERSIZE = 4.0, 20.0
FP = resolve_flip_params({"explore_prob": 0.0, "max_batch_steps": 14, "local_passes": 2}, "fashion_mnist")


def make_context(classes, state, seed=0):
    """A client with 128 samples of each class in ``classes``; every pixel of a sample holds its
    class / 10, so the stub can read the source class back from the request's images."""
    y = torch.tensor([c for c in classes for _ in range(128)])
    x = (y.float() / 10).view(-1, 1, 1, 1).expand(-1, 1, H, W).clone()
    return flip_client.ClientContext(x, y, y.numpy(), 10, FP, state, np.random.default_rng(seed),
                                torch.Generator().manual_seed(seed))


def returning_state():
    """A client whose warm-up is done: every ordered pair has a trigger size of 10, and mat_diff
    ranks the pairs so that the scheduler's choices are known."""
    state = flip_client.new_state(10)
    state["warmed"] = True
    state["next_warmup_target"] = 10
    state["mat_warm"][:] = 10.0
    diff = np.arange(100, dtype=float).reshape(10, 10) / 100
    np.fill_diagonal(diff, -np.inf)
    state["mat_diff"] = diff
    return state


def stub_result(request, size, success):
    t = request.n_triggers
    masks = torch.full((t, H, W), size / (H * W))
    patterns = torch.full((t, 1, H, W), 0.5)
    success = np.broadcast_to(np.asarray(success, dtype=bool), (t,)).copy()
    return inversion.InvertResult(masks, patterns, np.full(t, size), success, success.astype(float),
                                  request.steps, np.full(t, request.steps))


def drive(ctx, answer):
    """Run one round of the client program; ``answer(k, request)`` gives the k-th inversion's
    result. Returns the requests in order (Invert and Harden) and the final stats."""
    program, log, value, k = flip_client.client_program(ctx), [], None, 0
    try:
        while True:
            request = program.send(value)
            log.append(request)
            value = None
            if isinstance(request, inversion.Invert):
                value = answer(k, request)
                k += 1
    except StopIteration as stop:
        return log, stop.value


def inversions(log):
    """Per inversion: (source, target, combo, steps, cost, hardened right after it)."""
    out = []
    for i, r in enumerate(log):
        if isinstance(r, inversion.Invert):
            source_x = r.x[r.group == 0]
            source = int(round(float(source_x.mean()) * 10))
            target = int(r.labels[r.group == 0][0])
            hardened = i + 1 < len(log) and isinstance(log[i + 1], flip_client.Harden)
            out.append((source, target, r.n_triggers == 2, r.steps, r.cost, hardened))
    return out


def test_returning_client_starts_a_new_pair_every_batch_for_its_first_ten():
    state = returning_state()
    snapshots = []

    def answer(k, request):
        snapshots.append(state["mat_warm"].copy())
        return stub_result(request, SMALL, True)

    log, stats = drive(make_context(range(10), state), answer)
    inv = inversions(log)
    assert len(inv) == 14 and stats.hardened == 14
    pairs = [(s, t) for s, t, *_ in inv]
    # The largest mat_diff is (9, 8). Its combo shrinks both (9, 8) and (8, 9) from 10 to 4, which
    # halves their mat_diff, and the next source must differ from 9: (8, 7); then (9, 7), (8, 6).
    # Without an update after every batch, batch 2 would pick (9, 8) again.
    assert pairs[:4] == [(9, 8), (8, 7), (9, 7), (8, 6)]
    # Batches 0-9: one pair per batch, 400 steps at the initial cost; the matrices move every batch.
    assert all(steps == 400 and cost == FP["init_cost"] for *_, steps, cost, _ in inv[:10])
    for k in range(1, 10):
        assert not np.array_equal(snapshots[k], snapshots[k - 1]), k
    # From batch 10: two-batch pairs; a pair's second batch after a success: 100 steps at 1e-2.
    assert [(steps, cost) for *_, steps, cost, _ in inv[10:14]] == [(400, 1e-3), (100, 1e-2), (400, 1e-3), (100, 1e-2)]
    assert pairs[10] == pairs[11] and pairs[12] == pairs[13] and pairs[11] != pairs[12]


def test_combo_retry_after_a_failure_runs_the_full_budget():
    state = returning_state()
    log, _ = drive(make_context(range(10), state),
                   lambda k, r: stub_result(r, SMALL, [True, False] if k == 10 else True))
    inv = inversions(log)
    assert inv[10][2] and inv[11][2]                    # combos
    assert (inv[11][3], inv[11][4]) == (400, 1e-3)     # retry: 400 steps at the initial cost
    assert (inv[13][3], inv[13][4]) == (100, 1e-2)     # the next pair starts with a clean slate


def test_single_direction_always_runs_the_full_budget():
    """Class 9 is absent, so (s, 9) inverts s→9 only: 400 steps at the initial cost even after a
    success (Fashion-MNIST's reference schedule)."""
    state = returning_state()
    state["mat_diff"][:, 9] += 10                        # pairs toward 9 rank first
    log, _ = drive(make_context(range(9), state), lambda k, r: stub_result(r, SMALL, True))
    inv = inversions(log)
    singles = [x for x in inv if not x[2]]
    assert len(singles) >= 4 and all(t == 9 for _, t, *_ in singles)
    assert all((steps, cost) == (400, 1e-3) for *_, steps, cost, _ in singles)
    assert any(x[3] == 400 and not x[2] for x in inv[10:])


def test_a_failed_direction_keeps_its_stored_size_instead_of_zero():
    """Direction t→s fails on every batch: the matrices record the stored trigger's size for it,
    not 0 (which the scheduler would read as a trigger that shrank by 100 %)."""
    state = returning_state()
    stored = torch.full((H, W), 6.0 / (H * W))
    state["triggers"][(8, 9)] = (stored, torch.zeros(1, H, W))
    after_first = {}

    def answer(k, request):
        if k == 1:
            after_first.update(warm=state["mat_warm"].copy(), diff=state["mat_diff"].copy())
        return stub_result(request, SMALL, [True, False])

    log, _ = drive(make_context(range(10), state), answer)
    assert inversions(log)[0][:3] == (9, 8, True)       # combo: 9→8 succeeds, 8→9 fails
    assert after_first["warm"][8, 9] == 6.0
    assert after_first["diff"][8, 9] == (0.89 + (6.0 - 10.0) / 10.0) / 2
    assert after_first["warm"][9, 8] == SMALL


def test_an_oversized_trigger_skips_hardening_and_leaves_the_counters_alone():
    state = returning_state()
    before = {}

    def answer(k, request):
        before[k] = (state["mat_warm"].copy(), state["mat_diff"].copy())
        return stub_result(request, OVERSIZE if k in (3, 10) else SMALL, k not in (3, 10))

    log, stats = drive(make_context(range(10), state), answer)
    inv = inversions(log)
    assert not inv[3][5] and not inv[10][5] and inv[4][5]
    assert stats.oversize_skips == 2 and stats.hardened == 12
    # batch 3 was a whole (one-batch) pair: no matrix update after it
    assert np.array_equal(before[4][0], before[3][0])
    assert np.array_equal(before[4][1], before[3][1])
    # the oversized first batch of a pair does not count as a failure: its second batch refines
    assert (inv[11][3], inv[11][4]) == (100, 1e-2)


def test_stamping_counts_follow_the_target_label():
    """Every inversion here is a successful combo, which stamps a trigger toward each of its two
    labels: the steps stamping toward 8 are the inversions whose pair contains 8."""
    state = returning_state()
    log, stats = drive(make_context(range(10), state), lambda k, r: stub_result(r, SMALL, True))
    summary = summarize_round([stats.as_dict()], target_label=8)
    expected = sum(1 for s, t, *_ in inversions(log) if 8 in (s, t))
    assert summary["flip_hardened"] == 14
    assert summary["flip_stamped_to_target"] == expected >= 4
    assert summary["flip_oversize_skips"] == 0


# --- what the client asks for and what it hardens with ------------------------------------------

def sized_result(request, sizes, success=True):
    """A stub answer whose triggers have the given sizes, one per direction."""
    t = request.n_triggers
    sizes = np.asarray(sizes, dtype=float)[:t]
    masks = torch.stack([torch.full((H, W), s / (H * W)) for s in sizes])
    success = np.broadcast_to(np.asarray(success, dtype=bool), (t,)).copy()
    patterns = torch.stack([torch.full((1, H, W), 0.55 + 0.1 * g) for g in range(t)])  # 0.55, 0.65
    return inversion.InvertResult(masks, patterns, sizes, success, success.astype(float),
                                  request.steps, np.full(t, request.steps))


def test_only_the_larger_trigger_of_a_pair_decides_the_size_cap():
    """One direction small, the other over the cap: the batch is not hardened (a check on the
    smaller trigger would harden it)."""
    state = returning_state()
    log, stats = drive(make_context(range(10), state),
                       lambda k, r: sized_result(r, [SMALL, OVERSIZE] if k == 2 else [SMALL, SMALL]))
    inv = inversions(log)
    assert inv[2][2] and not inv[2][5] and inv[1][5] and inv[3][5]
    assert stats.oversize_skips == 1


def test_each_inversion_starts_from_the_stored_triggers_of_its_pair():
    state = returning_state()
    stored = {(9, 8): (torch.full((H, W), 0.11), torch.full((1, H, W), 0.21)),
              (8, 9): (torch.full((H, W), 0.12), torch.full((1, H, W), 0.22))}
    state["triggers"].update(stored)
    log, _ = drive(make_context(range(10), state), lambda k, r: stub_result(r, SMALL, True))
    first = next(r for r in log if isinstance(r, inversion.Invert))
    assert inversions(log)[0][:3] == (9, 8, True)
    assert [float(v.flatten()[0]) for pair in first.init for v in pair] == pytest.approx([0.11, 0.21, 0.12, 0.22])
    # from batch 10 a pair lasts two batches: its second inversion starts from the triggers its
    # first one stored (the stub's: mask SMALL / (H·W), pattern 0.5)
    requests = [r for r in log if isinstance(r, inversion.Invert)]
    assert inversions(log)[10][:2] == inversions(log)[11][:2]
    assert [float(v.flatten()[0]) for pair in requests[11].init for v in pair] == pytest.approx(
        [SMALL / (H * W), 0.5, SMALL / (H * W), 0.5])


def test_hardening_stamps_a_portion_of_each_directions_samples_and_keeps_their_labels():
    """After a successful combo (s, t) each direction stamps ⌊portion · min(n_s, n_t)⌋ samples of
    its source class with its own trigger (s→t's on class s); no other sample changes, and every
    label stays the true one. (The stub's patterns, 0.55 for s→t and 0.65 for t→s, differ from
    every class's pixel value, so every stamped sample changes.)"""
    state = returning_state()
    log, _ = drive(make_context(range(10), state), lambda k, r: sized_result(r, [SMALL, SMALL]))
    checked = 0
    for i, r in enumerate(log[:-1]):
        nxt = log[i + 1]
        if not (isinstance(r, inversion.Invert) and isinstance(nxt, flip_client.Harden)):
            continue
        source = int(round(float(r.x[r.group == 0].mean()) * 10))
        target = int(r.labels[r.group == 0][0])
        clean = (nxt.y.float() / 10).view(-1, 1, 1, 1)
        stamped = (nxt.x - clean).abs().flatten(1).max(1).values > 1e-6
        counts = {c: int((nxt.y == c).sum()) for c in (source, target)}
        length = int(min(counts.values()) * FP["portion"])
        assert {c: int((stamped & (nxt.y == c)).sum()) for c in (source, target)} == {source: length, target: length}
        assert int(stamped.sum()) == 2 * length
        m = SMALL / (H * W)
        for c, pattern in ((source, 0.55), (target, 0.65)):
            values = nxt.x[stamped & (nxt.y == c)].flatten()
            assert values.tolist() == pytest.approx([(1 - m) * c / 10 + m * pattern] * len(values))
        checked += 1
    assert checked >= 10


def test_exploration_picks_a_random_pair_at_its_rate():
    """explore_prob 0.3: over 3000 choices the greedy pair comes back 70 % of the time plus the
    random choices that happen to hit it (1 in 90 of them)."""
    state = returning_state()
    fp = {**FP, "explore_prob": 0.3}
    ctx = make_context(range(10), state)
    ctx = flip_client.ClientContext(ctx.x, ctx.y, ctx.y_host, 10, fp, state, np.random.default_rng(3),
                                    torch.Generator().manual_seed(3))
    greedy = flip_client.choose_pair(make_context(range(10), state), list(range(10)), None)
    picks = [flip_client.choose_pair(ctx, list(range(10)), None) for _ in range(3000)]
    explored = sum(p != greedy for p in picks) / len(picks)
    assert explored == pytest.approx(0.3 * 89 / 90, abs=0.03)


def test_every_inversion_kind_gets_its_own_budget():
    """Distinct step counts per kind, so that no two can be swapped unnoticed: a pair's first batch,
    a combo after a success (refine) or a failure (retry), one direction after a success or a
    failure."""
    fp = {**FP, "pair_steps": 401, "refine_steps": 101, "refine_cost": 0.02, "retry_steps": 301,
          "single_refine_steps": 201, "single_refine_cost": 0.03, "single_retry_steps": 251, "init_cost": 0.004}
    assert flip_client.inversion_budget(fp, combo=True, later=False, failed=False) == (401, 0.004, "pair")
    assert flip_client.inversion_budget(fp, combo=False, later=False, failed=True) == (401, 0.004, "pair")
    assert flip_client.inversion_budget(fp, combo=True, later=True, failed=False) == (101, 0.02, "refine")
    assert flip_client.inversion_budget(fp, combo=True, later=True, failed=True) == (301, 0.004, "retry")
    assert flip_client.inversion_budget(fp, combo=False, later=True, failed=False) == (201, 0.03, "single_refine")
    assert flip_client.inversion_budget(fp, combo=False, later=True, failed=True) == (251, 0.004, "single_retry")


def test_each_datasets_yaml_holds_the_authors_flip_constants():
    """The constants of the authors' invert_MNIST.py, invert_FashionMNIST.py and invert_CIFAR.py
    (docs/algorithms.md §4), read from our YAML files."""
    import config

    expected = {
        "mnist": dict(local_passes=10, batch_size=64, portion=0.5, harden_lr=0.01, size_min=1, warmup_steps=400,
                      pair_steps=200, refine_steps=50, retry_steps=200, success_threshold=0.9,
                      max_trigger_frac=0.125),
        "fashion_mnist": dict(local_passes=5, batch_size=128, portion=0.6, harden_lr=0.01, size_min=1,
                              warmup_steps=600, pair_steps=400, refine_steps=100, retry_steps=400,
                              single_refine_steps=400, single_retry_steps=400, success_threshold=0.9,
                              max_trigger_frac=0.125),
        "cifar": dict(local_passes=8, batch_size=128, portion=0.9, harden_lr=0.001, size_min=5, warmup_steps=600,
                      pair_steps=200, refine_steps=50, retry_steps=200, single_refine_steps=50,
                      single_refine_cost=0.01, single_retry_steps=100, success_threshold=0.85,
                      max_trigger_frac=0.75),
    }
    for name, values in expected.items():
        fp = config.load_config(f"utils/{name}.yaml", ["resumed_model=false"])["flip"]
        assert {k: fp[k] for k in values} == values, name
        assert (fp["init_cost"], fp["refine_cost"], fp["cost_patience"], fp["cost_up"]) == (1e-3, 1e-2, 10, 1.5)
