"""Options shared by the commands that read sharded inputs or run their per-image stage on Ray
(pycore.curation.scan_sources, pycore.distributed)."""

from __future__ import annotations

from typing import Annotated

import typer

SCALE = "Scale (shards, Ray)"

Ray = Annotated[
    str | None,
    typer.Option(
        "--ray", envvar="HW_RAY_ADDRESS", metavar="ADDRESS",
        help="Run the per-image stage as a Ray Data job: --ray local starts Ray on this machine for the run; "
        "--ray auto joins this machine's cluster; --ray HOST:PORT or ray://HOST:PORT connects there "
        "(also $HW_RAY_ADDRESS). Needs pip install 'hw\\[ray]'.",
        rich_help_panel=SCALE,
    ),
]  # fmt: skip

RayWorkers = Annotated[
    int | None,
    typer.Option("--ray-workers", help="With --ray: at most this many concurrent Ray tasks (default: one per CPU of the cluster).",
                 min=1, rich_help_panel=SCALE),
]  # fmt: skip
