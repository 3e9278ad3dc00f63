"""A defense and an attack added the documented way: a rule written in this test file, loaded
through `plugins:` and run by main.py; the worked example of docs/examples; the centralized
attack's trigger."""

import csv
import json
import os

import numpy as np
import pytest
import torch

import attacks
import config
import train
from conftest import ROOT, run_main, write_yaml

# A rule that rejects the clients whose update norm is above the round's mean norm, and averages the
# others; it records the mean and each client's norm over the mean.
ABOVE_MEAN_RULE = '''
from defenses import VectorResult, server_rule


@server_rule("below_mean_norm", metric_columns=["mean_norm"], client_columns=["norm_over_mean"])
def below_mean_norm(U, n_samples, ctx):
    norms = U.norm(dim=1)
    admitted = (norms <= norms.mean()).numpy()
    return VectorResult(U[admitted].mean(0), admitted, stats={"mean_norm": float(norms.mean())},
                        client_stats={"norm_over_mean": (norms / norms.mean()).tolist()})
'''


def read(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_a_rule_written_in_a_test_file_runs_through_main_with_its_columns_and_detection(tmp_path):
    plugin = tmp_path / "my_rule.py"
    plugin.write_text(ABOVE_MEAN_RULE)
    cfg = write_yaml(tmp_path / "cfg.yaml", {"plugins": [str(plugin)], "aggregation_methods": "below_mean_norm"})
    out = run_main("--params", cfg, "--run-dir", tmp_path / "run", "--device", "cpu", "--threads", "1")
    assert out.returncode == 0, out.stderr
    metrics, clients = read(tmp_path / "run" / "metrics.csv"), read(tmp_path / "run" / "clients.csv")
    assert len(metrics) == 3
    for row in metrics:
        mine = [c for c in clients if c["round"] == row["round"]]
        norms = np.array([float(c["update_norm"]) for c in mine])
        expected = norms <= norms.mean()
        assert [c["admitted"] == "1" for c in mine] == expected.tolist()
        assert float(row["mean_norm"]) == pytest.approx(norms.mean(), rel=1e-5)
        for c, norm in zip(mine, norms):
            assert float(c["norm_over_mean"]) == pytest.approx(norm / norms.mean(), rel=1e-4)
        attacker = np.array([c["is_attacker"] == "1" for c in mine])
        assert int(row["attackers_selected"]) == attacker.sum()
        assert int(row["attackers_rejected"]) == (attacker & ~expected).sum()
        assert int(row["benign_rejected"]) == (~attacker & ~expected).sum()
        benign_rate = (~attacker & ~expected).sum() / (~attacker).sum()
        assert float(row["fpr"]) == pytest.approx(round(benign_rate, 4))
    attack_rounds = [r for r in metrics if r["attackers_selected"] != "0"]
    assert [r["round"] for r in attack_rounds] == ["2", "3"]
    assert all(r["tpr"] == "1.0" for r in attack_rounds)  # a x100 update is far above the mean norm
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["detection"]["tpr"] == 1.0


def test_a_resumed_run_loads_its_plugins_again(tmp_path):
    plugin = tmp_path / "my_rule.py"
    plugin.write_text(ABOVE_MEAN_RULE)
    cfg = write_yaml(tmp_path / "cfg.yaml", {"plugins": [str(plugin)], "aggregation_methods": "below_mean_norm",
                                             "epochs": 2})
    assert run_main("--params", cfg, "--run-dir", tmp_path / "run", "--threads", "1").returncode == 0
    out = run_main("--resume", tmp_path / "run", "--set", "epochs=3", "--threads", "1")
    assert out.returncode == 0, out.stderr
    assert [r["round"] for r in read(tmp_path / "run" / "metrics.csv")] == ["1", "2", "3"]


def test_the_worked_example_declares_its_setting_check_and_columns():
    example = os.path.join(ROOT, "docs", "examples", "norm_filter.py")
    base = {"type": "synthetic", "is_poison": False, "plugins": [example], "aggregation_methods": "norm_filter"}
    assert config.resolve(base)["norm_filter_factor"] == 3.0
    with pytest.raises(config.ConfigError, match="did you mean 'norm_filter_factor'"):
        config.resolve({**base, "norm_filter_factr": 2.0})
    with pytest.raises(config.ConfigError, match=r"norm_filter_factor: must be >= 1, got 0.5"):
        config.resolve({**base, "norm_filter_factor": 0.5})
    with pytest.raises(config.ConfigError, match="norm_filter needs at least 2 clients"):
        config.resolve({**base, "no_models": 1})
    params = config.resolve(base)
    assert train.metric_columns(params)[-2:] == ["norm_filter_bound", "seconds"]
    assert train.client_columns(params)[-1] == "norm_filter_ratio"


def test_the_worked_example_rejects_what_its_rule_says(tmp_path):
    """Norms 1, 2, 3, 10: the lower median is 2, the bound 3 x 2 = 6, so only the 10 goes."""
    import defense

    config.load_plugins([os.path.join(ROOT, "docs", "examples", "norm_filter.py")])
    g = {"w": torch.zeros(2)}
    updates = [{"w": torch.tensor([n, 0.0])} for n in (1.0, 2.0, 3.0, 10.0)]
    params = {"lr_para": 1.0, "no_models": 4, "aggregation_methods": "norm_filter", "norm_filter_factor": 3.0}
    result = defense.aggregate(g, updates, [1] * 4, defense.RoundContext(params, ["w"], None, [0, 1, 2, 3]))
    assert result.admitted == [True, True, True, False]
    assert result.state["w"].tolist() == [2.0, 0.0]
    assert result.stats["norm_filter_bound"] == 6.0


def test_a_missing_or_broken_plugin_is_named(tmp_path):
    with pytest.raises(config.ConfigError, match="plugins: file 'nowhere.py' not found"):
        config.resolve({"type": "synthetic", "is_poison": False, "plugins": ["nowhere.py"]})
    broken = tmp_path / "broken.py"
    broken.write_text("import no_such_module\n")
    with pytest.raises(config.ConfigError, match="broken.py' failed to load: ModuleNotFoundError"):
        config.resolve({"type": "synthetic", "is_poison": False, "plugins": [str(broken)]})


@pytest.mark.parametrize("attack, expected", [("dba", "own bar"), ("centralized", "union")])
def test_each_attacker_stamps_the_trigger_its_attack_names(tmp_path, monkeypatch, attack, expected):
    """Two attackers with two bars: DBA's attacker k stamps bar k; the centralized attack's
    attackers both stamp the union of the bars."""
    params = config.load_config(write_yaml(tmp_path / "cfg.yaml", {"attack": attack}))
    fed = train.Federation(params, str(tmp_path), "cpu")
    stamped = []
    import attacks.dba as dba

    def spy(x, y, mask, n_poison, target):
        stamped.append(mask.clone())
        return original(x, y, mask, n_poison, target)

    original = dba.poison_batch
    monkeypatch.setattr(dba, "poison_batch", spy)
    bars = [params["0_poison_pattern"], params["1_poison_pattern"]]
    for slot, cid in enumerate(params["adversary_list"]):
        stamped.clear()
        fed.train_attacker(cid, 2)
        pixels = bars[slot] if expected == "own bar" else bars[0] + bars[1]
        want = torch.zeros(28, 28, dtype=torch.bool)
        for r, c in pixels:
            want[r, c] = True
        assert stamped and all(torch.equal(m, want) for m in stamped)
    assert attacks.ATTACKS[attack].name == attack


def test_a_plugin_serves_only_the_configurations_that_name_it(tmp_path):
    """A process that loaded a plugin for one configuration (a test session, a notebook) resolves
    the next one without it: no plugin key in its params.yaml, the plugin's rule not a choice."""
    example = os.path.join(ROOT, "docs", "examples", "norm_filter.py")
    with_plugin = config.resolve({"type": "synthetic", "is_poison": False, "plugins": [example]})
    without = config.resolve({"type": "synthetic", "is_poison": False})
    assert "norm_filter_factor" in with_plugin and "norm_filter_factor" not in without
    with pytest.raises(config.ConfigError, match="aggregation_methods: 'norm_filter' is not one of"):
        config.resolve({"type": "synthetic", "is_poison": False, "aggregation_methods": "norm_filter"})


def test_a_rule_returning_numbers_it_did_not_declare_is_told_which(tmp_path):
    """Undeclared stats would be dropped from the records without a word: the rule's author is
    told instead."""
    import defense

    plugin = tmp_path / "loose_rule.py"
    plugin.write_text(ABOVE_MEAN_RULE.replace('"below_mean_norm", metric_columns=["mean_norm"]',
                                              '"loose_rule", metric_columns=[]'))
    config.load_plugins([str(plugin)])
    g = {"w": torch.zeros(2)}
    updates = [{"w": torch.tensor([n, 0.0])} for n in (1.0, 2.0, 3.0)]
    params = {"lr_para": 1.0, "no_models": 3, "aggregation_methods": "loose_rule"}
    with pytest.raises(ValueError, match="rule 'loose_rule' returned stats mean_norm that its registration "
                                         "does not declare in metric_columns"):
        defense.aggregate(g, updates, [1] * 3, defense.RoundContext(params, ["w"], None, [0, 1, 2]))
