"""mar-rt: deployment toolkit for CT metal artifact reduction (DuDoCROP).

Layers (imports point down): ``ct`` → ``kernels`` → ``models`` → ``train`` / ``export``
→ ``runtime`` → ``cli``. See DESIGN.md §2.
"""

__version__ = "0.1.0"
