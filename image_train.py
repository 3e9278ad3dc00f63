"""Local training of one client: plain SGD passes over its data, and the update it sends."""

import torch
import torch.nn.functional as F


def shuffled_batches(n, batch_size, generator, device):
    """Index tensors of a random pass over ``n`` local samples (last batch may be short)."""
    return torch.randperm(n, generator=generator).to(device).split(batch_size)


def sgd(model, lr, params):
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=params["momentum"],
                           weight_decay=params["decay"])


def benign_train(model, data, client_id, params, generator):
    """`internal_epochs` passes of SGD on the client's own data; returns the sample count."""
    return sgd_passes(model, data, data.client_indices[client_id], params, generator)


def sgd_passes(model, data, rows, params, generator):
    """`internal_epochs` passes of SGD over the training samples ``rows``; returns their count."""
    optimizer = sgd(model, params["lr"], params)
    model.train()
    for _ in range(params["internal_epochs"]):
        for idx in shuffled_batches(len(rows), params["batch_size"], generator, data.train_x.device):
            batch = rows[idx]
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(data.train_x[batch]), data.train_y[batch]).backward()
            optimizer.step()
    return len(rows)


def state_difference(local_state, global_state):
    """Update of a client: local minus global, for every state_dict entry."""
    return {k: local_state[k] - global_state[k] for k in global_state}
