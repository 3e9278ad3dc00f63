import numpy as np
import torch
import torch.nn as nn

import models.mnist_net as mnist_net
from image_helper import FederatedData, stamp, trigger_mask
from test import CPU_CHUNK, evaluate, predict, score


class PixelRule(nn.Module):
    """Hand-made classifier: predicts class 2 with confidence ~0.9 when pixel (0, 0) is 1;
    otherwise class 0 with confidence 0.5 (logits 0 vs -inf-ish split between two classes)."""

    def forward(self, x):
        hit = (x[:, 0, 0, 0] == 1.0).float()
        logits = torch.full((len(x), 3), -20.0)
        logits[:, 2] = hit * 5.0 - (1 - hit) * 20.0
        logits[:, 0] = (1 - hit) * 0.0 + hit * (5.0 - 2.2)
        logits[:, 1] = (1 - hit) * 0.0 - hit * 20.0
        return logits


def _data():
    test_x = torch.zeros(10, 1, 4, 4)
    test_y = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 2, 2])
    return FederatedData(test_x, test_y, test_x, test_y, [], (1, 4, 4), 3)


def test_score_counts_rejected_as_wrong():
    pred = torch.tensor([1, 1, 0, 0])
    conf = torch.tensor([0.9, 0.3, 0.8, 0.5])
    labels = torch.tensor([1, 1, 1, 0])
    raw, acc, rejected = score(pred, conf, labels, 0.4)
    assert float(raw) == 75.0 and float(acc) == 50.0 and float(rejected) == 0.25


def test_ma_and_ba_with_and_without_threshold():
    params = {"confidence_threshold": 0.0, "test_batch_size": 3, "poison_label_swap": 2}
    triggers = {"global": trigger_mask([[0, 0]], 4, 4), "trigger_0": trigger_mask([[3, 3]], 4, 4)}
    m = evaluate(PixelRule(), _data(), params, triggers)
    # clean: predicts 0 (confidence 0.5) everywhere -> 6 of 10 correct
    assert m["main_acc_raw"] == 60.0 and m["main_acc"] == 60.0 and m["rejected_frac"] == 0.0
    # BA on the 8 non-target images: the global trigger hits pixel (0, 0) -> all predicted 2
    assert m["backdoor_acc_raw"] == 100.0 and m["backdoor_acc"] == 100.0
    # local trigger 0 does not touch pixel (0, 0) -> no backdoor
    assert m["ba_trigger_0_raw"] == 0.0
    params["confidence_threshold"] = 0.6
    m = evaluate(PixelRule(), _data(), params, triggers)
    assert m["main_acc_raw"] == 60.0 and m["main_acc"] == 0.0 and m["rejected_frac"] == 1.0
    assert m["backdoor_acc"] == 100.0 and m["backdoor_rejected_frac"] == 0.0


def test_the_run_plot_draws_ma_and_ba_per_round(tmp_path):
    """metrics.png: a 7×4 in figure at 120 dpi whose pixels include the MA line (matplotlib's first
    colour, #1f77b4) and the BA line (the second, #ff7f0e); no metrics, no plot."""
    import matplotlib.image

    import helper

    path = tmp_path / "metrics.csv"
    path.write_text("round,main_acc,backdoor_acc,main_acc_raw,backdoor_acc_raw\n"
                    "1,80,5,80,5\n2,60,50,61,52\n3,70,90,72,91\n")
    out = tmp_path / "metrics.png"
    helper.plot_metrics(str(path), str(out), "title")
    image = matplotlib.image.imread(str(out))[..., :3]
    assert image.shape[:2] == (480, 840)

    def pixels_of(hex_colour):
        rgb = np.array([int(hex_colour[i:i + 2], 16) / 255 for i in (1, 3, 5)])
        return int((np.abs(image - rgb).max(axis=-1) < 0.05).sum())

    assert pixels_of("#1f77b4") > 200 and pixels_of("#ff7f0e") > 200
    empty = tmp_path / "empty.csv"
    empty.write_text("round,main_acc,backdoor_acc,main_acc_raw,backdoor_acc_raw\n")
    helper.plot_metrics(str(empty), str(tmp_path / "none.png"))
    assert not (tmp_path / "none.png").exists()


