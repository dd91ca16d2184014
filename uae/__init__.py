"""UAE toolkit: understanding (image -> caption) as the encoder, generation (caption -> image)
as the decoder, reconstruction similarity as benchmark and reward (arXiv 2509.09666).

Importing the package loads no model and touches no file; heavy modules are imported where used.
"""

__version__ = "0.1.0"

from uae.errors import UAEError  # noqa: F401  (light: no torch import)
