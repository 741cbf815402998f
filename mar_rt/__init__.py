"""mar-rt: deployment toolkit for CT metal artifact reduction (DuDoCROP).

Layers (imports point down, checked by ``lint-imports``; contracts in pyproject.toml):
``cli`` > ``node`` | ``batch`` > ``train`` > ``runtime`` > ``export`` > ``models`` > ``kernels``
> ``ct``; ``errors`` is a leaf every layer uses. See DESIGN.md §2.
"""

__version__ = "0.1.0"
