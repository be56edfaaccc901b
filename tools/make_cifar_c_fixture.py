"""Build tests/fixtures/cifar_c_reference.npz from the original CIFAR-10-C generator.

Runs the corruption functions of hendrycks/robustness ``ImageNet-C/create_c/make_cifar_c.py``
(loaded from the path given with ``--reference``; nothing of it is copied here) on a fixed
set of 32×32 colour crops of scikit-image's bundled sample photographs, and stores:

- ``clean``: the crops, uint8 ``[N, 32, 32, 3]``;
- ``out/<name>``: the reference's output, uint8 ``[5, N, 32, 32, 3]`` (severities 1..5),
  for every corruption without randomness;
- ``dist/<name>``: for the random ones, the mean absolute difference to the clean crops
  (grey levels, over all pixels of all crops), ``[5, seeds]``: one column per
  ``np.random.seed(seed)`` run, which gives the reference's seed spread;
- ``meta``: a JSON string with the reference commit, the command and the library versions.

It needs the reference's own environment (numpy < 2, scipy, scikit-image < 0.20 for
``multichannel=``, opencv-python-headless, Wand with ImageMagick 6) and the frost photographs
beside the script (``--frost-dir``, the reference reads ``./frost<k>.png`` from the current
directory). It does not import kdbench. Example::

    python tools/make_cifar_c_fixture.py --reference /tmp/ref/work/make_cifar_c.py \\
        --commit 8190fe329f5f072a06e3a2aea02bb5dda69aed9f \\
        --out tests/fixtures/cifar_c_reference.npz
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import platform
import sys
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

#: the reference's 19 corruption functions, by their CIFAR-10-C file names
ALL = (
    "gaussian_noise", "shot_noise", "impulse_noise", "defocus_blur", "glass_blur", "motion_blur",
    "zoom_blur", "snow", "frost", "fog", "brightness", "contrast", "elastic_transform", "pixelate",
    "jpeg_compression", "speckle_noise", "gaussian_blur", "spatter", "saturate",
)  # fmt: skip
DETERMINISTIC = (
    "defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
    "gaussian_blur", "saturate",
)  # fmt: skip
#: (sample image, short side after a BOX resize, crop corners (top, left))
SOURCES = (
    ("astronaut", 96, ((10, 30), (50, 8))),
    ("chelsea", 96, ((20, 40), (50, 90))),
    ("coffee", 96, ((30, 40), (10, 90))),
    ("hubble_deep_field", 96, ((50, 60),)),
    ("immunohistochemistry", 96, ((10, 10),)),
)


def load_reference(path: Path) -> dict[str, Any]:
    """The module-level definitions of ``make_cifar_c.py`` (its data-set loop is not run).

    Statements are taken up to the first top-level ``print`` (where the script starts
    loading CIFAR-10); imports of torch/torchvision, which the corruptions do not use, are
    left out so that the reference's environment needs no torch.
    """
    tree = ast.parse(path.read_text(), str(path))
    body = []
    for node in tree.body:
        if isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            if getattr(node.value.func, "id", None) == "print":
                break
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] + [getattr(node, "module", None) or ""]
            if any(n.split(".")[0] in ("torch", "torchvision") for n in names):
                continue
        body.append(node)
    namespace: dict[str, Any] = {"__name__": "make_cifar_c_reference"}
    exec(compile(ast.Module(body=body, type_ignores=[]), str(path), "exec"), namespace)
    return namespace


def clean_images() -> np.ndarray:
    """Fixed colour crops ``[N, 32, 32, 3]`` of scikit-image's sample photographs."""
    from skimage import data

    crops = []
    for name, side, corners in SOURCES:
        img = Image.fromarray(getattr(data, name)()).convert("RGB")
        scale = side / min(img.size)
        img = img.resize((round(img.width * scale), round(img.height * scale)), Image.BOX)
        arr = np.asarray(img)
        crops += [arr[t : t + 32, left : left + 32] for t, left in corners]
    return np.stack(crops).astype(np.uint8)


def run(fn: Any, clean: np.ndarray, severity: int) -> np.ndarray:
    """The reference's own loop: a PIL image in, ``np.uint8(result)`` out, image by image."""
    return np.stack([np.uint8(fn(Image.fromarray(img), severity)) for img in clean])


def build(ref: dict[str, Any], clean: np.ndarray, seeds: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {"clean": clean}
    for name in ALL:
        fn = ref[name]
        if name in DETERMINISTIC:
            arrays[f"out/{name}"] = np.stack([run(fn, clean, s) for s in range(1, 6)])
            continue
        dist = np.zeros((5, seeds))
        for s in range(1, 6):
            for k in range(seeds):
                np.random.seed(k)
                out = run(fn, clean, s).astype(np.float64)
                dist[s - 1, k] = np.abs(out - clean).mean()
        arrays[f"dist/{name}"] = dist
        print(f"{name}: {np.round(dist.mean(1), 3)} ± {np.round(dist.std(1), 3)}", flush=True)
    return arrays


def versions() -> dict[str, str]:
    import cv2
    import scipy
    import skimage
    import wand.version
    from PIL import __version__ as pil

    return {
        "python": platform.python_version(),
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-image": skimage.__version__,
        "opencv": cv2.__version__,
        "Pillow": pil,
        "ImageMagick": wand.version.MAGICK_VERSION,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--reference", type=Path, required=True, help="path of make_cifar_c.py")
    p.add_argument("--commit", required=True, help="hendrycks/robustness commit of that file")
    p.add_argument("--frost-dir", type=Path, help="folder of frost1.png..frost6.jpg (default: beside it)")
    p.add_argument("--seeds", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    a = p.parse_args()
    out = a.out.resolve()
    ref = load_reference(a.reference.resolve())
    os.chdir(a.frost_dir or a.reference.resolve().parent)  # the reference opens ./frost<k>.png
    clean = clean_images()
    arrays = build(ref, clean, a.seeds)
    meta = {
        "reference": "hendrycks/robustness ImageNet-C/create_c/make_cifar_c.py",
        "commit": a.commit,
        "command": "python tools/make_cifar_c_fixture.py " + " ".join(sys.argv[1:]),
        "images": "crops of scikit-image sample photographs: "
        + ", ".join(f"{n} (short side {s}, corners {c})" for n, s, c in SOURCES),
        "seeds": list(range(a.seeds)),
        "versions": versions(),
    }
    np.savez_compressed(out, meta=np.array(json.dumps(meta)), **arrays)
    print(f"wrote {out} ({out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
