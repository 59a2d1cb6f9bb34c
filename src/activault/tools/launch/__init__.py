"""Launchers: Slurm and Ray start machines START..END of a run, each `activault collect --machine i`.

`base` holds what a launch is and everything launchers share (the range check against `num_runs`, the
rank command and environment, waiting, the report); `slurm` and `ray` differ only in how a rank is
started and how its end is seen.
"""

from activault.tools.launch.base import (
    Launch,
    Launcher,
    RankResult,
    check_launch,
    parse_env,
    run_launch,
)
from activault.tools.launch.ray import RayLauncher, launch_ray, parse_resources, ray_options, run_rank
from activault.tools.launch.slurm import SlurmLauncher, default_slurm_script, submit_slurm

__all__ = [
    "Launch",
    "Launcher",
    "RankResult",
    "RayLauncher",
    "SlurmLauncher",
    "check_launch",
    "default_slurm_script",
    "launch_ray",
    "parse_env",
    "parse_resources",
    "ray_options",
    "run_launch",
    "run_rank",
    "submit_slurm",
]
