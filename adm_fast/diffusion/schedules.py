"""Noise schedules and timestep respacing, as guided-diffusion defines them."""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence

import numpy as np

from ..defaults import size_problem

SCHEDULES = ("linear", "cosine")


def get_named_beta_schedule(schedule_name: str, num_diffusion_timesteps: int) -> np.ndarray:
    """β_1..β_T (float64). "linear": Ho et al.'s 1e-4..0.02, scaled by 1000/T so
    any T gives a similar process; "cosine": Nichol & Dhariwal's ᾱ(t) =
    cos²((t + 0.008)/1.008 · π/2)."""
    if num_diffusion_timesteps < 1:
        raise ValueError(f"diffusion steps must be >= 1, got {num_diffusion_timesteps}")
    # Before the tables are allocated (about 20 float64 arrays of this length).
    too_many = size_problem("diffusion_steps", num_diffusion_timesteps)
    if too_many:
        raise ValueError(too_many)
    if schedule_name == "linear":
        scale = 1000 / num_diffusion_timesteps
        return np.linspace(scale * 0.0001, scale * 0.02, num_diffusion_timesteps,
                           dtype=np.float64)
    if schedule_name == "cosine":
        return betas_for_alpha_bar(
            num_diffusion_timesteps,
            lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"unknown beta schedule {schedule_name!r}; choose one of "
                     f"{', '.join(SCHEDULES)}")


def betas_for_alpha_bar(num_diffusion_timesteps: int, alpha_bar: Callable[[float], float],
                        max_beta: float = 0.999) -> np.ndarray:
    """Discretise a continuous ᾱ(t), t ∈ [0, 1], into betas (capped at max_beta)."""
    betas = []
    for i in range(num_diffusion_timesteps):
        t1, t2 = i / num_diffusion_timesteps, (i + 1) / num_diffusion_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return np.array(betas)


def _parse_counts(section_counts: str) -> list[int]:
    if not re.fullmatch(r"\s*\d+\s*(,\s*\d+\s*)*", section_counts):
        raise ValueError(f"malformed timestep respacing {section_counts!r}: expected "
                         f"'N', 'N1,N2,...' or 'ddimN' with positive integers")
    return [int(c) for c in section_counts.split(",")]


def space_timesteps(num_timesteps: int, section_counts: str | Sequence[int]) -> set[int]:
    """The original timesteps a respaced process keeps.

    "250": 250 evenly spaced steps; "10,15,20": the process is cut into three
    equal sections taking 10, 15 and 20 evenly spaced steps; "ddim25": the
    integer stride DDIM uses that gives exactly 25 steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            count = section_counts[len("ddim"):]
            if not count.isdigit() or int(count) < 1:
                raise ValueError(f"malformed timestep respacing {section_counts!r}: expected "
                                 f"'ddimN' with N a positive integer")
            desired = int(count)
            for stride in range(1, num_timesteps + 1):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"respacing {section_counts!r}: no integer stride gives exactly "
                             f"{desired} of {num_timesteps} steps")
        section_counts = _parse_counts(section_counts)
    counts = [int(c) for c in section_counts]
    if not counts or any(c < 1 for c in counts):
        raise ValueError(f"timestep respacing needs positive step counts, got {counts}")
    if len(counts) > num_timesteps:
        raise ValueError(f"respacing {counts} has more sections than the {num_timesteps} steps")
    size_per, extra = divmod(num_timesteps, len(counts))
    start, steps = 0, []
    for i, count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"respacing {counts}: cannot take {count} steps from a section "
                             f"of {size} (of {num_timesteps} steps in all)")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)
