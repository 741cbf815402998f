"""DuDoCLIP: a frozen open_clip ViT steered by a trainable controller (DESIGN.md §7.1).

The structure follows DA-CLIP (Luo et al. 2024, ``Algolzw/daclip-uir``,
``da-clip/src/open_clip/daclip_model.py``); the code here is our own.

Notation (name in code → DESIGN §7.1):

    clip            the open_clip ``CLIP`` model (image tower ``clip.visual`` + text tower), frozen
    visual_control  the controller: a deep copy of the whole image tower (patch embedding,
                    blocks, final LayerNorm and projection), trainable
    zero_modules[i] zero-initialised ``Linear(width, width)`` after controller block i
    h_i             zero_modules[i](controller block i output), i = 0..L−1, shape (B, N, width)
    L               number of transformer blocks in the image tower
    content_emb     frozen tower's pooled, projected output under control, (B, D)
    artifact_emb    controller's own pooled, projected output, (B, D)
    D               ``DuDoCLIPConfig.embed_dim`` (the U-Net's context_dim is set from it)
    logit_scale     learnable log of the inverse InfoNCE temperature (shared by both losses)

Control order (the same as DA-CLIP, so that its released weights mean the same here): the
frozen tower's block i output gets h_{L−1−i} added to its residual stream, i.e. the controller's
deepest hint enters the frozen tower's first block.  The controller's own stream does not see
its hints.  With the zero init every h_i is 0, so at initialisation content_emb equals the plain
``clip.encode_image`` and, because the controller is an exact copy, artifact_emb equals it too.

Preprocessing (``DuDoCLIPConfig.preprocess``):

    "tensor" (default)  (B, 1, H, W) in [0, 1] → bilinear resize to the tower size
                        (``F.interpolate``, ``align_corners=False``, ``antialias=False``) →
                        repeat to 3 channels → CLIP mean/std.  No PIL round trip, so the ONNX
                        graph holds it all.
    "daclip"            DA-CLIP's own transform, for checkpoints trained with it (the
                        reference's ``clip_transform``): ⌊255·x⌋ as uint8 → PIL bicubic resize
                        of the shorter side to S → centre crop S×S → /255 → CLIP mean/std.  The
                        PIL part (:func:`daclip_pixels`) runs on the host before the network;
                        the network graph then sees S×S pixels, whose tensor resize is the
                        identity.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mar_rt.errors import BadInputError

__all__ = [
    "CLIP_MEAN",
    "CLIP_STD",
    "ONNX_INPUT_NAMES",
    "ONNX_OUTPUT_NAMES",
    "DuDoCLIPConfig",
    "DuDoCLIP",
    "info_nce",
    "clip_loss",
    "resize_to_tower",
    "daclip_pixels",
    "PREPROCESS_MODES",
]

log = logging.getLogger(__name__)

# open_clip.constants.OPENAI_DATASET_MEAN / _STD (the CLIP normalisation, RGB)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

PREPROCESS_MODES = ("tensor", "daclip")

ONNX_INPUT_NAMES = ("image",)
ONNX_OUTPUT_NAMES = ("content_emb", "artifact_emb")

_MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clamps exp(logit_scale) at 100
# open_clip vision options this module can mirror block by block (anything else is refused)
_UNSUPPORTED_VISION = {
    "timm_model_name": None,
    "attentional_pool": False,
    "output_tokens": False,
    "patch_dropout": 0.0,
}
# keys of OpenAI-format state dicts that are metadata, not weights
_OPENAI_META_KEYS = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class DuDoCLIPConfig:
    """open_clip model config (plain dicts, as in open_clip's ``model_configs/*.json``).

    embed_dim:   D, the joint embedding size; the U-Net's ``context_dim`` is set from it.
    image_size:  side of the square tower input in pixels (also ``vision_cfg["image_size"]``).
    vision_cfg:  open_clip ``CLIPVisionCfg`` fields (ViT only).
    text_cfg:    open_clip ``CLIPTextCfg`` fields.
    quick_gelu:  True for OpenAI-trained weights; False for LAION weights and DA-CLIP.
    preprocess:  "tensor" (bilinear tensor resize, the default and the structure of bundles
                 written before the option) or "daclip" (DA-CLIP's PIL bicubic resize and
                 centre crop, on the host; see the module docstring).
    """

    embed_dim: int
    image_size: int
    vision_cfg: dict[str, Any] = field(default_factory=dict)
    text_cfg: dict[str, Any] = field(default_factory=dict)
    quick_gelu: bool = False
    preprocess: str = "tensor"

    def __post_init__(self) -> None:
        vision = copy.deepcopy(dict(self.vision_cfg))
        text = copy.deepcopy(dict(self.text_cfg))
        if vision.setdefault("image_size", self.image_size) != self.image_size:
            raise ValueError(
                f"DuDoCLIPConfig: image_size={self.image_size} but "
                f"vision_cfg['image_size']={vision['image_size']}"
            )
        object.__setattr__(self, "vision_cfg", vision)
        object.__setattr__(self, "text_cfg", text)
        if not (isinstance(self.embed_dim, int) and self.embed_dim > 0):
            raise ValueError(
                f"DuDoCLIPConfig: embed_dim must be a positive int, got {self.embed_dim!r}"
            )
        if isinstance(vision.get("layers", 12), (list, tuple)):
            raise ValueError(
                "DuDoCLIPConfig: vision_cfg['layers'] is a ResNet spec; a ViT is needed"
            )
        for key, allowed in _UNSUPPORTED_VISION.items():
            if vision.get(key, allowed) != allowed:
                raise ValueError(
                    f"DuDoCLIPConfig: vision_cfg[{key!r}]={vision[key]!r} is not supported "
                    f"(only {allowed!r})"
                )
        if vision.get("pool_type", "tok") not in ("tok", "avg"):
            raise ValueError(f"DuDoCLIPConfig: vision_cfg['pool_type']={vision['pool_type']!r}")
        if self.preprocess not in PREPROCESS_MODES:
            raise ValueError(
                f"DuDoCLIPConfig: preprocess must be one of {PREPROCESS_MODES}, "
                f"got {self.preprocess!r}"
            )
        patch = vision.get("patch_size", 16)
        if self.image_size % patch:
            raise ValueError(
                f"DuDoCLIPConfig: image_size {self.image_size} is not a multiple of patch {patch}"
            )

    def __hash__(self) -> int:
        return hash(json.dumps(self.to_dict(), sort_keys=True))

    @property
    def width(self) -> int:
        """Width of the image tower's residual stream (the controller Linear size)."""
        return int(self.vision_cfg.get("width", 768))

    @property
    def layers(self) -> int:
        """L, the number of image-tower blocks (= number of controller hints)."""
        return int(self.vision_cfg.get("layers", 12))

    @property
    def context_length(self) -> int:
        """Token count of the text tower's input."""
        return int(self.text_cfg.get("context_length", 77))

    @classmethod
    def tiny(cls) -> DuDoCLIPConfig:
        """CPU-trainable: ViT 112² / patch 16 (7×7 tokens), width 192, 6 blocks; text 128×4; D 256.

        The text width is kept small because the frozen 49408-token embedding table
        dominates the parameter count (49408 × width).
        """
        return cls(
            embed_dim=256,
            image_size=112,
            vision_cfg={"layers": 6, "width": 192, "head_width": 64, "patch_size": 16},
            text_cfg={
                "context_length": 77,
                "vocab_size": 49408,
                "width": 128,
                "heads": 2,
                "layers": 4,
            },
        )

    @classmethod
    def paper(cls) -> DuDoCLIPConfig:
        """ViT-B/32 as open_clip's ``model_configs/ViT-B-32.json`` (DA-CLIP's backbone)."""
        return cls(
            embed_dim=512,
            image_size=224,
            vision_cfg={"layers": 12, "width": 768, "patch_size": 32},
            text_cfg={
                "context_length": 77,
                "vocab_size": 49408,
                "width": 512,
                "heads": 8,
                "layers": 12,
            },
        )

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> DuDoCLIPConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"DuDoCLIPConfig.from_dict: unknown keys {sorted(unknown)}")
        return cls(**copy.deepcopy(dict(d)))


