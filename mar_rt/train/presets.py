"""The named training recipes (``mar-rt train --config``), as data: one :class:`RecipeConfig`
per preset in ``PRESETS``; :func:`recipe_config` hands out a copy with the run's seeds.

    tiny-gpu, tiny-cpu   the demo bundle, batch sizes and counts scaled for a CUDA GPU or a
                         CPU (``tiny`` picks one by device)
    clinical-cpu         tiny-cpu's networks fine-tuned on real series with random simulator
                         settings and both routes' inputs (``--init-from`` a tiny bundle)
    clinical-cpu-s4      clinical-cpu with a T = 4 SDE, sampled in four steps
    smoke                a minutes-free end-to-end check: one pair, a few steps, toy networks
    paper                ViT-B/32 + nf 64, for real hardware

Seeds: a preset is stored at seed 0; :func:`with_seed` sets the data, both DuDoCLIP stages
and the image U-Net to ``seed``, the sinogram U-Net to ``seed + 1`` and the residual U-Net
to ``seed + 2``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from typing import Any

import torch

from mar_rt.models.dudoclip import DuDoCLIPConfig
from mar_rt.models.sde import SDEConfig
from mar_rt.models.unet import UNetConfig
from mar_rt.runtime.config import PipelineConfig
from mar_rt.train.clip_trainer import ClipTrainConfig
from mar_rt.train.data_config import DataConfig
from mar_rt.train.sde_trainer import SDETrainConfig


@dataclass(frozen=True, kw_only=True)
class RecipeConfig:
    """Everything one bundle's training run needs (saved in ``train_report.json``).

    ``budget``: relative share of the total time per stage (``recipe.STAGES``);
    ``residual_pairs``: training pairs run through the pipeline for the residual net;
    ``residual_loop_steps``: the DAPG sampling steps used for them; ``val_cases``: validation
    cases used while training; ``tune_steps``: sampling-step candidates of stage 9
    (``tune_cases`` cases each; 0 = all); ``cache_pairs``: write training pairs, and their
    NMAR fields (``domains.with_nmar``), to ``<work>/cache`` (off on GPUs, where simulating is
    cheaper than compressing);
    ``identity_init``: U-Nets start at ε̂ = (x_t − μ)/λ (``sde_trainer.identity_init``).
    """

    name: str
    clip: Any
    unet: UNetConfig
    sde: SDEConfig
    data: DataConfig
    clip_image: ClipTrainConfig
    clip_sinogram: ClipTrainConfig
    image: SDETrainConfig
    sinogram: SDETrainConfig
    residual: SDETrainConfig
    pipeline: Any  # mar_rt.runtime.config.PipelineConfig
    budget: tuple[tuple[str, float], ...]
    residual_pairs: int = 32
    residual_loop_steps: int = 10
    val_cases: int = 4
    tune_steps: tuple[int, ...] = (10,)
    tune_cases: int = 0
    store_fp16: bool = True
    cache_pairs: bool = True
    identity_init: bool = True

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            out[f.name] = v.to_dict() if hasattr(v, "to_dict") else (
                dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v
            )  # fmt: skip
        return json.loads(json.dumps(out, default=str))


def with_seed(recipe: RecipeConfig, seed: int) -> RecipeConfig:
    """``recipe`` with every stage seeded from ``seed`` (see the module docstring)."""
    r = dataclasses.replace
    return r(
        recipe,
        data=r(recipe.data, seed=seed),
        clip_image=r(recipe.clip_image, seed=seed),
        clip_sinogram=r(recipe.clip_sinogram, seed=seed),
        image=r(recipe.image, seed=seed),
        sinogram=r(recipe.sinogram, seed=seed + 1),
        residual=r(recipe.residual, seed=seed + 2),
    )


def demo_clip_config() -> DuDoCLIPConfig:
    """The demo bundle's DuDoCLIP: ViT 112² / patch 16, width 128, 4 blocks; text width 32,
    2 blocks; D = 128 (3.4 M parameters, 6.8 MB in fp16).

    Smaller than ``DuDoCLIPConfig.tiny()`` (13 M parameters, 26 MB in fp16 each, mostly the
    frozen 49408 × 128 token table), which would not fit two DuDoCLIPs in the ≤ 25 MB demo bundle.
    """
    return DuDoCLIPConfig(
        embed_dim=128,
        image_size=112,
        vision_cfg={"layers": 4, "width": 128, "head_width": 32, "patch_size": 16},
        text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
    )


BUDGET = (
    ("data", 0.18), ("clip_image", 0.06), ("clip_sinogram", 0.06), ("unet_image", 0.30),
    ("unet_sinogram", 0.16), ("residual_data", 0.05), ("unet_residual", 0.12), ("tune", 0.07),
)  # fmt: skip
"""Every preset's share of the run time per stage."""

