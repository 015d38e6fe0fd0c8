"""probe-cascade: cascades of concept probes over an LLM's hidden states.

    import probe_cascade
    rt = probe_cascade.Runtime("pack/", config="realtime")
    with rt.session() as s:
        report = s.observe(hidden)          # a 1-D torch.Tensor or numpy array of D values
        for d in report.top:
            print(d.name, d.prob, " > ".join(d.path))

The runtime is Rust (actors on their own threads, a CPU kernel that scores probes where they
lie in the cache); calls block without holding the GIL. See `probe_cascade.hf` for a
transformers `generate` hook, `probe_cascade.pack` for pack tools, and `probe_cascade.Client`
for a `probe-cascade serve` in another process (same calls, over gRPC).
"""

# torch first: the native module binds the libtorch that `import torch` loads (one libtorch
# in the process), through the extension's relative run-time path to torch/lib.
import torch as _torch

_TORCH = "2.11.0"
if _torch.__version__.split("+")[0] != _TORCH:
    raise ImportError(
        f"probe_cascade was built for torch {_TORCH} (tch 0.24.0), but this environment has torch "
        f"{_torch.__version__}: install torch=={_TORCH}"
    )

from ._native import (  # noqa: E402
    CONFIG_PRESETS,
    Alert,
    SimplexReading,
    BadHiddenState,
    ConfigError,
    Detection,
    ProbeCascadeError,
    ProbeLoadError,
    ProbeScore,
    Report,
    Runtime,
    Session,
    __version__,
    cpu_info,
)
from . import pack, trace, viewer  # noqa: E402

__all__ = [
    "CONFIG_PRESETS",
    "Alert",
    "SimplexReading",
    "BadHiddenState",
    "ConfigError",
    "Detection",
    "ProbeCascadeError",
    "ProbeLoadError",
    "ProbeScore",
    "Report",
    "Runtime",
    "Session",
    "__version__",
    "cpu_info",
    "pack",
    "viewer",
    "trace",
    "hf",
    "Client",
]


def __getattr__(name):
    # `probe_cascade.hf` needs transformers, and `Client` grpcio: imported only when asked for.
    import importlib

    if name == "hf":
        return importlib.import_module(__name__ + ".hf")
    if name in ("Client", "RemoteSession", "RemoteReport", "RemoteDetection", "RemoteAlert", "RemoteProbeScore",
                "RemoteSimplexReading"):
        return getattr(importlib.import_module(__name__ + ".client"), name)
    raise AttributeError(f"module 'probe_cascade' has no attribute {name!r}")
