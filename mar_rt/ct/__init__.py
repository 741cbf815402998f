"""CT physics on torch tensors, the reference implementation (DESIGN.md §3–6).

Geometry as a value object, operators as functions; imports nothing else of mar-rt.
"""

from mar_rt.ct.fbp import fbp
from mar_rt.ct.geometry import FanBeamGeometry
from mar_rt.ct.mar import li_correct, li_inpaint, metal_trace, nmar_correct, segment_metal
from mar_rt.ct.masks import SIZE_GROUPS, body_outline, generate_metal_mask, size_group
from mar_rt.ct.metrics import psnr, ssim
from mar_rt.ct.projector import Projector, back_project, forward_project, get_projector
from mar_rt.ct.simulate import simulate_metal_artifact
from mar_rt.ct.units import MU_WATER, hu_to_mu, mu_to_hu

__all__ = [
    "MU_WATER",
    "SIZE_GROUPS",
    "FanBeamGeometry",
    "Projector",
    "back_project",
    "body_outline",
    "fbp",
    "forward_project",
    "generate_metal_mask",
    "get_projector",
    "hu_to_mu",
    "li_correct",
    "li_inpaint",
    "metal_trace",
    "mu_to_hu",
    "nmar_correct",
    "psnr",
    "segment_metal",
    "simulate_metal_artifact",
    "size_group",
    "ssim",
]
