"""`python -m data_prep.imagefolder_to_wds` or `python data_prep/imagefolder_to_wds.py`:
ImageFolder tree (or labelled folder) -> WebDataset shards.

The same command as the console script `scale-prep-imagefolder`; the code is scale/shards/imagefolder.py.
"""
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("scale") is None:  # run as a file from a checkout where scale is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale.shards.imagefolder import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
