"""The bundled real photos (scikit-image's sample data), used by the demo and the tests."""
from __future__ import annotations

import numpy as np
from PIL import Image

from psvae_core.images import resize_center_crop

# Natural photos shipped with scikit-image (public domain / CC0, see skimage.data); grey ones are
# expanded to RGB on load.
SAMPLE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "retina",
                 "immunohistochemistry", "motorcycle_left", "motorcycle_right", "camera", "moon", "coins")


def _load(name: str) -> np.ndarray:
    import skimage.data

    if name.startswith("motorcycle_"):
        left, right, _ = skimage.data.stereo_motorcycle()
        return left if name.endswith("left") else right
    return getattr(skimage.data, name)()


def sample_photos(size: int = 256, names=SAMPLE_PHOTOS) -> dict[str, Image.Image]:
    """name -> `size`x`size` RGB PIL image (shorter side resized, centre crop)."""
    return {name: resize_center_crop(Image.fromarray(_load(name)), size) for name in names}

