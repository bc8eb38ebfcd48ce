"""`python -m data_prep.verify_shards` or `python data_prep/verify_shards.py`:
Check WebDataset shards against their manifest.json.

The same command as the console script `scale-verify-shards`; the code is scale/shards/verify.py.
"""
import sys
from importlib.util import find_spec
from pathlib import Path

if find_spec("scale") is None:  # run as a file from a checkout where scale is not installed
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scale.shards.verify import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
