import numpy as np
import pytest
import torch

import defense
from attacks import scale_update
from defenses import flame


FLAME_DEFAULTS = {"flame_lambda": 0.0, "flame_whole_state_dict": False, "flame_admission": "cluster",
                  "flame_outlier_max": 2 / 3, "flame_apply_lr_para": False}


def ctx(**params):
    base = {**FLAME_DEFAULTS, "lr_para": 0.1, "no_models": 3, "aggregation_methods": "mean"}
    base.update(params)
    return defense.RoundContext(base, ["w", "b"], torch.Generator().manual_seed(0))


def test_fedavg_is_global_plus_lr_para_over_no_models_times_sum():
    g = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([0.5]), "n": torch.tensor(7)}
    ups = [{"w": torch.tensor([3.0, 0.0]), "b": torch.tensor([1.0]), "n": torch.tensor(1)},
           {"w": torch.tensor([0.0, 6.0]), "b": torch.tensor([2.0]), "n": torch.tensor(1)},
           {"w": torch.tensor([-3.0, 3.0]), "b": torch.tensor([0.0]), "n": torch.tensor(1)}]
    out = defense.apply_rule("mean", g, ups, [10, 20, 30], ctx())
    # sum w = [0, 9], b = 3; coefficient 0.1 / 3
    assert torch.allclose(out.state["w"], torch.tensor([1.0, 2.3]))
    assert torch.allclose(out.state["b"], torch.tensor([0.6]))
    assert int(out.state["n"]) == 7  # integer buffers keep the global value
    assert out.admitted == [True, True, True]


def test_weighted_fedavg_uses_sample_counts():
    g = {"w": torch.zeros(1), "b": torch.zeros(1)}
    ups = [{"w": torch.tensor([6.0]), "b": torch.zeros(1)}, {"w": torch.tensor([0.0]), "b": torch.zeros(1)}]
    out = defense.apply_rule("weighted_mean", g, ups, [1, 2], ctx(lr_para=1.0))
    assert torch.allclose(out.state["w"], torch.tensor([2.0]))


def test_model_replacement_scales_float_entries_by_factor():
    g = {"w": torch.tensor([1.0, 1.0]), "n": torch.tensor(3)}
    local = {"w": torch.tensor([1.5, 0.0]), "n": torch.tensor(4)}
    update = {k: local[k] - g[k] for k in g}
    scaled = scale_update(update, 100)
    assert torch.allclose(g["w"] + scaled["w"], g["w"] + 100 * (local["w"] - g["w"]))
    assert torch.allclose(scaled["w"], torch.tensor([50.0, -100.0]))
    assert int(scaled["n"]) == 1


def _benign_updates(n, dim, seed=0):
    """A shared direction plus a small step along a distinct axis each: all pairwise distances
    equal, so HDBSCAN's single-cluster labelling keeps every one of them."""
    base = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    base[:n] = 0.0  # orthogonal to the distinct axes, so norms and pairwise angles are equal
    return [base + 0.1 * torch.eye(dim)[i] for i in range(n)]


def _as_states(vectors):
    return [{"w": v[:-1].clone(), "b": v[-1:].clone()} for v in vectors]


def test_flame_rejects_scaled_and_flipped_updates_and_clips_to_median():
    dim = 50
    vecs = _benign_updates(8, dim)
    vecs.append(100 * _benign_updates(1, dim, seed=5)[0])  # x100 outlier in its own direction
    vecs.append(-vecs[0])                                          # direction-flipped
    g = {"w": torch.zeros(dim - 1), "b": torch.zeros(1)}
    out = defense.apply_rule("flame", g, _as_states(vecs), [1] * 10, ctx(no_models=10))
    assert out.admitted == [True] * 8 + [False, False]
    norms = torch.stack([v.double().norm() for v in vecs])
    assert out.stats["flame_clip_bound"] == pytest.approx(float(norms.median()))
    # no noise (lambda 0): the result is the mean of the admitted updates clipped to the median
    bound = norms.median()
    expected = sum(v.double() * min(1.0, float(bound / v.double().norm())) for v in vecs[:8]) / 8
    got = torch.cat([out.state["w"], out.state["b"]]).double()
    assert torch.allclose(got, expected, atol=1e-6)


