"""A fake `sbatch` for the launcher tests: the script, and the calls it recorded."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

N = 4  # machines in the launch tests' config (its num_runs)

FAKE_SBATCH = """#!/bin/bash
n=$(( $(cat "$FAKE/count" 2>/dev/null || echo 0) + 1 )); echo $n > "$FAKE/count"
printf '%s\\n' "MACHINE=${MACHINE:-}" "TOKEN=${AV_TOKEN:-}" "ARRAY_TASK=${SLURM_ARRAY_TASK_ID:-}" "$@" > "$FAKE/call$n"
if [ "$n" = "${FAIL_AT:-0}" ]; then echo "sbatch: error: QOSMaxSubmitJobPerUserLimit" >&2; exit 1; fi
echo "$((100 + n));cluster"
"""


@dataclass
class Call:
    """One sbatch call: the variables the job would see, and sbatch's arguments."""

    machine: str
    token: str
    task: str
    args: list[str]


def calls(fake: Path) -> list[Call]:
    out = []
    for i in range(1, int((fake / "count").read_text()) + 1):
        machine, token, task, args = (fake / f"call{i}").read_text().split("\n", 3)
        values = [v.split("=", 1)[1] for v in (machine, token, task)]
        out.append(Call(values[0], values[1], values[2], args.splitlines()))
    return out
