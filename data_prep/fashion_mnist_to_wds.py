"""`python -m data_prep.fashion_mnist_to_wds` or `python data_prep/fashion_mnist_to_wds.py`:
Fashion-MNIST IDX files -> WebDataset shards.

The same command as the console script `scale-prep-fashion-mnist`; the code is scale/shards/fashion_mnist.py.
"""
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("scale") is None:  # run as a file from a checkout where scale is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale.shards.fashion_mnist import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