def test_flame_noise_has_configured_scale():
    dim = 20001
    vecs = [torch.zeros(dim) + 0.01 * i for i in range(1, 5)]
    g = {"w": torch.zeros(dim - 1), "b": torch.zeros(1)}
    lam = 0.5
    out = defense.apply_rule("flame", g, _as_states(vecs), [1] * 4, ctx(flame_lambda=lam, no_models=4))
    bound = out.stats["flame_clip_bound"]
    mean = sum(v.double() * min(1.0, bound / float(v.double().norm())) for v in vecs) / 4
    residual = torch.cat([out.state["w"], out.state["b"]]).double() - mean
    assert float(residual.std()) == pytest.approx(lam * bound, rel=0.03)
    assert abs(float(residual.mean())) < 0.05 * lam * bound


def test_flame_degenerate_cases_admit_everyone_without_crashing(caplog):
    g = {"w": torch.zeros(3), "b": torch.zeros(1)}
    same = [{"w": torch.ones(3), "b": torch.ones(1)} for _ in range(4)]
    assert defense.apply_rule("flame", g, same, [1] * 4, ctx()).admitted == [True] * 4
    one = defense.apply_rule("flame", g, same[:1], [1], ctx())
    assert one.admitted == [True]
    assert torch.allclose(one.state["w"], torch.ones(3))
    assert "identical" in caplog.text and "nothing to cluster" in caplog.text


def test_admission_all_noise_fallback():
    d = torch.tensor(np.array([[0.0, 1.0], [1.0, 0.0]]))
    for rule in ("cluster", "outlier_score"):
        assert flame.admit(d, rule, 2 / 3).admitted.tolist() in ([True, True], [True, False], [False, True])


