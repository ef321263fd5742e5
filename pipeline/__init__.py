"""xmodal: transfer RGB vision foundation models to non-RGB modalities.

Importing the package has no side effects; subpackages: `data`, `models` (and, as the
project grows, `methods`, `training`, `metrics`).
"""

__version__ = "0.1.0"
