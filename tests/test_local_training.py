"""A client's local training against SGD worked out in numpy: the benign passes (learning rate,
momentum, weight decay, the client's own samples in the shuffled order, every epoch) and DBA's
poisoned passes (the first rows of each batch stamped and relabelled, the poison learning rate
divided by 10 after 20 % and 80 % of the epochs)."""

import numpy as np
import torch
import torch.nn as nn

from attacks.dba import poison_train
from image_helper import FederatedData
from image_train import benign_train

ROWS = [9, 2, 5, 11, 0, 7, 4]  # the client's samples: a shuffled subset of the training set
BATCH = 3  # seven samples: batches of 3, 3 and 1


def _setup():
    g = torch.Generator().manual_seed(0)
    train_x = torch.rand(12, 1, 2, 2, generator=g)
    train_y = torch.randint(0, 3, (12,), generator=g)
    data = FederatedData(train_x, train_y, train_x[:1], train_y[:1], [torch.tensor([1]), torch.tensor(ROWS)],
                         (1, 2, 2), 3)
    torch.manual_seed(1)
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    return data, model


def _batches(epochs, seed):
    """The client's batches in the order the training draws them: one permutation per epoch."""
    g = torch.Generator().manual_seed(seed)
    return [[np.array(ROWS)[idx.numpy()] for idx in torch.randperm(len(ROWS), generator=g).split(BATCH)]
            for _ in range(epochs)]


def _sgd(w, b, steps, momentum, decay):
    """Softmax cross-entropy SGD with momentum (no dampening) and weight decay, in float64.
    ``steps``: (images as rows, labels, learning rate)."""
    w, b = w.astype(np.float64), b.astype(np.float64)
    buf_w = buf_b = None
    for x, y, lr in steps:
        z = x @ w.T + b
        p = np.exp(z - z.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        p[np.arange(len(y)), y] -= 1.0
        p /= len(y)
        g_w, g_b = p.T @ x + decay * w, p.sum(axis=0) + decay * b
        buf_w = g_w if buf_w is None else momentum * buf_w + g_w
        buf_b = g_b if buf_b is None else momentum * buf_b + g_b
        w, b = w - lr * buf_w, b - lr * buf_b
    return w, b


def _weights(model):
    return model[1].weight.detach().numpy().copy(), model[1].bias.detach().numpy().copy()


def test_benign_training_is_sgd_with_momentum_and_decay_over_the_clients_samples():
    data, model = _setup()
    params = {"lr": 0.1, "momentum": 0.9, "decay": 0.05, "internal_epochs": 2, "batch_size": BATCH}
    w0, b0 = _weights(model)
    x, y = data.train_x.flatten(1).numpy(), data.train_y.numpy()
    steps = [(x[rows], y[rows], 0.1) for epoch in _batches(2, seed=5) for rows in epoch]
    w_ref, b_ref = _sgd(w0, b0, steps, momentum=0.9, decay=0.05)

    n = benign_train(model, data, 1, params, torch.Generator().manual_seed(5))
    w, b = _weights(model)
    assert n == 7 and len(steps) == 6
    np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)
    np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-6)
    assert np.abs(w - w0).max() > 0.05  # it moved far beyond the tolerance


def _poisoned_steps(data, epochs, lrs, mask, n_poison, target, seed):
    x, y = data.train_x.flatten(1).numpy(), data.train_y.numpy()
    pixels = mask.flatten().numpy()
    steps = []
    for epoch, lr in zip(_batches(epochs, seed), lrs):
        for rows in epoch:
            xb, yb = x[rows].copy(), y[rows].copy()
            xb[:n_poison, pixels] = 1.0
            yb[:n_poison] = target
            steps.append((xb, yb, lr))
    return steps


def test_dba_poisoned_training_stamps_relabels_and_steps_its_learning_rate_down():
    mask = torch.tensor([[False, True], [False, False]])
    training = {"batch_size": BATCH, "momentum": 0.9, "decay": 0.05, "target": 2}
    for step_lr, lrs in ((True, [0.05, 0.005, 0.005, 0.005, 0.0005]), (False, [0.05] * 5)):
        data, model = _setup()
        w0, b0 = _weights(model)
        steps = _poisoned_steps(data, 5, lrs, mask, n_poison=2, target=2, seed=7)
        w_ref, b_ref = _sgd(w0, b0, steps, momentum=0.9, decay=0.05)

        n = poison_train(model, data, 1, mask, torch.Generator().manual_seed(7), training,
                         poisoning_per_batch=2, poison_lr=0.05, poison_step_lr=step_lr, internal_poison_epochs=5)
        w, b = _weights(model)
        assert n == 7
        np.testing.assert_allclose(w, w_ref, rtol=0, atol=1e-6)
        np.testing.assert_allclose(b, b_ref, rtol=0, atol=1e-6)