# --- tiny ----------------------------------------------------------------------------------------
# The tiny preset (DESIGN §9 calibration: CPU minutes, a handful of slices). Measured on the 20
# validation cases after 10–14 min of one CPU thread (model card): with T = 100 (cosine or
# constant θ, Euler-form ml_loss) or T = 4 the sampled X_p lost 0.3–25 dB to its μ; with
# T = S = 1, the posterior loss, λ = 2/255 and μ = the NMAR pair it gained on every case. One
# step makes the reverse SDE a single x̂₀ prediction from x_T = μ + λz.
_TINY_SDE = SDEConfig(T=1, max_sigma=2.0, schedule="constant")
_TINY_CLIP = demo_clip_config()
_TINY_UNET = dataclasses.replace(
    UNetConfig.tiny(context_dim=_TINY_CLIP.embed_dim), noise_skip=1.0 / _TINY_SDE.lam
)
_TINY_SDE_TRAIN = {"loss": "posterior", "eps_weight": 0.0, "warmup": 100}
# DuDoCLIP's own set (160 masks per training slice, 160 phantoms × 4, one metal-free scan per
# slice) and schedule: on one CPU thread (48 min per domain) these gave sinogram PI_s
# 0.35 / 0.41 on two 120-case held-out sets (majority 0.19 / 0.23); the image domain stayed
# below its majority rate (model card)
_TINY_CLIP_SET = {
    "clip_masks_per_slice": 160, "clip_phantoms": 160, "clip_phantom_masks": 4,
    "clip_val_masks": 60, "clip_clean": True,
}  # fmt: skip
_TINY_CLIP_OWN = ClipTrainConfig(steps=5000, batch=64, lr=5e-4, warmup=250, zero_shot_text_prob=0.5)
_TINY_GPU_UNET = SDETrainConfig(
    steps=20000, batch=32, patch=128, lr=3e-4, val_every=1500, ckpt_every=1000, **_TINY_SDE_TRAIN
)
_TINY_CPU_UNET = SDETrainConfig(
    steps=20000, batch=6, patch=96, lr=1e-4, val_every=0, ckpt_every=200, **_TINY_SDE_TRAIN
)

TINY_GPU = with_seed(
    RecipeConfig(
        name="tiny", clip=_TINY_CLIP, unet=_TINY_UNET, sde=_TINY_SDE,
        data=DataConfig(masks_per_slice=48, phantoms=48, phantom_masks=4, **_TINY_CLIP_SET),
        clip_image=_TINY_CLIP_OWN, clip_sinogram=_TINY_CLIP_OWN,
        image=_TINY_GPU_UNET, sinogram=_TINY_GPU_UNET, residual=_TINY_GPU_UNET,
        pipeline=PipelineConfig(steps=1, mu_source="nmar", alpha=0.5, batch_size=4),
        budget=BUDGET, residual_pairs=192, residual_loop_steps=1, val_cases=8, tune_steps=(1,),
        cache_pairs=False,
    ),
    0,
)  # fmt: skip
"""The demo bundle's recipe on a CUDA GPU."""

TINY_CPU = with_seed(
    RecipeConfig(
        name="tiny", clip=_TINY_CLIP, unet=_TINY_UNET, sde=_TINY_SDE,
        data=DataConfig(masks_per_slice=16, phantoms=8, phantom_masks=2, **_TINY_CLIP_SET),
        # the image controller trained on the U-Net pairs scored no worse on held-out PI_s
        # than on its own set (which tied severity to the 7 slices' anatomy)
        clip_image=ClipTrainConfig(steps=800, batch=16, lr=2e-4, own_set=False),
        clip_sinogram=_TINY_CLIP_OWN,
        # at 3e-4 the image loss climbed for the first 500 steps (0.06 → 0.12)
        image=_TINY_CPU_UNET, sinogram=dataclasses.replace(_TINY_CPU_UNET, lr=3e-4),
        residual=_TINY_CPU_UNET,
        pipeline=PipelineConfig(steps=1, mu_source="nmar", alpha=0.5, batch_size=2),
        budget=BUDGET, residual_pairs=16, residual_loop_steps=1, val_cases=2, tune_steps=(1,),
        tune_cases=0,
    ),
    0,
)  # fmt: skip
"""The demo bundle's recipe on a CPU."""

