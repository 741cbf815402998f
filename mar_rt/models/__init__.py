"""PyTorch networks and their numerics: IR-SDE schedule and sampler (``sde``), conditional
U-Net (``unet``), DuDoCLIP (``dudoclip``), prompt templates (``prompts``) and model bundles
(``bundle``).  Imports nothing else of ours except ``mar_rt.errors``.

``dudoclip`` and ``prompts`` (open_clip) are imported only when one of their names is used.
"""

from __future__ import annotations

import importlib
from typing import Any

from mar_rt.models.bundle import (
    BUNDLE_FORMAT_VERSION,
    Bundle,
    load_bundle,
    save_bundle,
    update_bundle,
)
from mar_rt.models.sde import (
    Schedule,
    SDEConfig,
    StepCoefficients,
    euler_maruyama_coefficients,
    forward_marginal,
    make_schedule,
    ml_loss,
    posterior_coefficients,
    posterior_loss,
    sample_posterior,
    start_state,
    true_noise,
)
from mar_rt.models.unet import ConditionalUNet, UNetConditioner, UNetConfig, UNetPredictor

_LAZY = {
    "DuDoCLIP": "mar_rt.models.dudoclip",
    "DuDoCLIPConfig": "mar_rt.models.dudoclip",
    "PROMPT_VERSION": "mar_rt.models.prompts",
}

__all__ = [
    "BUNDLE_FORMAT_VERSION",
    "Bundle",
    "ConditionalUNet",
    "SDEConfig",
    "Schedule",
    "StepCoefficients",
    "UNetConditioner",
    "UNetConfig",
    "UNetPredictor",
    "euler_maruyama_coefficients",
    "forward_marginal",
    "load_bundle",
    "make_schedule",
    "ml_loss",
    "posterior_loss",
    "posterior_coefficients",
    "sample_posterior",
    "save_bundle",
    "start_state",
    "true_noise",
    "update_bundle",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'mar_rt.models' has no attribute {name!r}")