def test_pooling_without_autograd_gives_max_pool2d_values_and_the_same_logits(monkeypatch):
    import torch.nn.functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randn(5, 3, 25, 24, generator=g)  # odd height: max_pool2d drops the last row
    x[:, :, :8] = 0.5  # ties
    x[:, 0, 8:12] = torch.tensor([0.0, -0.0]).repeat(12)  # ties of signed zeros
    x[1, 1, 9, 3] = float("nan")
    ref = F.max_pool2d(x, 2, 2)
    with torch.no_grad():
        fast = mnist_net.max_pool_2x2(x)
    assert fast.shape == ref.shape == (5, 3, 12, 12) and fast.stride() == ref.stride()
    assert torch.equal(fast.isnan(), ref.isnan()) and fast.isnan().sum() == 1
    assert torch.equal(fast.nan_to_num(), ref.nan_to_num())  # equal values, a zero's sign aside
    # with autograd it is max_pool2d itself: the gradient of a tie goes to the window's first element
    xr = x.nan_to_num().requires_grad_(True)
    grad_out = torch.randn(ref.shape, generator=g)
    (mnist_net.max_pool_2x2(xr) * grad_out).sum().backward()
    first = torch.zeros(5, 3, 8, 24)
    first[:, :, 0::2, 0::2] = grad_out[:, :, :4]
    assert torch.equal(xr.grad[:, :, :8], first)
    # a channels-last tensor (FLIP's frozen copies) keeps max_pool2d and its layout
    cl = x.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert mnist_net.max_pool_2x2(cl).stride() == F.max_pool2d(cl, 2, 2).stride()

    # the model's logits are the same bits: a zero's sign never reaches a nonzero number
    torch.manual_seed(1)
    model = mnist_net.MnistNet().eval()
    with torch.no_grad():
        model.conv1.bias.zero_()
        model.conv2.bias.zero_()  # blank regions then give signed zeros at both poolings
    images = torch.zeros(64, 1, 28, 28)
    images[:48].view(48, -1)[:, torch.randperm(784, generator=g)[:200]] = torch.rand(48, 200, generator=g)
    with torch.no_grad():
        fast_logits = model(images)
        monkeypatch.setattr(mnist_net, "max_pool_2x2", lambda t: F.max_pool2d(t, 2, 2))
        ref_logits = model(images)
    assert torch.equal(fast_logits.view(torch.int32), ref_logits.view(torch.int32))


def test_cpu_evaluation_in_chunks_gives_the_whole_batch_predictions():
    """Labels equal, confidences equal to float rounding: with more than one thread MKL may split
    a small batch's matrix product differently, a few units in the last place apart."""
    torch.manual_seed(2)
    model = mnist_net.MnistNet().train()
    x = torch.rand(2 * CPU_CHUNK + 44, 1, 28, 28)
    mask = trigger_mask([[0, 0], [0, 1], [5, 7]], 28, 28)
    sizes = []
    model.register_forward_pre_hook(lambda _, args: sizes.append(len(args[0])))
    pred, conf = predict(model, x, 1000, mask)
    assert sizes == [CPU_CHUNK, CPU_CHUNK, 44] and model.training
    with torch.no_grad():
        model.eval()
        ref_conf, ref_pred = model(stamp(x, mask)).softmax(dim=1).max(dim=1)
    assert torch.equal(pred, ref_pred)
    torch.testing.assert_close(conf, ref_conf, rtol=1e-6, atol=0)
    sizes.clear()
    predict(model, x[:100], 30)  # a smaller test_batch_size is kept
    assert sizes == [30, 30, 30, 10]
