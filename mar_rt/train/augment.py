"""Augmentation and random patch batches of one domain's training arrays.

Image and residual patches turn by k·90° and mirror; sinogram patches roll their views (a
rotation of the object) and mirror views and detector (the object mirrored, DESIGN §4
orientation). Every random choice comes from a CPU ``torch.Generator``.
"""

from __future__ import annotations

import torch

from mar_rt.train.domains import DomainData


def rot_flip(x: torch.Tensor, k: int, flip: bool) -> torch.Tensor:
    """Rotate the last two dims by k·90° (counter-clockwise), then mirror columns if ``flip``."""
    x = torch.rot90(x, k, dims=(-2, -1)) if k % 4 else x
    return torch.flip(x, dims=(-1,)) if flip else x


def sino_roll_mirror(y: torch.Tensor, shift: int, mirror: bool) -> torch.Tensor:
    """The sinogram of the object rotated by 2π·shift/V (views rolled) and then mirrored in x
    (view k → (V/2 − k) mod V with the detector reversed; DESIGN §4 orientation)."""
    n_views = y.shape[-2]
    y = torch.roll(y, shifts=int(shift), dims=-2) if shift % n_views else y
    if mirror:
        idx = (n_views // 2 - torch.arange(n_views, device=y.device)) % n_views
        y = torch.flip(y.index_select(-2, idx), dims=(-1,))
    return y


def _randint(hi: int, gen: torch.Generator) -> int:
    return int(torch.randint(hi, (1,), generator=gen).item())


def _uniform(gen: torch.Generator) -> float:
    return float(torch.rand((1,), generator=gen).item())


def crop_origin(
    shape: tuple[int, int], patch: int, points: torch.Tensor | None, p_focus: float,
    gen: torch.Generator, *, wrap_rows: bool = False,
) -> tuple[int, int]:  # fmt: skip
    """Top-left (row, col) of a ``patch``² crop: with probability ``p_focus`` centred on one of
    ``points`` (clamped inside), otherwise uniform. ``wrap_rows``: rows are periodic (views)."""
    h, w = shape
    ph, pw = min(patch, h), min(patch, w)
    if points is not None and len(points) and _uniform(gen) < p_focus:
        r, c = (int(v) for v in points[_randint(len(points), gen)].tolist())
        row = (r - ph // 2) % h if wrap_rows else min(max(r - ph // 2, 0), h - ph)
        return row, min(max(c - pw // 2, 0), w - pw)
    return _randint(h if wrap_rows else h - ph + 1, gen), _randint(w - pw + 1, gen)


def sample_batch(
    data: DomainData, batch: int, patch: int | None, gen: torch.Generator, *,
    jitter: float = 0.0, p_focus: float = 0.7, augment: bool = True,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """A random batch of augmented patches: ``x0``, ``mu``, ``weight`` (B, 1, P, P) and the
    embeddings (B, D), on the data's device.

    Every random choice comes from ``gen``, a CPU generator, so batches do not depend on the
    device. Image and residual patches are cropped, then rotated by k·90° and mirrored;
    sinogram patches are cropped with periodic views (= a rotation of the object) and
    mirrored by reversing views and detector (= the object mirrored, DESIGN §4 orientation).
    ``jitter`` scales target and μ together by 1 ± jitter.
    """
    n = len(data)
    idx = torch.randint(n, (batch,), generator=gen).tolist()
    xs, mus, ws = [], [], []
    sino = data.kind == "sinogram"
    for i in idx:
        x0, mu, w = data.x0[i], data.mu[i], data.weight[i]
        h, wd = x0.shape[-2:]
        if patch is not None:
            r, c = crop_origin((h, wd), patch, data.points[i], p_focus, gen, wrap_rows=sino)
            p = min(patch, h), min(patch, wd)
            if sino:
                rows = (torch.arange(p[0], device=x0.device) + r) % h
                x0, mu, w = (a.index_select(-2, rows)[..., c : c + p[1]] for a in (x0, mu, w))
            else:
                x0, mu, w = (a[..., r : r + p[0], c : c + p[1]] for a in (x0, mu, w))
        if augment:
            if sino and patch is None:
                shift, mirror = _randint(h, gen), _uniform(gen) < 0.5
                x0, mu, w = (sino_roll_mirror(a, shift, mirror) for a in (x0, mu, w))
            elif sino:
                if _uniform(gen) < 0.5:
                    x0, mu, w = (torch.flip(a, dims=(-2, -1)) for a in (x0, mu, w))
            else:
                k, flip = _randint(4, gen), _uniform(gen) < 0.5
                x0, mu, w = (rot_flip(a, k, flip) for a in (x0, mu, w))
            if jitter > 0:
                s = 1.0 + jitter * (2.0 * _uniform(gen) - 1.0)
                x0, mu = x0 * s, mu * s
                if data.kind != "residual":
                    x0, mu = x0.clamp(0.0, 1.0), mu.clamp(0.0, 1.0)
        xs.append(x0)
        mus.append(mu)
        ws.append(w)
    sel = torch.as_tensor(idx, device=data.content.device)
    return {
        "x0": torch.stack(xs),
        "mu": torch.stack(mus),
        "weight": torch.stack(ws),
        "content": data.content[sel],
        "artifact": data.artifact[sel],
    }
