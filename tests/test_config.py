import logging

import pytest
import torch
import yaml

import attacks
import config
from conftest import SYNTHETIC, run_main, write_yaml
from models import build_model


@pytest.mark.parametrize("override, key", [
    ({"lr_paraa": 0.1}, "lr_para"),
    ({"lr": -0.1}, "lr"),
    ({"no_models": 50}, "no_models"),
    ({"adversary_list": [5, 99]}, "adversary_list"),
    ({"1_poison_pattern": [[3, 0], [28, 1]]}, "1_poison_pattern"),
    ({"confidence_threshold": 1.5}, "confidence_threshold"),
    ({"aggregation_methods": "krum2"}, "aggregation_methods"),
    ({"batch_size": "big"}, "batch_size"),
    ({"invert": True, "flip": {"warmup_stepz": 10}}, "flip.warmup_steps"),
    ({"invert": True, "flip": {"portion": 2}}, "flip.portion"),
])
def test_bad_yaml_exits_2_naming_the_key(tmp_path, override, key):
    path = write_yaml(tmp_path / "bad.yaml", override)
    result = run_main("--params", path, "--run-dir", tmp_path / "run", "--device", "cpu")
    assert result.returncode == 2
    assert key in result.stderr
    assert "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_unknown_key_suggests_closest():
    with pytest.raises(config.ConfigError, match="did you mean 'dirichlet_alpha'"):
        config.resolve({**SYNTHETIC, "dirichlet_alfa": 0.3})


def test_set_overrides_parse_as_yaml(tmp_path):
    path = write_yaml(tmp_path / "c.yaml")
    params = config.load_config(path, ["epochs=7", "adversary_list=[1, 2]", "0_poison_epochs=[4]"])
    assert params["epochs"] == 7 and params["adversary_list"] == [1, 2] and params["0_poison_epochs"] == [4]


def test_set_reaches_one_key_of_a_group(tmp_path):
    path = write_yaml(tmp_path / "c.yaml", {"invert": True, "flip": {"batched": True, "warmup_steps": 50}})
    params = config.load_config(path, ["flip.batched=false", "flip.pair_steps=7"])
    assert params["flip"]["batched"] is False and params["flip"]["pair_steps"] == 7
    assert params["flip"]["warmup_steps"] == 50
    with pytest.raises(config.ConfigError, match="flip.pair_stepz"):
        config.load_config(path, ["flip.pair_stepz=7"])
    with pytest.raises(config.ConfigError, match="'lr' is not a group"):
        config.load_config(path, ["lr.x=1"])


def test_attack_mode_switch_sets_schedule_scaling_and_threshold():
    single = config.resolve(dict(SYNTHETIC))
    assert single["baseline"] is False and single["confidence_threshold"] == 0.0
    assert attacks.attacker_rounds(single, 1) == [[2], [3]]
    raw = {k: v for k, v in SYNTHETIC.items() if not k.endswith("_poison_epochs")}
    cont = config.resolve({**raw, "attack_mode": "continuous", "epochs": 5})
    assert cont["baseline"] is True and cont["confidence_threshold"] == 0.4
    assert attacks.attacker_rounds(cont, 2) == [[2, 3, 4, 5], [2, 3, 4, 5]]
    explicit = config.resolve({**raw, "attack_mode": "continuous", "confidence_threshold": 0.2,
                               "1_poison_epochs": [4]})
    assert explicit["confidence_threshold"] == 0.2
    assert attacks.attacker_rounds(explicit, 1)[1] == [4]


def test_participants_are_the_scheduled_attackers_then_a_seeded_draw_from_everyone_else():
    import collections

    import train

    params = config.resolve({**SYNTHETIC, "number_of_total_participants": 12, "no_models": 4,
                             "adversary_list": [5, 7], "epochs": 500})
    schedule = [[2], list(range(310, 410))]  # attacker 5 poisons in round 2, attacker 7 in 310-409
    counts = collections.Counter()
    for round_no in range(6, 306):  # no attacker scheduled: all 12 clients drawn alike
        chosen = train.choose_participants(params, round_no, schedule)
        assert len(chosen) == 4 == len(set(chosen)) and all(0 <= c < 12 for c in chosen)
        counts.update(chosen)
    # 300 rounds x 4 of 12: each client about 100 times (binomial sd ~8), attackers 5 and 7 too
    assert sorted(counts) == list(range(12)) and min(counts.values()) > 70 and max(counts.values()) < 130
    assert train.choose_participants(params, 2, schedule)[0] == 5
    for round_no in range(310, 410):  # the scheduled attacker first, never drawn again
        chosen = train.choose_participants(params, round_no, schedule)
        assert chosen[0] == 7 and len(chosen) == 4 == len(set(chosen))
    # seeded by (seed, round): the same round repeats, other rounds and seeds differ
    assert train.choose_participants(params, 9, schedule) == train.choose_participants(params, 9, schedule)
    assert len({tuple(train.choose_participants(params, r, schedule)) for r in range(6, 16)}) > 5
    other_seed = {**params, "seed": params["seed"] + 1}
    assert any(train.choose_participants(other_seed, r, schedule) != train.choose_participants(params, r, schedule)
               for r in range(6, 16))
    no_attack = {**params, "is_poison": False}  # no one is scheduled
    unscheduled = train.choose_participants(no_attack, 350, [[], []])
    assert train.choose_participants(no_attack, 350, schedule) == unscheduled


