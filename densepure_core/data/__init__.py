"""Data sets: the bundled scikit-learn digits (:mod:`.digits`) and image sources (:mod:`.sources`).

Imports :mod:`densepure_core.config` (the dataset section) and :mod:`densepure_core.remote`.
Only the digits API is re-exported here; ``sources`` imports fsspec/PIL lazily through its own
module, so ``import densepure_core.data`` stays cheap. Try::

    .venv/bin/python -c "from densepure_core.data import load_digits_split; print(len(load_digits_split('test')))"
"""

from .digits import DIGITS_IMAGE_SIZE, DIGITS_NUM_CLASSES, DigitsSplit, load_digits_split

__all__ = ["DIGITS_IMAGE_SIZE", "DIGITS_NUM_CLASSES", "DigitsSplit", "load_digits_split"]
