"""MnistNet of the DBA/FLIP reference: two 5x5 conv + max-pool stages and two linear layers.

Parameter names match the reference checkpoints (conv1, conv2, fc1, fc2) so they load directly.
``batchnorm=True`` (the `MnistNetBN` model) adds BatchNorm after each convolution (bn1, bn2): not
in the reference, an option for studying defenses on a small model with BatchNorm statistics.
The reference returns log-probabilities; we return logits, which give the same softmax and the
same cross-entropy.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F


def _after_conv_pool(size):
    """Spatial size after conv(5) + maxpool(2), twice."""
    return ((size - 4) // 2 - 4) // 2


def max_pool_2x2(x):
    """2x2 max pooling with stride 2. Without autograd, on an NCHW tensor, it is the elementwise
    maximum of each window's four corners: the values and layout of ``F.max_pool2d`` (a tie of
    +0 and -0 may keep the other sign, which no later layer carries into a nonzero number: the
    logits are the same bits), whose CPU kernel for NCHW also finds every window's argmax and is
    several times slower. With autograd, or channels-last (whose kernel is fast), it is
    ``F.max_pool2d``, whose gradient goes to the first maximal element of a window."""
    if torch.is_grad_enabled() or not x.is_contiguous():
        return F.max_pool2d(x, 2, 2)
    h, w = x.shape[2] // 2 * 2, x.shape[3] // 2 * 2
    top = torch.maximum(x[:, :, 0:h:2, 0:w:2], x[:, :, 0:h:2, 1:w:2])
    bottom = torch.maximum(x[:, :, 1:h:2, 0:w:2], x[:, :, 1:h:2, 1:w:2])
    return torch.maximum(top, bottom)


class MnistNet(nn.Module):
    def __init__(self, channels=1, height=28, width=28, num_classes=10, batchnorm=False):
        super().__init__()
        h, w = _after_conv_pool(height), _after_conv_pool(width)
        if h < 1 or w < 1:
            raise ValueError(f"MnistNet needs inputs of at least 16x16, got {height}x{width}")
        self.conv1 = nn.Conv2d(channels, 20, 5, 1)
        self.conv2 = nn.Conv2d(20, 50, 5, 1)
        self.bn1 = nn.BatchNorm2d(20) if batchnorm else nn.Identity()
        self.bn2 = nn.BatchNorm2d(50) if batchnorm else nn.Identity()
        self.fc1 = nn.Linear(50 * h * w, 500)
        self.fc2 = nn.Linear(500, num_classes)

    def forward(self, x):
        # ReLU after max-pooling: the reference's order pools after ReLU, but ReLU is monotone, so
        # both orders give the same outputs and gradients bit for bit, and this one applies it to
        # a quarter of the elements.
        x = F.relu(max_pool_2x2(self.bn1(self.conv1(x))))
        x = F.relu(max_pool_2x2(self.bn2(self.conv2(x))))
        x = F.relu(self.fc1(x.flatten(1)))
        return self.fc2(x)
