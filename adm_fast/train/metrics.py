"""Training logs: means over each log interval, as guided-diffusion logs them
(every loss term also per quartile of t: `mse_q0` … `mse_q3`), printed as one
line and appended to progress.jsonl and progress.csv in the log dir.

Values accumulate as tensors and are read once per interval, so logging adds
no host synchronisation to the steps in between.

A run (re)starting at step S first repairs the log files: a torn last line of
progress.jsonl (a kill mid-write) is dropped, and so are the rows after S,
which the run is about to log again; progress.csv is rewritten from what is
left. A log never holds a step twice.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import re
from collections import defaultdict

import torch

from ..io import atomic_write, output_error

log = logging.getLogger("adm_fast.train")


class Metrics:
    def __init__(self, log_dir: str | None, enabled: bool = True, start_step: int = 0):
        self.log_dir = log_dir if enabled else None
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, torch.Tensor] = {}
        self._scalars: dict[str, list] = defaultdict(list)
        self._columns: list = []
        if self.log_dir is not None and os.path.exists(self._jsonl):
            self._repair(start_step)

    @property
    def _jsonl(self) -> str:
        return os.path.join(self.log_dir, "progress.jsonl")

    def _repair(self, start_step: int) -> None:
        with open(self._jsonl, "rb") as f:
            lines = f.read().decode("utf-8", errors="replace").split("\n")
        rows = []
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("step"), int):
                    raise ValueError("not a row with a step")
            except ValueError as e:
                where = "its last line, torn" if i >= len(lines) - 1 else f"line {i}"
                log.warning("%s: dropping %s (%s)", self._jsonl, where, e)
                continue
            if row["step"] <= start_step:
                rows.append(row)
        text = "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")
        atomic_write(self._jsonl, lambda f: f.write(text), hint=True)
        self._rewrite_csv(rows)

    def _rewrite_csv(self, rows) -> None:
        seen = list(self._columns)
        for r in rows:  # rows of an earlier (resumed) run may hold other keys
            seen += [k for k in r if k not in seen]
        self._columns = _ordered(seen)
        out = io.StringIO(newline="")
        w = csv.DictWriter(out, fieldnames=self._columns)
        w.writeheader()
        w.writerows(rows)
        data = out.getvalue().encode("utf-8")
        atomic_write(os.path.join(self.log_dir, "progress.csv"), lambda f: f.write(data),
                     hint=True)

    def add_losses(self, losses: dict[str, torch.Tensor], t: torch.Tensor, num_timesteps: int):
        """Per-sample loss terms at timesteps t: overall means and per-quartile means."""
        quartile = (4 * t // num_timesteps).clamp_(0, 3)
        onehot = torch.nn.functional.one_hot(quartile, 4).to(torch.float64)
        for key, values in losses.items():
            v = values.detach().to(torch.float64).reshape(-1)
            self._acc(key, v.sum(), v.numel())
            self._acc(f"{key}_q", (onehot * v[:, None]).sum(0), onehot.sum(0))

    def _acc(self, key, total, count):
        count = torch.as_tensor(count, dtype=torch.float64, device=total.device)
        if key in self._sums:
            self._sums[key] += total
            self._counts[key] += count
        else:
            self._sums[key], self._counts[key] = total.clone(), count.clone()

    def add(self, key: str, value) -> None:
        """A scalar (python number) averaged over the interval."""
        self._scalars[key].append(float(value))

    def dump(self, step: int, extra: dict | None = None, world=None) -> dict:
        row = {"step": step}
        keys = list(self._sums)
        if keys:
            flat = torch.cat([self._sums[k].reshape(-1) for k in keys]
                             + [self._counts[k].reshape(-1) for k in keys])
            if world is not None:
                from ..distributed import all_mean
                flat = all_mean(world, flat)  # sums and counts scale alike
            flat = flat.cpu().tolist()
            sizes = [self._sums[k].numel() for k in keys]
            offset, totals, counts = 0, {}, {}
            for k, n in zip(keys, sizes):
                totals[k] = flat[offset:offset + n]
                counts[k] = flat[offset + sum(sizes):offset + sum(sizes) + n]
                offset += n
            for k in keys:
                if k.endswith("_q"):
                    for q, (s, c) in enumerate(zip(totals[k], counts[k])):
                        if c:
                            row[f"{k}{q}"] = s / c
                else:
                    row[k] = totals[k][0] / max(counts[k][0], 1.0)
        for k, values in self._scalars.items():
            row[k] = sum(values) / len(values)
        row.update(extra or {})
        self._sums.clear()
        self._counts.clear()
        self._scalars.clear()
        if self.log_dir is not None:
            self._write(row)
            log.info(format_row(row))
        return row

    def _write(self, row: dict) -> None:
        try:
            self._append(row)
        except OSError as e:  # a full disk says so, naming the log
            raise output_error(self._jsonl, e, hint=True) from None

    def _append(self, row: dict) -> None:
        with open(self._jsonl, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        path = os.path.join(self.log_dir, "progress.csv")
        if any(k not in self._columns for k in row) or not os.path.exists(path):
            # New keys (e.g. once every quartile has been seen): rewrite with
            # the union of columns so the CSV stays rectangular.
            with open(self._jsonl, encoding="utf-8") as f:
                self._rewrite_csv([json.loads(line) for line in f if line.strip()])
        else:
            with open(path, "a", newline="", encoding="utf-8") as f:
                csv.DictWriter(f, fieldnames=self._columns).writerow(row)


_QUARTILE = re.compile(r"_q\d$")


def _ordered(columns: list) -> list:
    """Columns in first-seen order, each loss's quartiles right after it."""
    bases = []
    for c in columns:
        base = _QUARTILE.sub("", c)
        if base not in bases:
            bases.append(base)
    return sorted(columns, key=lambda c: (bases.index(_QUARTILE.sub("", c)), c))


def format_row(row: dict) -> str:
    """The log line: every value but the per-quartile ones (those go to the files)."""
    def fmt(v):
        if isinstance(v, float):
            return f"{v:.4g}" if math.isfinite(v) else str(v)
        return str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in row.items() if not _QUARTILE.search(k))
