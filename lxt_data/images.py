"""Real photographs available offline: the sample images bundled in the scikit-image wheel
(no download at run time), for the image-text demo and the real-image tests.

>>> from lxt_data import load_image, IMAGES
>>> cat = load_image("chelsea")            # a PIL.Image (RGB)
>>> small = load_image("astronaut", size=64)  # resized so that its longer side is 64 px
"""
from __future__ import annotations

from typing import Optional

#: name -> what it shows (all in ``skimage.data``, bundled with scikit-image 0.26)
IMAGES = {
    "astronaut": "the astronaut Eileen Collins, portrait (512 x 512)",
    "chelsea": "Chelsea the cat, close-up (451 x 300)",
    "coffee": "a cup of coffee on a saucer (600 x 400)",
    "rocket": "a rocket on its launch pad (640 x 427)",
    "camera": "a man with a camera on a tripod, greyscale (512 x 512)",
}


def load_image(name: str = "chelsea", size: Optional[int] = None):
    """The bundled sample image ``name`` (a key of :data:`IMAGES`) as an RGB ``PIL.Image``;
    ``size``: resized (bicubic) so that its longer side has ``size`` pixels."""
    if name not in IMAGES:
        raise ValueError(f"lxt_data: no image {name!r}; available: {', '.join(IMAGES)}.")
    if size is not None and (isinstance(size, bool) or not isinstance(size, int) or size < 1):
        raise ValueError(f"lxt_data: size must be a positive integer, got {size!r}.")
    try:
        from skimage import data
    except ImportError as e:
        raise ImportError("lxt_data.load_image needs scikit-image (pip install scikit-image; "
                          "its wheel holds the sample images, nothing is downloaded).") from e
    from PIL import Image

    array = getattr(data, name)()
    image = Image.fromarray(array).convert("RGB")
    if size is not None:
        scale = size / max(image.size)
        image = image.resize((max(1, round(image.width * scale)), max(1, round(image.height * scale))),
                             Image.BICUBIC)
    return image
