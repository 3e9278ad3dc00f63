"""The inversion kernel's pieces on toy inputs, against answers computed here: the per-trigger
loss, the cost schedule, when the best trigger changes, and the re-initialisation after an
improvement. A scripted solver stands in for the model: it reports the stamped accuracy the test
chooses for each step."""

import math

import numpy as np
import pytest
import torch

import inversion
from defenses.flip import resolve_settings as resolve_flip_params

FP = resolve_flip_params({}, "fashion_mnist")


def test_trigger_loss_is_the_mean_cross_entropy_and_accuracy_of_each_triggers_images():
    logits = torch.tensor([[2.0, 0.0, 1.0], [0.0, 3.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 2.0], [0.0, 0.0, 0.0]])
    labels = torch.tensor([0, 1, 1, 2, 2])
    group = torch.tensor([0, 0, 1, 1, 1])
    weight = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0])  # the last image is padding
    count = torch.tensor([2.0, 2.0])
    ce, acc = inversion.trigger_loss(logits, labels, group, weight, count)

    def nll(row, label):
        z = np.asarray(row, dtype=float)
        return math.log(np.exp(z).sum()) - z[label]

    expected_ce = [(nll([2, 0, 1], 0) + nll([0, 3, 0], 1)) / 2, (nll([1, 1, 0], 1) + nll([0.5, 0, 2], 2)) / 2]
    assert ce.tolist() == pytest.approx(expected_ce)
    # argmax of [1, 1, 0] is class 0 (the first maximum): image 2 is wrong, image 3 right
    assert acc.tolist() == pytest.approx([1.0, 0.5])


class ScriptedSolver:
    """What adam_step needs of a Solver, with the stamped accuracy of each step given by the test
    (the loss is the mask term alone) and each step's mask L1 recorded."""

    def __init__(self, accuracies, steps):
        request = inversion.Invert(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long),
                                   torch.zeros(2, dtype=torch.long), 1, steps, 1e-3, [None])
        self.b = inversion.stack_requests([request], FP, (1, 4, 4), [torch.Generator().manual_seed(0)], "cpu")
        self.theta_m = inversion.to_theta(self.b.pop("m0")).requires_grad_()
        self.theta_p = inversion.to_theta(self.b.pop("p0")).requires_grad_()
        self.optimizer = torch.optim.Adam([self.theta_m, self.theta_p], lr=FP["inversion_lr"], betas=(0.5, 0.9))
        self.accuracies, self.regs, self.masks = iter(accuracies), [], []

    def backward(self, mask, pattern, reg):
        self.regs.append(float(reg[0, 0].detach()))
        self.masks.append(mask.detach().clone())
        ((self.b["cost"] * reg).sum() + 0 * pattern.sum()).backward()
        return torch.tensor([[float(next(self.accuracies))]])


def run_steps(accuracies):
    s = ScriptedSolver(accuracies, len(accuracies))
    trace = []
    for step in range(len(accuracies)):
        inversion.adam_step(s, FP, step)
        trace.append({"cost": float(s.b["cost"][0, 0]), "best": float(s.b["best_reg"][0, 0]),
                      "up": int(s.b["up"][0, 0]), "down": int(s.b["down"][0, 0]),
                      "theta": s.theta_m.detach().clone()})
    return s, trace


def test_cost_rises_after_patience_successes_and_falls_after_as_many_failures():
    """cost_patience 10, ×1.5 up, ÷1.5^1.5 down; a failure resets the success run."""
    script = [1] * 10 + [0] * 10 + [1] * 9 + [0] + [1] * 10
    _, trace = run_steps(script)
    c0, up, down = 1e-3, 1.5, 1.5 ** 1.5
    expected = ([c0] * 9 + [c0 * up] * 10 + [c0 * up / down] * 20 + [c0 * up / down * up])
    assert [t["cost"] for t in trace] == pytest.approx(expected, rel=1e-6)
    assert (trace[9]["up"], trace[19]["down"], trace[28]["up"], trace[29]["up"], trace[39]["up"]) == (0, 0, 9, 0, 0)


def test_the_best_trigger_changes_only_on_a_successful_improvement():
    """The best is the smallest mask among the successful steps: failing steps whose masks are
    smaller than the best so far (the script makes some) must not count."""
    script = [0, 0, 1, 0, 0, 0, 0, 1, 1, 0, 0, 0]
    s, trace = run_steps(script)
    expected, best = [], math.inf
    for accuracy, reg in zip(script, s.regs):
        if accuracy and reg < best:
            best = reg
        expected.append(best)
    assert [t["best"] for t in trace] == expected
    failing_below = [j for j, a in enumerate(script) if not a and s.regs[j] < expected[j]]
    assert failing_below  # the script did test what it says
    assert [t["best"] for t in trace][:2] == [math.inf, math.inf]


def test_an_improvement_restarts_the_mask_near_the_new_best():
    """After an improving step k the mask parameters are the best mask plus step k's noise
    (uniform in ±0.01); after a step that does not improve they are Adam's."""
    s, trace = run_steps([0, 1, 0])
    restart = (s.masks[1] + s.b["noise_m"][:, 1]).clamp(0, 1)
    assert inversion.from_theta(trace[1]["theta"]).flatten().tolist() == pytest.approx(
        restart.flatten().tolist(), abs=1e-5)
    noise = s.b["noise_m"][:, 1]
    assert float(noise.abs().max()) <= 0.01 and float(noise.abs().max()) > 0.005
    not_restarted = (s.masks[2] + s.b["noise_m"][:, 2]).clamp(0, 1)
    assert float((inversion.from_theta(trace[2]["theta"]) - not_restarted).abs().max()) > 1e-3