CLINICAL_CPU = with_seed(
    dataclasses.replace(
        TINY_CPU,
        name="clinical",
        # real series (``mar-rt train --data ../shared/data --data ../shared/data/ct-volumes``:
        # the train split of ``mar_rt.train.split``), each pair simulated with its own settings,
        # the image U-Net seeing both routes' μ; the DuDoCLIP networks come from ``--init-from``
        data=DataConfig(
            masks_per_slice=3, phantoms=4, phantom_masks=2, sim_ranges="training",
            image_inputs="both",
            # the two official SynDeepLesion cases: a domain check of the official simulator
            exclude_series=("deeplesion_000129", "deeplesion_000195"),
        ),
        # the switches round 4 chose on the tune split (benchmarks/tune_route.py); round 5
        # re-tuned them for its weights (Norm² on, α = 1, DuDoCLIP off: the shipped bundle.json).
        # A run writes these: tune its bundle again with benchmarks/tune_route.py
        pipeline=dataclasses.replace(
            TINY_CPU.pipeline, alpha=0.75, norm2=False, image_only={"alpha": 1.0}
        ),
    ),
    0,
)  # fmt: skip
"""The demo bundle's clinical fine-tune on a CPU: the tiny networks, real series, random
simulator settings, both routes (issue 21)."""

# four reverse steps (issue 21's multi-step check): the same λ and eps, so x_T is the T = 1
# start μ + λz, and ``--init-from`` a T = 1 bundle gives the starting weights
_S4 = 4
CLINICAL_CPU_S4 = with_seed(
    dataclasses.replace(
        CLINICAL_CPU,
        name="clinical-s4",
        sde=dataclasses.replace(_TINY_SDE, T=_S4),
        pipeline=dataclasses.replace(CLINICAL_CPU.pipeline, steps=_S4),
        residual_loop_steps=_S4,
        tune_steps=(1, _S4),
    ),
    0,
)  # fmt: skip
"""The clinical fine-tune with a T = 4 SDE sampled in S = 4 steps."""

# --- smoke ---------------------------------------------------------------------------------------
_SMOKE_CLIP_TRAIN = ClipTrainConfig(steps=3, batch=2, log_every=0)
_SMOKE_UNET_TRAIN = SDETrainConfig(steps=3, batch=2, patch=32, warmup=1, log_every=0, val_every=2)

SMOKE = with_seed(
    RecipeConfig(
        name="smoke",
        clip=DuDoCLIPConfig(
            embed_dim=16, image_size=32,
            vision_cfg={"layers": 1, "width": 32, "head_width": 16, "patch_size": 16},
            text_cfg={
                "context_length": 77, "vocab_size": 49408, "width": 16, "heads": 1, "layers": 1,
            },
        ),
        # four levels, so self-attention only runs at 1/8 resolution (6480 tokens on a sinogram)
        unet=UNetConfig(
            nf=4, ch_mult=(1, 1, 2, 2), num_res_blocks=1, context_dim=16, time_sin_dim=8,
            time_dim=16, prompt_len=8, attn_head_dim=8, linear_attn_heads=1,
            linear_attn_head_dim=8, transformer_levels=(3,), norm_groups=4,
        ),
        sde=SDEConfig(T=2, max_sigma=10.0, schedule="constant"),
        data=DataConfig(
            masks_per_slice=1, phantoms=0, phantom_masks=0, val_sizes=(451,),
            clip_masks_per_slice=2, clip_val_masks=1, clip_clean=True,
        ),
        clip_image=_SMOKE_CLIP_TRAIN, clip_sinogram=_SMOKE_CLIP_TRAIN,
        image=_SMOKE_UNET_TRAIN, sinogram=_SMOKE_UNET_TRAIN, residual=_SMOKE_UNET_TRAIN,
        pipeline=PipelineConfig(steps=2, mu_source="li", alpha=0.5, batch_size=1),
        budget=BUDGET, residual_pairs=1, residual_loop_steps=2, val_cases=1, tune_steps=(2,),
    ),
    0,
)  # fmt: skip
"""A minutes-free end-to-end check: one pair, a few steps, toy networks."""

