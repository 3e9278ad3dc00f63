"""Local training of one client: benign SGD, DBA poisoned training, model replacement."""

import torch
import torch.nn.functional as F

from image_helper import poison_batch


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


def poison_train(model, data, client_id, trigger, params, generator):
    """DBA attacker training: in every batch the first `poisoning_per_batch` samples carry the
    attacker's trigger (boolean H x W mask) and the target label; returns the sample count."""
    n = len(data.client_indices[client_id])
    epochs = params["internal_poison_epochs"]
    optimizer = sgd(model, params["poison_lr"], params)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[0.2 * epochs, 0.8 * epochs], gamma=0.1)
    model.train()
    for _ in range(epochs):
        for idx in shuffled_batches(n, params["batch_size"], generator, data.train_x.device):
            x, y = data.client_batch(client_id, idx)
            x, y = poison_batch(x, y, trigger, params["poisoning_per_batch"], params["poison_label_swap"])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        if params["poison_step_lr"]:
            scheduler.step()
    return n


def state_difference(local_state, global_state):
    """Update of a client: local minus global, for every state_dict entry."""
    return {k: local_state[k] - global_state[k] for k in global_state}


def scale_update(update, factor):
    """Model replacement: w = G + factor·(w − G) is the update times ``factor``. Integer buffers
    (BatchNorm's num_batches_tracked) are not scaled."""
    return {k: v * factor if v.is_floating_point() else v for k, v in update.items()}
