"""How long a trainer's run will take, said once its first steps have been timed.

The step budget is the recipe's (``max_steps``); a wall-clock cap (``max_time_s``) is an
option. After ``after`` steps the trainer prints its plan at the measured speed, and, when the
cap will cut it, the step it will stop at, so nobody watches a bar that will never finish.
"""

from __future__ import annotations

import time

from tqdm.auto import tqdm


def clock(seconds: float) -> str:
    """``4m05s``: minutes and seconds."""
    return f"{int(seconds) // 60}m{int(seconds) % 60:02d}s"


def time_cap_message(name: str, step: int, max_steps: int) -> str:
    """What a run cut by its wall-clock cap says, wherever it is reported."""
    return f"{name} stopped at {step}/{max_steps} steps: time cap"


class Pace:
    """Times the steps ``start+1 .. max_steps`` of a run; :meth:`tick` after each step."""

    def __init__(
        self,
        name: str,
        start: int,
        max_steps: int,
        max_time_s: float | None = None,
        after: int = 5,
        enabled: bool = True,
    ) -> None:
        self.name, self.start, self.max_steps = name, start, max_steps
        self.max_time_s, self.after, self.enabled = max_time_s, after, enabled
        self.began = time.perf_counter()

    @property
    def elapsed_s(self) -> float:
        """Seconds since training started (this process's run only)."""
        return time.perf_counter() - self.began

    def out_of_time(self) -> bool:
        """Whether the optional time cap (``max_time_s``) is spent."""
        return self.max_time_s is not None and self.elapsed_s > self.max_time_s

    def tick(self, step: int) -> None:
        """Print the plan once ``after`` steps (or all of them) are timed."""
        done, left = step - self.start, self.max_steps - self.start
        if not self.enabled or done != min(self.after, left):
            return
        per_step = self.elapsed_s / done
        text = (f"{self.name}: {left} steps, about {clock(per_step * left)} at "
                f"{per_step:.2f} s/step (timed over the first {done})")  # fmt: skip
        if self.max_time_s is not None and per_step * left > self.max_time_s:
            stop = self.start + int(self.max_time_s / per_step)
            text += f"; the time cap of {clock(self.max_time_s)} stops it near step {stop}"
        tqdm.write(text)
