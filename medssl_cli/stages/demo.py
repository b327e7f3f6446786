"""`medssl demo`: the whole pipeline on synthetic MIMeta data, through the same stage functions as the
individual commands (no separate code path).

1. Write the synthetic datasets under the data root if they are absent.
2. ``pretrain`` with ``recipes/demo.yaml``.
3. ``finetune``: the demo grid (ssl and random inits x linear and knn x 3 fractions x 3 seeds; val
   budget matched).
4. ``evaluate`` on the test split.
5. ``tsne``: Barlow Twins vs random init (and ImageNet when its weights are cached).
6. ``report``: report.md, report.html, summary.json.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from medssl_cli.data.registry import default_data_root
from medssl_cli.errors import UserError
from medssl_cli.io import writable_dir, write_bytes, write_text

LOG = logging.getLogger("medssl")
DEMO_IDS = ("synthetic_organs_axial", "synthetic_organs_coronal", "synthetic_organs_sagittal")


def demo_recipe_path() -> Path:
    """``recipes/demo.yaml`` of the source checkout (the README's install is an editable one)."""
    path = Path(__file__).resolve().parents[2] / "recipes" / "demo.yaml"
    if not path.is_file():
        raise UserError(f"Demo recipe not found at {path}.", "Run from a source checkout, or pass --recipe.")
    return path


def ensure_synthetic(root: Path) -> bool:
    """Write the synthetic datasets under ``root`` unless they are there. Returns True if written."""
    from medssl_cli.data.synth import make_synthetic

    present = [ds for ds in DEMO_IDS if (root / ds / "info.yaml").is_file()]
    if len(present) == len(DEMO_IDS):
        return False
    if present:  # rewriting them all would silently replace data someone made (other sizes, counts)
        missing = ", ".join(ds for ds in DEMO_IDS if ds not in present)
        raise UserError(
            f"{root} holds some of the demo's synthetic datasets but not {missing}.",
            f"Rewrite them with `medssl data synth --out {root} --overwrite`, or pass another --data-dir.",
        )
    LOG.info(f"Writing synthetic MIMeta data to {root}")
    # no organ plane has an info.yaml: overwrite only clears what a stopped write left; crc if absent
    crc = () if (root / "synthetic_crc" / "info.yaml").is_file() else ("crc",)
    make_synthetic(root, which=("organs", *crc), overwrite=True)
    return True


def export_docs(report_dir: Path, docs: Path) -> list[Path]:
    """Copy the demo's figures and comparison table into ``docs`` (what the README shows)."""
    plots = report_dir / "plots"
    tsne_png = sorted(plots.glob("tsne-*.png"))
    pairs = [(plots / "fraction_accuracy.png", docs / "demo-fraction-accuracy.png")]
    pairs += [(tsne_png[-1], docs / "demo-tsne.png")] if tsne_png else []
    written = []
    for src, dst in pairs:
        write_bytes(dst, src.read_bytes())
        written.append(dst)
    lines = (report_dir / "report.md").read_text(encoding="utf-8").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| init | mode |"))
    end = next((i for i in range(start, len(lines)) if not lines[i].startswith("|")), len(lines))
    table = "\n".join(lines[start:end])
    write_text(docs / "demo-table.md", f"<!-- written by `medssl demo --docs docs` -->\n{table}\n")
    return [*written, docs / "demo-table.md"]


def demo(
    *,
    data_dir: Path | str | None = None,
    runs_root: Path | str = "runs",
    recipe_file: Path | None = None,
    imagenet: bool = False,
    docs: Path | None = None,
) -> Path:
    """Run the demo pipeline; returns the report directory."""
    import os

    from medssl_cli.recipe import load_recipe
    from medssl_cli.stages.evaluate import evaluate
    from medssl_cli.stages.finetune import finetune
    from medssl_cli.stages.pretrain import pretrain
    from medssl_cli.stages.report import report
    from medssl_cli.stages.tsne import tsne

    root = Path(data_dir or os.environ.get("MEDSSL_DATA") or default_data_root()).expanduser()
    runs_root = Path(runs_root)
    recipe_file = recipe_file or demo_recipe_path()
    t0 = time.perf_counter()
    times: dict[str, float] = {}

    def lap(stage: str) -> None:
        times[stage] = round(time.perf_counter() - t0 - sum(times.values()), 1)
        LOG.info(f"[demo] {stage} done in {times[stage]:.0f} s")

    recipe = load_recipe(recipe_file)  # a bad recipe or --docs fails before any data is written
    if docs is not None:
        writable_dir(docs, "--docs")
    ensure_synthetic(root)
    lap("data")
    run = pretrain(recipe, data_dir=root, runs_root=runs_root, name="demo")
    lap("pretrain")
    grid = finetune(
        {}, recipe_file=recipe_file, from_run=run.path, runs_root=runs_root, name="demo", data_dir=root
    )
    lap("finetune")
    evaluate({}, from_run=grid.path, runs_root=runs_root, data_dir=root)
    lap("evaluate")
    inits = ["random"] + (["imagenet"] if imagenet else [])
    tsne(
        {},
        from_runs=[str(run.path)],
        inits=inits,
        runs_root=runs_root,
        data_dir=root,
        name="demo",
        recipe_file=recipe_file,
    )
    lap("tsne")
    # this demo's grid and its pretrain run's t-SNE only: older runs under runs_root stay out of the table
    out = report(runs_root=runs_root, from_grid=grid.path, name="demo")
    lap("report")
    if docs is not None:
        LOG.info(
            f"[demo] figures and table copied to {', '.join(str(p) for p in export_docs(out, Path(docs)))}"
        )
    LOG.info(
        f"[demo] finished in {time.perf_counter() - t0:.0f} s: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in times.items())
    )
    return out