def _embed_tokens(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Patch embedding + class token + positions + ln_pre of a ViT: (B,3,S,S) → (B,N,W)."""
    x = tower.conv1(x)
    x = x.flatten(2).transpose(1, 2)
    cls_tok = tower.class_embedding.to(x.dtype).view(1, 1, -1).expand(x.shape[0], -1, -1)
    x = torch.cat([cls_tok, x], dim=1) + tower.positional_embedding.to(x.dtype)
    return tower.ln_pre(x)


def _pool_project(tower: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """ln_post + pooling + projection of an open_clip ViT: (B,N,W) → (B,D)."""
    if tower.final_ln_after_pool:
        pooled = tower.ln_post(x[:, 0] if tower.pool_type == "tok" else x[:, 1:].mean(dim=1))
    else:
        x = tower.ln_post(x)
        pooled = x[:, 0] if tower.pool_type == "tok" else x[:, 1:].mean(dim=1)
    return pooled @ tower.proj if tower.proj is not None else pooled


def _run_block(block: nn.Module, x: torch.Tensor, batch_first: bool) -> torch.Tensor:
    """One residual attention block on a batch-first (B, N, W) stream."""
    if batch_first:
        return block(x)
    return block(x.transpose(0, 1)).transpose(0, 1)


def resize_to_tower(image01: torch.Tensor, size: int) -> torch.Tensor:
    """DuDoCLIP's resize: (B, C, H, W) → (B, C, size, size), bilinear, half-pixel centres, no
    antialiasing (identity when H = W = size)."""
    return F.interpolate(
        image01, size=(size, size), mode="bilinear", align_corners=False, antialias=False
    )


def _center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
    """(left, top, right, bottom) of torchvision's ``CenterCrop(size)`` (offsets rounded)."""
    left = int(round((width - size) / 2.0))
    top = int(round((height - size) / 2.0))
    return left, top, left + size, top + size


def daclip_pixels(image01: torch.Tensor, size: int) -> torch.Tensor:
    """DA-CLIP's host preprocessing (``clip_transform`` of its test code) of grey images.

    (B, 1, H, W) in [0, 1] → (B, 1, S, S) float32 on the input's device, values k/255:

    1. ⌊255·x⌋ as uint8 (the reference's ``astype(np.uint8)``; x is clipped to [0, 1] first);
    2. PIL bicubic resize of the shorter side to S, the longer to ⌊S·long/short⌋
       (torchvision ``Resize(S, BICUBIC)`` on a PIL image; PIL antialiases when shrinking and
       rounds to uint8);
    3. centre crop S×S (torchvision ``CenterCrop``) and /255 (``ToTensor``).

    A grey image repeated to RGB resizes channel by channel, so one channel is computed.
    Runs on the CPU with PIL: it cannot be traced into an ONNX graph.
    """
    import numpy as np
    from PIL import Image

    if image01.ndim != 4 or image01.shape[1] != 1:
        raise BadInputError(
            f"daclip_pixels: image must be (B, 1, H, W), got {tuple(image01.shape)}"
        )
    h, w = int(image01.shape[-2]), int(image01.shape[-1])
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if w <= h else (new_long, size)
    box = _center_crop_box(new_w, new_h, size)
    grey = image01.detach().to("cpu", torch.float64).clamp(0.0, 1.0)[:, 0].numpy()
    out = []
    for img in grey:
        pil = Image.fromarray((img * 255.0).astype(np.uint8))
        if (new_w, new_h) != (w, h):
            pil = pil.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)
        out.append(np.asarray(pil.crop(box), dtype=np.float32) / 255.0)
    return torch.from_numpy(np.stack(out)[:, None]).to(image01.device)


