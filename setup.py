from setuptools import find_packages, setup

setup(
    name="scale",
    version="0.1.0",
    description="Occluded-image Contrastive Learning (OCL) pre-training for Vision Transformers, at cluster scale",
    long_description=open("README.md").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.10",
    packages=find_packages(include=["scale", "scale.*", "data_prep", "data_prep.*"]),
    install_requires=[
        "torch>=2.4",
        "torchvision",
        "timm>=1.0",
        "webdataset>=0.2.86",
        "accelerate>=0.30",
        "deepspeed>=0.14",
        "pyyaml",
        "safetensors",
        "tensorboard",
        "tqdm",
    ],
    extras_require={
        "xformers": ["xformers"],  # CUDA only; SDPA is used where it cannot run
        "test": ["pytest", "pytest-timeout"],
    },
    entry_points={"console_scripts": ["scale-train=scale.train:main"]},
)
