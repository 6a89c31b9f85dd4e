"""embdim: learned embedding sizes for TorchRec-sharded CTR models.

Install the pinned torch / fbgemm-gpu / torchrec triple first (see README.md); this package
does not list them as requirements because pip would pick an ABI-incompatible fbgemm-gpu.
"""

from setuptools import find_packages, setup

setup(
    name="embdim",
    version="0.1.0",
    description="Search and retrain mixed-dimension embeddings on TorchRec-sharded DLRM models",
    python_requires=">=3.10",
    packages=find_packages(include=["trainer*", "sharding*", "embedding_methods*", "launch*"]),
    install_requires=["pyarrow>=14", "numpy>=1.24", "tqdm", "torchmetrics==1.0.3"],
    entry_points={"console_scripts": ["embdim = launch.main:cli"]},
)
