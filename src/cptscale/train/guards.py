"""Checks on every training step: the loss (finite, no spike) before the update, the update itself
(Megatron's optimizer found no non-finite gradient, the global gradient norm is finite) after it."""

from __future__ import annotations

import math


class LossGuard:
    """A non-finite loss, or one above ``spike_factor`` x the mean of the last 20 (once 10 are known),
    is a problem. Keeps the recent losses; a WSD branch restores them afterwards."""

    WINDOW, MIN_KNOWN = 20, 10

    def __init__(self, spike_factor: float, recent: list[float]) -> None:
        self.spike_factor = spike_factor
        self.recent = list(recent)

    def problem(self, step: int, loss: float) -> str | None:
        if not math.isfinite(loss):
            return f"loss is {loss} at step {step}"
        if self.spike_factor > 0 and len(self.recent) >= self.MIN_KNOWN:
            window = self.recent[-self.WINDOW:]
            mean = sum(window) / len(window)
            if loss > self.spike_factor * mean:
                return (f"loss spike at step {step}: {loss:.4f} > loss_spike_factor {self.spike_factor:g} x mean of "
                        f"the last {len(window)} losses {mean:.4f}")
        return None

    def record(self, loss: float) -> None:
        self.recent.append(loss)


def update_problem(step: int, loss: float, ok: bool, grad_norm: float | None) -> str | None:
    """What is wrong with an optimizer update (``ok``: Megatron found no non-finite gradient)."""
    if not ok:
        return f"the optimizer step at step {step} failed (non-finite gradients)"
    if grad_norm is not None and not math.isfinite(grad_norm):
        return f"gradient norm is {grad_norm} at step {step} (the loss was {loss:.4f})"
    return None