def _is_exporting() -> bool:
    return bool(
        torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    )


class DuDoCLIP(nn.Module):
    """Frozen open_clip model + trainable controller; ``forward(image01) → (content, artifact)``.

    Parameters: ``clip.*`` (frozen), ``visual_control.*`` and ``zero_modules.*`` (the
    controller, trainable) and ``logit_scale`` (trainable).  ``seed`` fixes the random
    initialisation without touching the global RNG.
    """

    def __init__(self, cfg: DuDoCLIPConfig, *, seed: int = 0) -> None:
        super().__init__()
        from open_clip.model import CLIP  # heavy: kept out of module import

        self.cfg = cfg
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.clip = CLIP(cfg.embed_dim, cfg.vision_cfg, cfg.text_cfg, quick_gelu=cfg.quick_gelu)
        self.clip.requires_grad_(False)
        self.visual_control = copy.deepcopy(self.clip.visual)
        self.zero_modules = nn.ModuleList(
            nn.Linear(cfg.width, cfg.width) for _ in range(cfg.layers)
        )
        self.logit_scale = nn.Parameter(self.clip.logit_scale.detach().clone())
        self.register_buffer(
            "pixel_mean", torch.tensor(CLIP_MEAN).view(1, 3, 1, 1), persistent=False
        )
        self.register_buffer("pixel_std", torch.tensor(CLIP_STD).view(1, 3, 1, 1), persistent=False)
        self.reset_controller()

    # ---- parameters -------------------------------------------------------------------------

    @torch.no_grad()
    def reset_controller(self) -> None:
        """Controller ← copy of the image tower, hints ← 0, logit_scale ← the tower's (DA-CLIP)."""
        self.visual_control.load_state_dict(self.clip.visual.state_dict())
        for z in self.zero_modules:
            z.weight.zero_()
            z.bias.zero_()
        self.logit_scale.copy_(self.clip.logit_scale)
        self.visual_control.requires_grad_(True)
        self.zero_modules.requires_grad_(True)
        self.logit_scale.requires_grad_(True)

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Controller (copied tower + zero Linears) and ``logit_scale``; the rest is frozen."""
        return [
            *self.visual_control.parameters(),
            *self.zero_modules.parameters(),
            self.logit_scale,
        ]

    # ---- image path -------------------------------------------------------------------------

    def host_preprocess(self, image01: torch.Tensor) -> torch.Tensor:
        """The host part of the preprocessing: ``daclip_pixels`` (→ (B, 1, S, S)) with
        ``preprocess="daclip"``, else the input itself."""
        if self.cfg.preprocess == "daclip":
            return daclip_pixels(image01, self.cfg.image_size)
        return image01

    def preprocess(self, image01: torch.Tensor) -> torch.Tensor:
        """(B, 1, H, W) in [0, 1] → (B, 3, S, S) CLIP-normalised, S = ``cfg.image_size``.

        With ``preprocess="daclip"`` an input that is not S×S gets the host step
        (:meth:`host_preprocess`) first; an S×S input is taken as its output.  Tracing a
        "daclip" network with an input other than S×S is refused (the PIL step cannot be in
        a graph: feed host-processed S×S pixels).
        """
        s = self.cfg.image_size
        if self.cfg.preprocess == "daclip" and tuple(image01.shape[-2:]) != (s, s):
            if _is_exporting():
                raise BadInputError(
                    f"DuDoCLIP preprocess='daclip': the graph input must be the host-processed "
                    f"{s}×{s} pixels (daclip_pixels), got {tuple(image01.shape)}"
                )
            image01 = self.host_preprocess(image01)
        x = resize_to_tower(image01, s)
        return (x.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std

    def controller(self, pixels: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Controller on preprocessed pixels → (artifact_emb (B, D), hints h_0..h_{L−1})."""
        tower = self.visual_control
        batch_first = tower.transformer.batch_first
        x = _embed_tokens(tower, pixels)
        hints = []
        for block, zero in zip(tower.transformer.resblocks, self.zero_modules, strict=True):
            x = _run_block(block, x, batch_first)
            hints.append(zero(x))
        return _pool_project(tower, x), hints

    def controlled_tower(self, pixels: torch.Tensor, hints: Sequence[torch.Tensor]) -> torch.Tensor:
        """Frozen image tower with block i's output += h_{L−1−i} → content_emb (B, D)."""
        tower = self.clip.visual
        batch_first = tower.transformer.batch_first
        x = _embed_tokens(tower, pixels)
        blocks = tower.transformer.resblocks
        for i, block in enumerate(blocks):
            x = _run_block(block, x, batch_first) + hints[len(blocks) - 1 - i]
        return _pool_project(tower, x)

    def forward(self, image01: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 1, H, W) in [0, 1] → (content_emb (B, D), artifact_emb (B, D)), unnormalised."""
        pixels = self.preprocess(image01)
        artifact, hints = self.controller(pixels)
        return self.controlled_tower(pixels, hints), artifact

    def encode_image_plain(self, image01: torch.Tensor) -> torch.Tensor:
        """open_clip's own ``encode_image`` of the same preprocessed input, no control: (B, D)."""
        return self.clip.encode_image(self.preprocess(image01))

    # ---- text path --------------------------------------------------------------------------

    def tokenize(self, texts: str | Sequence[str]) -> torch.Tensor:
        """open_clip's BPE tokenizer (vocabulary ships in the package) → (B, context) int64."""
        from open_clip.tokenizer import tokenize

        return tokenize(list([texts] if isinstance(texts, str) else texts), self.cfg.context_length)

    def encode_text(self, tokens: torch.Tensor) -> torch.Tensor:
        """Frozen text tower: (B, context_length) int64 → (B, D), unnormalised."""
        return self.clip.encode_text(tokens)

    # ---- foreign checkpoints ----------------------------------------------------------------

    def load_open_clip_checkpoint(self, path: str | Path, *, reset_controller: bool = True) -> None:
        """Load an open_clip (or OpenAI-format) state dict for this config into ``clip``.

        ``path``: ``*.safetensors`` or a torch file read with ``weights_only=True``, either
        the bare state dict or ``{"state_dict": ...}`` with an optional ``module.`` prefix.
        With ``reset_controller`` the controller is re-copied from the loaded tower.
        """
        state = _read_state_dict(path)
        for key in _OPENAI_META_KEYS:
            state.pop(key, None)
        _load_exact(self.clip, state, path, "open_clip")
        if reset_controller:
            self.reset_controller()
        log.info("loaded open_clip weights from %s", path)

    def load_daclip_checkpoint(self, path: str | Path) -> None:
        """Load DA-CLIP's released layout (``clip.*``, ``visual.*``, ``visual_control.*``,
        ``logit_scale``) into this module, as initialisation.

        Key mapping (DA-CLIP → here): ``clip.X`` → ``clip.X``; ``visual.X`` is an alias of
        ``clip.visual.X`` and must agree with it; ``visual_control.transformer.transformer.X`` →
        ``visual_control.transformer.X``; ``visual_control.transformer.zero_modules.X`` →
        ``zero_modules.X``; other ``visual_control.X`` → ``visual_control.X``;
        ``logit_scale`` → ``logit_scale``.  DA-CLIP adds hints in the same (reverse) order.
        """
        state = _read_state_dict(path)
        mapped = {}
        aliases = {}
        for key, value in state.items():
            if key.startswith("visual."):
                aliases["clip." + key] = value
            elif key.startswith("visual_control.transformer.transformer."):
                mapped[
                    "visual_control.transformer."
                    + key.removeprefix("visual_control.transformer.transformer.")
                ] = value
            elif key.startswith("visual_control.transformer.zero_modules."):
                mapped[
                    "zero_modules." + key.removeprefix("visual_control.transformer.zero_modules.")
                ] = value
            else:
                mapped[key] = value
        for key, value in aliases.items():
            if key not in mapped:
                mapped[key] = value
            elif not torch.equal(mapped[key], value):
                raise BadInputError(f"{path}: DA-CLIP alias {key[5:]} differs from {key}")
        _load_exact(self, mapped, path, "DA-CLIP")
        self.clip.requires_grad_(False)
        log.info("loaded DA-CLIP weights from %s", path)


