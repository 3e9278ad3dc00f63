"""Model constructors, chosen by the config's `model` key with shapes from the data."""

from models.mnist_net import MnistNet
from models.resnet_cifar import ResNet18


def build_model(name, image_shape, num_classes):
    """Return a fresh model for inputs of ``image_shape`` (C, H, W) and ``num_classes`` outputs."""
    channels, height, width = image_shape
    if name in ("MnistNet", "MnistNetBN"):
        return MnistNet(channels, height, width, num_classes, batchnorm=name == "MnistNetBN")
    if name == "ResNet18":
        return ResNet18(channels, num_classes)
    raise ValueError(f"unknown model {name!r}")
