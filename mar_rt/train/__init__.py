"""Training: clean-slice sources, procedural phantoms, simulated pairs, DuDoCLIP and IR-SDE
trainers, and the recipe that trains a whole bundle (DESIGN.md §5, §7–§9).

Modules (import them directly; nothing heavy is imported here):

    sources       clean CT slices from SynDeepLesion gt.h5, DeepLesion PNG, .npy, DICOM, NIfTI
    phantoms      seeded ellipse body phantoms (soft tissue, organs, lung, bone)
    data          split by slice, seeded pair simulation and cache, validation set, batches
    clip_trainer  DuDoCLIP controller fine-tuning (multi-positive symmetric InfoNCE), PI_s
    sde_trainer   IR-SDE U-Net training (ML loss, AdamW + cosine, EMA, resume)
    recipe        all stages in order with time budgets → bundle + train_report.json

``train`` uses ``ct`` and ``models``; it imports ``runtime`` only to validate through the real
DuDoCROP pipeline (``recipe``), the one exception to the dependency order of DESIGN §2.
"""