def test_reference_yaml_loads_with_one_warning(tmp_path, caplog):
    """The authors' YAML key set (values as in their fashion_mnist.yaml) loads unchanged."""
    ckpt = tmp_path / "model_last.pt.tar.epoch_200"
    torch.save({"state_dict": build_model("MnistNet", (1, 28, 28), 10).state_dict(), "epoch": 200, "lr": 0.1}, ckpt)
    reference = {
        "type": "fashion_mnist", "test_batch_size": 64, "lr": 0.1, "poison_lr": 0.05,
        "poison_step_lr": True, "momentum": 0.9, "decay": 0.0005, "batch_size": 64, "epochs": 300,
        "lr_para": 0.1, "internal_epochs": 1, "internal_poison_epochs": 20, "poisoning_per_batch": 20,
        "aggr_epoch_interval": 1, "aggregation_methods": "mean", "geom_median_maxiter": 10,
        "fg_use_memory": True, "participants_namelist": list(range(10)), "no_models": 10,
        "number_of_total_participants": 100, "is_random_namelist": True, "is_random_adversary": False,
        "is_poison": True, "invert": False, "confidence_threshold": 0.0, "sampling_dirichlet": True,
        "dirichlet_alpha": 0.5, "baseline": False, "scale_weights_poison": 100,
        "adversary_list": [41, 73, 51, 74], "poison_label_swap": 2, "centralized_test_trigger": True,
        "trigger_num": 4, "0_poison_pattern": [[0, 0], [0, 1], [0, 2], [0, 3]],
        "1_poison_pattern": [[0, 6], [0, 7], [0, 8], [0, 9]], "2_poison_pattern": [[3, 0], [3, 1], [3, 2], [3, 3]],
        "3_poison_pattern": [[3, 6], [3, 7], [3, 8], [3, 9]], "0_poison_epochs": [202],
        "1_poison_epochs": [204], "2_poison_epochs": [206], "3_poison_epochs": [208], "save_model": True,
        "save_each_model": False, "save_on_epochs": [200, 210], "resumed_model": True,
        "resumed_model_name": str(ckpt), "log_interval": 2, "poison_momentum": 0.9,
        "poison_decay": 0.005, "results_json": False, "alpha_loss": 1, "diff_privacy": False,
        "sigma": 0.01, "poison_epochs": list(range(1, 71)),
    }
    path = tmp_path / "fashion_mnist.yaml"
    path.write_text(yaml.safe_dump(reference))
    with caplog.at_level(logging.WARNING):
        params = config.load_config(str(path))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "poison_decay" in warnings[0].getMessage()
    assert params["invert"] is False and params["trigger_num"] == 4 and params["model"] == "MnistNet"


def test_our_yaml_files_load():
    for name in ("mnist", "fashion_mnist", "cifar"):
        raw = config.load_raw(f"utils/{name}.yaml")
        raw["resumed_model"] = False
        params = config.resolve(raw)
        assert params["type"] == name and params["attack_mode"] == "single_shot"
        assert len(attacks.attacker_rounds(params, 1)) == 4


def test_mnistnet_with_batchnorm_is_an_option_that_keeps_the_reference_names():
    plain = set(build_model("MnistNet", (1, 28, 28), 10).state_dict())
    with_bn = set(build_model("MnistNetBN", (1, 28, 28), 10).state_dict())
    assert plain == {f"{layer}.{p}" for layer in ("conv1", "conv2", "fc1", "fc2") for p in ("weight", "bias")}
    assert with_bn - plain == {f"bn{i}.{k}" for i in (1, 2) for k in
                               ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")}


def test_a_missing_yml_suggests_the_yaml_beside_it(tmp_path):
    (tmp_path / "exp.yaml").write_text("type: mnist\n")
    with pytest.raises(config.ConfigError, match=r"'.*exp\.yml' not found; did you mean '.*exp\.yaml'\?"):
        config.load_raw(str(tmp_path / "exp.yml"))
    with pytest.raises(config.ConfigError, match=r"'.*other\.yml' not found$"):
        config.load_raw(str(tmp_path / "other.yml"))