def _read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A flat ``{name: tensor}`` from safetensors or a ``weights_only`` torch file."""
    path = Path(path)
    if not path.is_file():
        raise BadInputError(f"{path}: checkpoint file not found")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            obj: Any = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unreadable, pickled code, truncated ...
        raise BadInputError(f"{path}: cannot read checkpoint safely ({exc})") from exc
    if isinstance(obj, Mapping) and "state_dict" in obj:
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise BadInputError(f"{path}: not a state dict of tensors")
    state = dict(obj)
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return state


def _load_exact(module: nn.Module, state: Mapping[str, torch.Tensor], path: Any, kind: str) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; names the mismatch."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if own[k].shape != state[k].shape)
    if missing or unexpected or wrong:
        parts = []
        for label, keys in (
            ("missing", missing),
            ("unexpected", unexpected),
            ("wrong shape", wrong),
        ):
            if keys:
                parts.append(f"{len(keys)} {label} (e.g. {', '.join(keys[:3])})")
        raise BadInputError(f"{path}: not a {kind} checkpoint for this config: {'; '.join(parts)}")
    module.load_state_dict(dict(state), strict=True)


def info_nce(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric InfoNCE of matched pairs (row i ↔ row i), on L2-normalised features.

    image_emb, text_emb: (B, D); logit_scale: log of the inverse temperature (scalar),
    clamped so that exp(logit_scale) ≤ 100 as in CLIP.  Returns the mean of the image→text
    and text→image cross-entropies (a scalar); uniform logits give log B.
    """
    scale = logit_scale.clamp(max=_MAX_LOGIT_SCALE).exp()
    logits = scale * F.normalize(image_emb, dim=-1) @ F.normalize(text_emb, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


def clip_loss(
    content_emb: torch.Tensor,
    artifact_emb: torch.Tensor,
    content_text_emb: torch.Tensor,
    artifact_text_emb: torch.Tensor,
    logit_scale: torch.Tensor,
) -> torch.Tensor:
    """DuDoCLIP training loss: mean of the content and the artifact symmetric InfoNCE terms.

    DA-CLIP sums the two terms; the mean only rescales the step size and keeps the
    closed form simple (identical features → log B).
    """
    return 0.5 * (
        info_nce(content_emb, content_text_emb, logit_scale)
        + info_nce(artifact_emb, artifact_text_emb, logit_scale)
    )
