"""Evaluation of the global model: main accuracy (MA) and backdoor accuracy (BA).

A prediction counts only if its softmax top-1 probability is at least the confidence threshold;
a rejected prediction counts as wrong. Every metric is reported raw (no threshold) and
thresholded; accuracies are percentages.
"""

import torch

from image_helper import stamp

CPU_CHUNK = 128


@torch.no_grad()
def predict(model, x, batch_size, mask=None):
    """Predicted labels and their softmax confidence for images ``x``, stamped with ``mask`` if
    given. On a CPU a forward pass takes at most ``CPU_CHUNK`` images, fewer than the usual
    ``test_batch_size``: faster, because the first convolution's output then stays in the cache.
    The labels are those of one whole-batch pass and the confidences equal them to float rounding
    (tests/test_metrics.py checks it; docs/performance.md says where they are the same bits)."""
    was_training = model.training
    model.eval()
    step = batch_size if x.device.type != "cpu" else min(batch_size, CPU_CHUNK)
    preds, confs = [], []
    for xb in x.split(step):
        if mask is not None:
            xb = stamp(xb, mask)
        conf, pred = model(xb).softmax(dim=1).max(dim=1)
        preds.append(pred)
        confs.append(conf)
    model.train(was_training)
    return torch.cat(preds), torch.cat(confs)


def score(pred, conf, labels, threshold):
    """(raw accuracy %, thresholded accuracy %, rejected fraction) as tensors."""
    correct = pred == labels
    accepted = conf >= threshold
    return (100.0 * correct.float().mean(), 100.0 * (correct & accepted).float().mean(),
            1.0 - accepted.float().mean())


def evaluate(model, data, params, triggers):
    """Metrics of ``model`` on the test set. ``triggers`` maps a name ("global", "trigger_0", ...)
    to its boolean mask; BA uses test images whose label is not the target."""
    threshold, batch, target = params["confidence_threshold"], params["test_batch_size"], params["poison_label_swap"]
    raw, acc, rejected = score(*predict(model, data.test_x, batch), data.test_y, threshold)
    out = {"main_acc": acc, "main_acc_raw": raw, "rejected_frac": rejected}
    keep = data.test_y != target
    x_bd = data.test_x[keep]
    y_bd = torch.full((len(x_bd),), target, device=x_bd.device)
    for name, mask in triggers.items():
        raw, acc, rejected = score(*predict(model, x_bd, batch, mask), y_bd, threshold)
        prefix = "backdoor" if name == "global" else f"ba_{name}"
        out[f"{prefix}_acc" if name == "global" else prefix] = acc
        out[f"{prefix}_acc_raw" if name == "global" else f"{prefix}_raw"] = raw
        if name == "global":
            out["backdoor_rejected_frac"] = rejected
    return {k: round(float(v), 4) for k, v in out.items()}
