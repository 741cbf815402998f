"""One simulated pair's identity: its seed and :class:`PairMeta` (where it lives, how it was
drawn, its prompt facts, DESIGN.md §5).

Seeds: pair k of slice s uses ``pair_seed(seed, s, k)`` (sha256 of the three) for its mask
size, kind, material and noise, so a pair is the same whatever else is generated with it.
A pair's case is ``<slice_id>/<k>``: its place in the SynDeepLesion layout
(``<root>/<slice_id>/gt.h5`` + ``<root>/<slice_id>/<k>.h5``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from mar_rt.ct.masks import body_outline
from mar_rt.models import prompts


def pair_seed(seed: int, slice_id: str, k: int) -> int:
    """A 63-bit seed from (seed, slice_id, k), stable across machines and Python versions."""
    digest = hashlib.sha256(f"{int(seed)}|{slice_id}|{int(k)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@dataclass(frozen=True)
class PairMeta:
    """What is known about one pair: where it lives, how it was drawn and its prompt facts."""

    slice_id: str
    k: int
    seed: int
    material: str
    metal_px: int
    kind: str
    severity: str
    anatomy: str
    metal: dict[str, Any] = field(default_factory=dict)

    @property
    def case(self) -> str:
        return f"{self.slice_id}/{self.k}"

    def facts(self) -> prompts.PromptFacts:
        m = dict(self.metal)
        m["component_px"] = tuple(m.get("component_px", ()))
        return prompts.PromptFacts(prompts.MetalFacts(**m), self.severity, self.anatomy)

    def content_texts(self) -> list[str]:
        """Every phrasing of the content text (template seeds 0..n−1)."""
        f = self.facts()
        return sorted({prompts.content_text(f, seed=s) for s in range(3)})

    def artifact_texts(self) -> list[str]:
        """Every phrasing of the artifact text (template × severity wording)."""
        f = self.facts()
        return sorted({prompts.artifact_text(f, seed=s) for s in range(6)})

    def zero_shot_target(self) -> int:
        return prompts.zero_shot_target(self.facts())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PairMeta:
        return cls(**d)


def describe_pair(
    slice_id: str, k: int, seed: int, material: str, kind: str,
    image: np.ndarray, ma_ct: np.ndarray, mask: np.ndarray,
) -> PairMeta:  # fmt: skip
    """Prompt facts of a simulated pair (``mar_rt.models.prompts``): metal facts from the mask,
    severity from ``ma_CT`` against ``image``, anatomy from the clean image."""
    body = body_outline(image)
    metal = prompts.describe_metal(mask, material=material, body_mask=body if body.any() else None)
    severity = prompts.severity_from_error(ma_ct, image, mask)
    anatomy = prompts.anatomy_from_image(image, metal_mask=mask)
    return PairMeta(
        slice_id=slice_id, k=int(k), seed=int(seed), material=material,
        metal_px=int(mask.sum()), kind=kind, severity=severity, anatomy=anatomy,
        metal=json.loads(json.dumps(metal.to_dict())),  # the form pairs.json gives back
    )  # fmt: skip
