from setuptools import find_packages, setup

setup(
    name="objguided_d2",
    version="0.1.0",
    description=(
        "Object-guided instance segmentation (Yi et al., IEEE TMI 2021) as a Detectron2 plugin"
    ),
    packages=find_packages(include=["objguided_d2", "objguided_d2.*"]),
    # The bundled nuclei set (dsb2018_mini_{train,val}).
    package_data={"objguided_d2.data": ["bundled/dsb2018_mini/*.*", "bundled/*/*/*/*.png"]},
    python_requires=">=3.10",
    # detectron2 is not on the package registry under its own name: install it first (README).
    install_requires=[
        "torch>=2.0",
        "torchvision",
        "numpy>=2",
        "opencv-python-headless",
        "Pillow",
        "tifffile",
        "scipy",
        "pycocotools",
        "tqdm",
    ],
    extras_require={"test": ["pytest", "ruff"]},
)
