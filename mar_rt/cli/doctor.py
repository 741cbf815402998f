"""`mar-rt doctor`: what this machine offers and which backend `auto` would use."""

from __future__ import annotations

import json

import typer


def _table(env, backend: str, reason: str) -> list[tuple[str, str]]:  # noqa: ANN001
    def opt(value: object, absent: str = "not found") -> str:
        return absent if value in (None, "", ()) else str(value)

    gpus = "; ".join(
        f"{g.name} (sm {g.compute_capability[0]}.{g.compute_capability[1]}"
        f"{'' if g.memory_gib is None else f', {g.memory_gib:.0f} GiB'}, via {g.source})"
        if g.compute_capability
        else f"{g.name} (via {g.source})"
        for g in env.gpus
    )
    torch_cuda = "no"
    if env.torch_cuda:
        torch_cuda = f"yes (CUDA {env.torch_cuda_version})"
    elif env.torch_cuda_version:
        torch_cuda = f"no (built for CUDA {env.torch_cuda_version})"
    return [
        ("python", f"{env.python} on {env.platform}"),
        ("cpu", f"{env.cpu_model}, {env.cpu_cores} cores"),
        ("torch", opt(env.torch_version)),
        ("torch cuda", torch_cuda),
        ("gpu", gpus or "none"),
        ("cupy", opt(env.cupy_version) + (f", {env.cupy_device}" if env.cupy_device else "")),
        ("onnxruntime", opt(env.onnxruntime_version)),
        ("ort providers", ", ".join(env.onnxruntime_providers) or "none"),
        ("tensorrt", opt(env.tensorrt_version)),
        ("nvcc", f"{env.nvcc_path} ({env.nvcc_version})" if env.nvcc_path else "not found"),
        ("backend", backend),
        ("because", reason),
    ]


def register(app: typer.Typer) -> None:
    """Add `doctor` to the app."""

    @app.command()
    def doctor(
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead."),
        backend: str = typer.Option(
            "auto", "--backend", help="Show what this request resolves to (auto, tensorrt, ...)."
        ),
    ) -> None:
        """Report CPU, GPU, torch, cupy, onnxruntime, tensorrt and nvcc, and the backend choice."""
        from mar_rt.errors import BackendUnavailableError
        from mar_rt.runtime.environment import pick_backend, probe_environment

        env = probe_environment()
        try:
            name, reason = pick_backend(env, backend)
        except BackendUnavailableError as exc:
            name, reason = "none", str(exc)
        if as_json:
            typer.echo(json.dumps({**env.to_dict(), "backend": name, "reason": reason}, indent=2))
        else:
            rows = _table(env, name, reason)
            width = max(len(k) for k, _ in rows)
            for key, value in rows:
                typer.echo(f"{key:<{width}}  {value}")
            for note in env.notes:
                typer.echo(f"{'note':<{width}}  {note}")
        if name == "none":
            raise typer.Exit(code=1)
