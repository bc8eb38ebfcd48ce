from setuptools import find_packages, setup

# The recipes (YAML, DeepSpeed JSON, accelerate configs) stay in the checkout's top-level recipes/
# folder; a wheel ships them as scale/recipes/ (package data of the data-only package scale.recipes).
# scale/recipe_catalog.py looks there, then in the checkout (editable install, or PYTHONPATH).
# data_prep/ is not installed: its scripts are thin entry points over scale.shards.

setup(
    name="scale",
    version="0.1.0",
    description="Masked-image self-supervised pre-training of Vision Transformers (OCL, MAE), at cluster scale",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["scale", "scale.*"]) + ["scale.recipes"],
    package_dir={"scale.recipes": "recipes"},
    package_data={"scale.recipes": ["*.yaml", "deepspeed/*.json", "accelerate/*.yaml"]},
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "accelerate>=0.30",
        # A resume on another world size reads ZeRO partitions with DeepSpeed's own layout functions
        # (private API, scale/checkpoint_io/deepspeed.py); 0.19.8 is the release tested with them.
        "deepspeed>=0.19.8",
        "matplotlib",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "xformers": ["xformers"],  # CUDA only; SDPA is used where it cannot run
        # setuptools + wheel: tests/test_packaging.py builds the wheel offline (--no-build-isolation);
        # ruff: make test lints the tree with ruff.toml's rules
        "test": ["pytest", "pytest-timeout", "ruff", "setuptools", "wheel"],
    },
    entry_points={"console_scripts": [
        "scale-train=scale.train:main",
        "scale-eval=scale.eval.__main__:main",
        "scale-export=scale.export:main",
        "scale-demo=scale.demo:main",
        "scale-plot=scale.plot:main",
        "scale-mask-pictures=scale.mask_pictures:main",
        "scale-prep-imagefolder=scale.shards.imagefolder:main",
        "scale-prep-fashion-mnist=scale.shards.fashion_mnist:main",
        "scale-verify-shards=scale.shards.verify:main",
    ]},
)
