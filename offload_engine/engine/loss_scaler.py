"""Loss scaling for fp16 training: a static scale, or a dynamic one that halves on overflow
and doubles after a window of clean steps (DeepSpeed's rule, so a DeepSpeed fp16 config
behaves the same here).

Dynamic rule, per optimizer step:
  overflow:  when the hysteresis budget is down to 1, scale = max(scale / 2, min_scale);
             otherwise the budget drops by one and the scale stays.
  no overflow: with consecutive_hysteresis the budget is refilled; and when the clean steps
             before this one since the last overflow are a positive multiple of `window`,
             the scale doubles (and, without consecutive_hysteresis, the budget is refilled).
"""
from __future__ import annotations

import math

_FACTOR = 2.0


class LossScaler:
    """The fp16 loss scale. ``dynamic=False`` keeps ``init_scale`` for good."""

    def __init__(self, *, dynamic: bool, init_scale: float, window: int = 1000, hysteresis: int = 2,
                 consecutive_hysteresis: bool = False, min_scale: float = 1.0):
        if not (init_scale > 0 and math.isfinite(init_scale)):
            raise ValueError(f"LossScaler: init_scale must be a finite number > 0, got {init_scale!r}")
        self.dynamic = dynamic
        self.scale = float(init_scale)
        self.window = int(window)
        self.hysteresis = int(hysteresis)
        self.consecutive_hysteresis = bool(consecutive_hysteresis)
        self.min_scale = float(min_scale)
        self._budget = self.hysteresis       # overflows still tolerated before the scale drops
        self._iteration = 0                  # optimizer steps seen (applied or skipped)
        self._last_overflow = -1
        self.overflows = 0

    def update(self, overflow: bool) -> None:
        """Records one optimizer step's outcome and adjusts the scale (dynamic only)."""
        if overflow:
            self.overflows += 1
        if self.dynamic:
            if overflow:
                if self._budget <= 1:
                    self.scale = max(self.scale / _FACTOR, self.min_scale)
                else:
                    self._budget -= 1
                self._last_overflow = self._iteration
            else:
                if self.consecutive_hysteresis:
                    self._budget = self.hysteresis
                clean_before = self._iteration - self._last_overflow - 1
                if clean_before > 0 and clean_before % self.window == 0:
                    if not self.consecutive_hysteresis:
                        self._budget = self.hysteresis
                    self.scale *= _FACTOR
        self._iteration += 1

    def state_dict(self) -> dict:
        return {"dynamic": self.dynamic, "scale": self.scale, "budget": self._budget, "iteration": self._iteration,
                "last_overflow": self._last_overflow, "overflows": self.overflows}

    def load_state_dict(self, state: dict) -> None:
        """Restores a saved scaler; the settings (window, hysteresis, ...) stay this config's."""
        missing = {"scale", "budget", "iteration", "last_overflow"} - set(state)
        if missing:
            raise KeyError(f"loss scaler state lacks {', '.join(sorted(missing))}")
        self.scale = float(state["scale"])
        self._budget = int(state["budget"])
        self._iteration = int(state["iteration"])
        self._last_overflow = int(state["last_overflow"])
        self.overflows = int(state.get("overflows", 0))
