"""DBA (Xie et al., ICLR 2020): each attacker trains with its own local trigger, one part of the
global trigger; a lone attacker stamps the global trigger, as the reference does."""

import torch
import torch.nn.functional as F

from attacks.registry import attack
from image_helper import poison_batch
from image_train import sgd, shuffled_batches
from settings import Field, non_negative, positive

SETTINGS = {
    "poisoning_per_batch": Field("int", 20, non_negative, ">= 0"),
    "poison_lr": Field("float", 0.05, positive, "> 0"),
    "poison_step_lr": Field("bool", True),
    "internal_poison_epochs": Field("int", 10, positive, ">= 1"),
}


def own_trigger(slot, n_attackers):
    return -1 if n_attackers == 1 else slot


def fits_batch(params):
    if params["poisoning_per_batch"] > params["batch_size"]:
        return "poisoning_per_batch: exceeds batch_size"
    return None


@attack("dba", label="DBA", settings=SETTINGS, trigger_index=own_trigger, check=fits_batch)
def poison_train(model, data, client_id, trigger, generator, training, poisoning_per_batch, poison_lr,
                 poison_step_lr, internal_poison_epochs):
    """`internal_poison_epochs` passes in which the first `poisoning_per_batch` samples of every
    batch carry the trigger and the target label; SGD at `poison_lr`, divided by 10 after 20 % and
    80 % of the passes when `poison_step_lr`. Returns the sample count."""
    n = len(data.client_indices[client_id])
    optimizer = sgd(model, poison_lr, training)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(
        optimizer, milestones=[0.2 * internal_poison_epochs, 0.8 * internal_poison_epochs], gamma=0.1)
    model.train()
    for _ in range(internal_poison_epochs):
        for idx in shuffled_batches(n, training["batch_size"], generator, data.train_x.device):
            x, y = data.client_batch(client_id, idx)
            x, y = poison_batch(x, y, trigger, poisoning_per_batch, training["target"])
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()
            optimizer.step()
        if poison_step_lr:
            scheduler.step()
    return n
