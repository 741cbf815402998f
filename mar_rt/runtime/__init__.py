"""The runtime: backends that run a bundle's graphs (torch, ONNX Runtime, TensorRT), the
reverse-SDE sampler wrapper, the DuDoCROP pipeline with its QA record, the demo and the
evaluation, and I/O (``io``). See docs/interfaces.md for the contracts; modules import their
heavy dependencies lazily."""
