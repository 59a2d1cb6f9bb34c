#!/usr/bin/env python
"""Run machines START..END of an N-machine collection as Ray tasks.

    python scripts/run_ray_jobs.py CONFIG N [START [END]] [--address A] [--resources JSON] [--wait]
e.g.
    python scripts/run_ray_jobs.py configs/llama3.3_70b.yaml 8 0 7 --address ray://head:10001 \\
        --resources '{"CPU": 32, "GPU": 2}' --wait

The same as `activault launch ray ...`; see `activault launch ray -h` for every option.
"""

import sys

from activault.cli import main

if __name__ == "__main__":
    sys.exit(main(["launch", "ray", *sys.argv[1:]]))