def majority_with_stragglers(seed=0):
    """Ten update vectors: seven tight benign ones around a shared direction, a benign straggler
    (twice their spread), a x100 scaled one and a direction-flipped one."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(300, generator=g, dtype=torch.float64)
    tight = [base + 0.3 * torch.randn(300, generator=g, dtype=torch.float64) for _ in range(7)]
    straggler = base + 0.6 * torch.randn(300, generator=g, dtype=torch.float64)
    scaled = 100 * (base + 3.0 * torch.randn(300, generator=g, dtype=torch.float64))
    flipped = -base + 0.3 * torch.randn(300, generator=g, dtype=torch.float64)
    return torch.stack(tight + [straggler, scaled, flipped])


def test_outlier_score_admits_a_benign_straggler_and_rejects_attackers():
    d = flame.cosine_distances(majority_with_stragglers())
    by_score = flame.admit(d, "outlier_score", 2 / 3)
    assert by_score.admitted.tolist() == [True] * 8 + [False, False]
    assert np.allclose(by_score.majority_ratios, 1 / (1 - by_score.outlier_scores))
    assert by_score.majority_ratios[7] < 3 < min(by_score.majority_ratios[8:])
    by_cluster = flame.admit(d, "cluster", 2 / 3)
    assert not by_cluster.admitted[8:].any()
    assert by_cluster.admitted[:8].sum() < 8  # HDBSCAN's labels drop benign clients too


def test_outlier_score_with_identical_majority_falls_back_to_cluster(caplog):
    vecs = majority_with_stragglers()
    vecs[:6] = vecs[0]
    admission = flame.admit(flame.cosine_distances(vecs), "outlier_score", 2 / 3)
    assert admission.admitted[:6].all() and not admission.admitted[8:].any()
    assert "outlier scores are undefined" in caplog.text


def test_flame_reports_outlier_scores_and_can_take_the_fedavg_step():
    vecs = majority_with_stragglers().float()
    g = {"w": torch.zeros(300), "b": torch.zeros(1)}
    updates = [{"w": v, "b": torch.zeros(1)} for v in vecs]
    full = defense.apply_rule("flame", g, updates, [1] * 10, ctx(flame_admission="outlier_score", no_models=10))
    scaled = defense.apply_rule("flame", g, updates, [1] * 10, ctx(flame_admission="outlier_score", no_models=10,
                                                     flame_apply_lr_para=True, lr_para=0.1))
    assert len(full.client_stats["outlier_score"]) == 10
    assert full.admitted == [True] * 8 + [False, False]
    assert torch.allclose(scaled.state["w"], 0.1 * full.state["w"], atol=1e-6)


def test_flame_batchnorm_statistics_do_not_make_benign_clients_outliers():
    """Same trainable weights, very different BatchNorm running statistics (as non-IID data
    gives): trainable-only clustering admits all; clustering the whole state_dict does not."""
    gen = torch.Generator().manual_seed(0)
    n, dim, stats = 10, 200, 64
    g = {"w": torch.randn(dim, generator=gen), "bn.running_mean": torch.zeros(stats),
         "bn.running_var": torch.ones(stats), "bn.num_batches_tracked": torch.tensor(100)}
    weights = 0.01 * torch.randn(dim, generator=gen)  # the same weight update for every client
    updates = []
    for i in range(n):
        scale = 5.0 if i % 3 == 0 else 0.5  # a few clients with very different class mixes
        updates.append({"w": weights.clone(),
                        "bn.running_mean": scale * torch.randn(stats, generator=gen),
                        "bn.running_var": scale * torch.rand(stats, generator=gen),
                        "bn.num_batches_tracked": torch.tensor(10)})
    trainable_only = defense.RoundContext(
        {**FLAME_DEFAULTS, "lr_para": 1.0, "no_models": n}, ["w"],
        torch.Generator().manual_seed(0))
    assert defense.apply_rule("flame", g, updates, [1] * n, trainable_only).admitted == [True] * n
    whole = defense.RoundContext({**trainable_only.params, "flame_whole_state_dict": True}, ["w"],
                                 torch.Generator().manual_seed(0))
    admitted = defense.apply_rule("flame", g, updates, [1] * n, whole).admitted
    assert not all(admitted)
    assert sum(admitted) >= n // 2 + 1


def test_detection_counts_and_rates():
    from helper import detection_totals
    from train import detection_counts

    row = detection_counts([True, False, False, True, False], [False, False, True, True, True])
    assert row == {"attackers_selected": 2, "attackers_rejected": 1, "benign_selected": 3,
                   "benign_rejected": 1, "tpr": 0.5, "fpr": 0.3333}
    assert detection_counts([False, False], [True, True])["tpr"] == ""
    rows = [{k: str(v) for k, v in row.items()},
            {"attackers_selected": "0", "attackers_rejected": "0", "benign_selected": "4", "benign_rejected": "0"}]
    totals = detection_totals(rows)
    assert totals["tpr"] == 0.5 and totals["fpr"] == round(1 / 7, 4)


def test_flame_run_records_outlier_scores_and_detection(tmp_path, synthetic_yaml):
    import csv
    import json

    from conftest import DEVICE, run_main

    run_dir = tmp_path / "run"
    result = run_main("--params", synthetic_yaml({"epochs": 2, "no_models": 6}), "--run-dir", run_dir,
                      "--device", DEVICE, "--set", "aggregation_methods=flame",
                      "--set", "flame_admission=outlier_score", "--set", "flame_outlier_max=0.6")
    assert result.returncode == 0, result.stderr[-2000:]
    with open(run_dir / "clients.csv") as f:
        clients = list(csv.DictReader(f))
    for c in clients:
        score, ratio = float(c["outlier_score"]), float(c["majority_ratio"])
        if score < 0.9:  # (the CSV's 6 decimals of the score decide little beyond that)
            assert ratio == pytest.approx(1 / (1 - score), rel=1e-4)
        assert c["admitted"] == str(int(float(c["outlier_score"]) <= 0.6))
    attacker = [c for c in clients if c["is_attacker"] == "1"]
    assert len(attacker) == 1 and attacker[0]["admitted"] == "0"
    with open(run_dir / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[1]["tpr"] == "1.0"
    benign = [c for c in clients if c["is_attacker"] == "0"]
    summary = json.loads((run_dir / "summary.json").read_text())["detection"]
    assert summary["benign_selected"] == len(benign)
    assert summary["benign_rejected"] == sum(c["admitted"] == "0" for c in benign)
    assert summary["tpr"] == 1.0
    log = (run_dir / "log.txt").read_text()
    for round_no in (1, 2):
        rejected = sum(c["admitted"] == "0" for c in clients if c["round"] == str(round_no))
        assert f"clients rejected by the rule {rejected} of 6)" in log
    assert sum(c["admitted"] == "0" for c in clients) >= 1
