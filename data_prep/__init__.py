"""Command-line entry points of the shard converters, for a checkout (not installed by setup.py).

Each script here is a thin wrapper over `scale.shards`, where the code lives; an installed scale
has the same commands as console scripts:

    python -m data_prep.imagefolder_to_wds ...    scale-prep-imagefolder ...
    python -m data_prep.fashion_mnist_to_wds ...  scale-prep-fashion-mnist ...
    python -m data_prep.verify_shards DIR         scale-verify-shards DIR

`python data_prep/<script>.py ...` works too, from any folder.
"""
