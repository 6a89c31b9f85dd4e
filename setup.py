"""embdim: learned embedding sizes for TorchRec-sharded CTR models.

Install the pinned torch / fbgemm-gpu / torchrec triple first (see README.md); this package
does not list them as requirements because pip would pick an ABI-incompatible fbgemm-gpu.
"""

from setuptools import find_packages, setup

_SUBPACKAGES = find_packages(include=["trainer*", "sharding*", "embedding_methods*", "launch*"])

setup(
    name="embdim",
    version="0.1.0",
    description="Search and retrain mixed-dimension embeddings on TorchRec-sharded DLRM models",
    python_requires=">=3.10",
    # The top-level folders install as subpackages of ``embdim`` (embdim/__init__.py), so they cannot
    # collide with a user's own ``trainer``, ``launch`` or ``sharding`` package.
    packages=["embdim"] + [f"embdim.{p}" for p in _SUBPACKAGES],
    package_dir={"embdim": "embdim", **{f"embdim.{p}": p.replace(".", "/") for p in _SUBPACKAGES}},
    # tomli: the TOML parser that Python 3.11 ships as tomllib (trainer/config.py).
    install_requires=["pyarrow>=14", "numpy>=1.24", "tqdm", "torchmetrics==1.0.3", 'tomli; python_version < "3.11"'],
    entry_points={"console_scripts": ["embdim = embdim.launch.main:cli"]},
)
