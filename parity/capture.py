"""Capture named module outputs of a PyTorch model (the target and peer sides).

Our reference models return their intermediates by name; models we do not own
(transformers, timm) are read through forward hooks on a tap → module table.
"""

from __future__ import annotations

from typing import Callable, Mapping

import numpy as np
import torch


def capture(model: torch.nn.Module, taps: Mapping[str, str], run: Callable[[], object],
            post: Mapping[str, Callable[[torch.Tensor], torch.Tensor]] | None = None) -> dict[str, np.ndarray]:
    """Run `run()` with hooks on `taps` (tap → dotted module path); outputs in tap order.

    `post[tap]` may reshape a captured tensor (e.g. flatten a pooled map).
    """
    got: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())
    missing = [path for path in taps.values() if path not in modules]
    if missing:
        raise KeyError(f"no modules {missing}")
    handles = [modules[path].register_forward_hook(_store(got, tap)) for tap, path in taps.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for h in handles:
            h.remove()
    post = post or {}
    return {tap: post.get(tap, _identity)(got[tap]).float().numpy() for tap in taps}


def _store(got: dict, tap: str):
    def hook(module, inputs, output):
        got[tap] = (output[0] if isinstance(output, tuple) else output).detach()
    return hook


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


def strict_numerics() -> None:
    """No TF32 anywhere; JAX at full precision (tests and parity runs)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    try:
        import jax

        jax.config.update("jax_default_matmul_precision", "highest")
    except ImportError:
        pass
