"""Training: clean-slice sources, procedural phantoms, simulated pairs, DuDoCLIP and IR-SDE
trainers, and the recipe that trains a whole bundle (DESIGN.md §5, §7–§9).

Modules (import them directly; nothing heavy is imported here):

    sources       clean CT slices from SynDeepLesion gt.h5, DeepLesion PNG, .npy, DICOM, NIfTI
    phantoms      seeded ellipse body phantoms (soft tissue, organs, lung, bone)
    split         which slices train and which validate (by slice, never by pair)
    pair_meta     a pair's seed and metadata (prompt facts)
    implants      a pair's implant: size bin, shape kind, material
    pairs         seeded pair simulation and its SynDeepLesion-layout cache (PairSet)
    data_config   how many pairs of which slices the data stage draws
    validation_set  the validation set (one titanium mask per published size)
    clip_set      DuDoCLIP's pairs at tower size
    domains       image / sinogram / residual training arrays (DomainData)
    augment       augmentation and random patch batches
    clip_trainer  DuDoCLIP controller fine-tuning (multi-positive symmetric InfoNCE), PI_s
    sde_trainer   IR-SDE U-Net training (ML loss, AdamW + cosine, EMA, resume)
    presets       the named recipes (tiny-gpu, tiny-cpu, smoke, paper) as data
    recipe        all stages in order with time budgets → bundle + train_report.json

``train`` uses ``ct``, ``models`` and ``runtime`` (validation runs the real DuDoCROP
pipeline); only ``cli``, ``node`` and ``batch`` sit above it.
"""
