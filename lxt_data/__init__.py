"""Data for lxt's demo, examples, tests and benchmarks -- not part of the LRP library.

``import lxt`` never imports this package.  It holds the pinned artefacts fetched at run time
(:mod:`lxt_data.artefacts`: version + sha256, verified before use) and the loaders built on
them (:mod:`lxt_data.models`: SmolLM2-135M from GGUF, all-MiniLM-L6-v2, a ViT trained on
scikit-learn's digits) and the photographs bundled with scikit-image
(:mod:`lxt_data.images`).

>>> from lxt_data import load_smollm2
>>> model, tokenizer = load_smollm2()
"""
from .images import IMAGES, load_image
from .models import DigitsData, load_minilm, load_smollm2, train_digits_vit

__all__ = ["DigitsData", "IMAGES", "load_image", "load_minilm", "load_smollm2", "train_digits_vit"]