# --- paper ---------------------------------------------------------------------------------------
_PAPER_CLIP = DuDoCLIPConfig.paper()
_PAPER_CLIP_TRAIN = ClipTrainConfig(steps=20000, batch=128, lr=3e-5)
_PAPER_UNET_TRAIN = SDETrainConfig(
    steps=200000, batch=16, patch=128, lr=1e-4, val_every=5000, ckpt_every=2000
)

PAPER = with_seed(
    RecipeConfig(
        name="paper", clip=_PAPER_CLIP, unet=UNetConfig.paper(context_dim=_PAPER_CLIP.embed_dim),
        sde=SDEConfig(T=100, max_sigma=10.0),
        data=DataConfig(masks_per_slice=90, phantoms=200, phantom_masks=10),
        clip_image=_PAPER_CLIP_TRAIN, clip_sinogram=_PAPER_CLIP_TRAIN,
        image=_PAPER_UNET_TRAIN, sinogram=_PAPER_UNET_TRAIN, residual=_PAPER_UNET_TRAIN,
        pipeline=PipelineConfig(steps=50, mu_source="li", alpha=0.5, batch_size=4),
        budget=BUDGET, residual_pairs=2000, val_cases=20, tune_steps=(20, 50, 100),
    ),
    0,
)  # fmt: skip
"""ViT-B/32 + nf 64, for real hardware."""

# round 6 of the demo bundle: the scanner's own metal-free image as the image U-Net's target
# (DataConfig.image_target; the clean target taught the network to correct the simulator's
# calibration and to sharpen its blur, and it over-sharpened calibrated, sharper data such as
# the official cases), and the switches tune_route.py chose for it on the tune split against
# that reference: on the measured route X_p shapes the trace (fidelity_prior "image") and the
# residual and sinogram loops, whose results that route no longer uses, are off; the image-only
# route keeps OSRO as round 5 with Norm² off. Round 7 trained the residual U-Net with it: on the
# image-only route (recipe.residual_routes), towards the pair's own scan; round 9 fine-tuned it
# on 320 pairs (round 7: 160), round 10 on all 425 training pairs (residual_pairs is capped at
# the training set), whose data (scanner targets, pipeline runs: 34 minutes on 2 CPU threads)
# residual_data's old 0.05 share would cut short: its share equals unet_residual's
_SCANNER_BUDGET = tuple(
    (stage, 0.12 if stage in ("residual_data", "unet_residual") else share)
    for stage, share in BUDGET
)
CLINICAL_CPU_SCANNER = with_seed(
    dataclasses.replace(
        CLINICAL_CPU,
        name="clinical-scanner",
        data=dataclasses.replace(CLINICAL_CPU.data, image_target="scanner"),
        residual_pairs=425,
        budget=_SCANNER_BUDGET,
        pipeline=dataclasses.replace(
            CLINICAL_CPU.pipeline, use_clip=False, fidelity_prior="image", run_sinogram_sde=False,
            osro_residual=False, norm2=False, alpha=1.0,
            image_only={
                "fidelity_prior": "sinogram", "run_sinogram_sde": True, "osro_residual": True,
                "norm2": False, "alpha": 1.0,
            },
        ),
    ),
    0,
)  # fmt: skip

PRESETS: dict[str, RecipeConfig] = {
    "tiny-gpu": TINY_GPU,
    "tiny-cpu": TINY_CPU,
    "clinical-cpu": CLINICAL_CPU,
    "clinical-cpu-s4": CLINICAL_CPU_S4,
    "clinical-cpu-scanner": CLINICAL_CPU_SCANNER,
    "smoke": SMOKE,
    "paper": PAPER,
}
"""Every named recipe; ``tiny`` is ``tiny-gpu`` on a CUDA device, else ``tiny-cpu``."""


def recipe_config(name: str = "tiny", *, device: str = "cpu", seed: int = 0) -> RecipeConfig:
    """A copy of preset ``name`` (``PRESETS``, or ``tiny``: sized for ``device``) seeded from
    ``seed``. ValueError for an unknown name."""
    gpu = torch.device(device).type == "cuda"
    if name == "tiny":
        name = "tiny-gpu" if gpu else "tiny-cpu"
    preset = PRESETS.get(name)
    if preset is None:
        raise ValueError(
            f"unknown recipe config {name!r}; choose tiny, tiny-gpu, tiny-cpu, clinical-cpu, "
            "clinical-cpu-s4, paper or smoke"
        )
    return with_seed(copy.deepcopy(preset), seed)
