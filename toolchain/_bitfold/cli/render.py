"""Rendering for the CLI: the consoles, tables, and the progress/event renderer."""
from __future__ import annotations

import contextlib

from rich.console import Console
from rich.table import Table

from bitfold.core.events import Events

console = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)


def say_events() -> Events:
    """Events that print each stage as a dim line."""
    return Events(on_say=lambda m: console.print(f"[dim]{m}...[/]"))


@contextlib.contextmanager
def progress_events(description: str):
    """Events that drive a rich progress bar (with ETA) while the block runs."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(), console=console,
                  transient=True) as p:
        task = p.add_task(description, total=None)
        yield Events(on_say=lambda m: console.print(f"[dim]{m}...[/]"),
                     on_progress=lambda i, n: p.update(task, completed=i, total=n))


def layer_table(layers):
    t = Table(title="per-layer bits")
    for c in ("layer", "kind", "MACs", "w", "a", "BitOPs", "weight bits"):
        t.add_column(c, justify="right" if c not in ("layer", "kind") else "left")
    for r in layers:
        t.add_row(r["name"], r["kind"], f"{r['macs']:,}", str(r["w"]), str(r["a"]), f"{r['bitops']:.3g}",
                  f"{r['weight_bits']:.3g}")
    console.print(t)


def grid_table(title, ws, as_, values, fmt="{:.3g}"):
    t = Table(title=title)
    t.add_column("w \\ a")
    for a in as_:
        t.add_column(str(a), justify="right")
    for w, row in zip(ws, values):
        t.add_row(str(w), *[fmt.format(v) for v in row])
    console.print(t)


def cost_table(table):
    """A fitted cost table: the structural model's coefficients and grids, or the per-MAC grid."""
    from bitfold.hw_models.table import FEATURES
    for kind, k in table["kinds"].items():
        if k.get("form") == "features":
            t = Table(title=f"{table['board']} {table['metric']} ({table['unit']}) - {kind}: structural model")
            for c in ("feature", "coefficient", "counts"):
                t.add_column(c)
            for name, c in zip(k["features"], k["coef"]):
                t.add_row(name, f"{c:.4g}", FEATURES[name])
            if k["H"]["o"]:
                t.add_row("H", ", ".join(f"{o}b: {v:.3g}" for o, v in zip(k["H"]["o"], k["H"]["value"])),
                          "LUTs per PE*acc bit over b_out (threshold search)")
            console.print(t)
            grid_table(f"{table['board']} {table['metric']} per lane G ({table['unit']}) - {kind}",
                       k["G"]["w"], k["G"]["a"], k["G"]["value"])
            continue
        if k.get("form") == "lanes":
            for g in ("overhead", "per_lane", "per_threshold"):
                grid_table(f"{table['board']} {table['metric']} {g} ({table['unit']}) - {kind}, FINN folding at a rate",
                           k["w"], k["a"], k[g])
            continue
        grid_table(f"{table['board']} {table['metric']} per MAC ({table['unit']}) - {kind}, overhead {k['overhead']:.3g}",
                   k["w"], k["a"], k["per_mac"])


def rows_table(title: str, columns, rows):
    t = Table(*columns, title=title)
    for r in rows:
        t.add_row(*[str(c) for c in r])
    console.print(t)
