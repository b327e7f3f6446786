"""`medssl report`: aggregation over seeds (hand-computed), missing runs, synthetic labels, and a
self-contained HTML file. Fixtures are fake run directories in the formats the stages write."""

from __future__ import annotations

import json
import re
import struct
import zlib
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from medssl_cli.errors import UserError
from medssl_cli.io import write_bytes, write_json, write_yaml
from medssl_cli.readout.metrics import wilson_interval
from medssl_cli.stages.report import aggregate, report

SYN = ["synthetic_organs_axial", "synthetic_organs_coronal"]
CLASSES = ["heart", "liver", "spleen"]
VERSIONS = {"medssl": "0.1.0", "torch": "2.14.1", "mimeta": "0.0.6", "python": "3.11"}


# --------------------------------------------------------------------------------------------
# Pure aggregation, numbers computed by hand


def test_seed_stats_by_hand() -> None:
    # mean 0.85; std = sqrt((0.05^2 + 0 + 0.05^2) / 2) = 0.05; t(0.975, 2) = 4.302653 (t table);
    # half width = 4.302653 * 0.05 / sqrt(3) = 0.1242069
    s = aggregate.seed_stats([0.80, 0.85, 0.90])
    assert s["n"] == 3
    assert s["mean"] == pytest.approx(0.85)
    assert s["std"] == pytest.approx(0.05)
    assert s["ci"] == pytest.approx([0.85 - 0.1242069, 0.85 + 0.1242069], abs=1e-6)
    # two seeds: std = sqrt(0.05^2 * 2 / 1) = 0.0707107; t(0.975, 1) = 12.706205;
    # half = 12.706205 * 0.0707107 / sqrt(2) = 12.706205 * 0.05 = 0.6353102
    s = aggregate.seed_stats([0.40, None, 0.50])
    assert s["n"] == 2 and s["mean"] == pytest.approx(0.45) and s["std"] == pytest.approx(0.0707107, abs=1e-7)
    assert s["ci"] == pytest.approx([0.45 - 0.6353102, 0.45 + 0.6353102], abs=1e-6)
    # bounds: an interval past the metric's range is clipped and flagged; inside it, left as is
    c = aggregate.seed_stats([0.40, 0.50], bounds=(0.0, 1.0))
    assert c["ci"] == [0.0, 1.0] and c["ci_clipped"] and c["ci_unclipped"][0] == pytest.approx(-0.1853102)
    assert "ci_clipped" not in aggregate.seed_stats([0.80, 0.85, 0.90], bounds=(0.0, 1.0))
    # equal values (the same fit for every seed): one distinct result, no std/interval, exact mean
    same = aggregate.seed_stats([0.1, 0.1, 0.1], bounds=(0.0, 1.0))
    assert same == {"mean": 0.1, "std": 0.0, "n": 3, "ci": None, "identical": True}
    # one seed: no spread and no interval; none: nothing
    assert aggregate.seed_stats([0.7]) == {"mean": 0.7, "std": None, "n": 1, "ci": None}
    assert aggregate.seed_stats([None]) == {"mean": None, "std": None, "n": 0, "ci": None}
    assert aggregate.t_quantile(3) == pytest.approx(3.182446, abs=1e-6)


def test_mean_interval_and_choose_split() -> None:
    assert aggregate.mean_interval([[0.8, 0.9], [0.7, 0.95], None]) == pytest.approx([0.75, 0.925])
    assert aggregate.mean_interval([None]) is None
    val_only = [{"metrics": {"val": {"accuracy": 0.5}}}]
    assert aggregate.choose_split(val_only) == ("val", True)
    assert aggregate.choose_split([*val_only, {"metrics": {"test": {"accuracy": 0.4}}}]) == ("test", False)
    assert aggregate.choose_split([{"metrics": {}}]) == (None, False)


def test_group_cells_orders_groups_and_skips_cells_without_the_split() -> None:
    def cell(init: str, fraction: float, seed: int, acc: float | None) -> dict[str, Any]:
        m = {} if acc is None else {"test": {"n": 50, "accuracy": acc, "accuracy_ci": [acc - 0.1, acc + 0.1]}}
        name = f"{init}-linear-f{fraction:g}-s{seed}"
        return {
            "name": name,
            "init": init,
            "mode": "linear",
            "fraction": fraction,
            "seed": seed,
            "metrics": m,
        }

    cells = [cell("random", 0.1, 0, 0.3), cell("ssl", 1.0, 0, 0.9), cell("ssl", 0.1, 1, 0.6),
             cell("ssl", 0.1, 0, 0.5), cell("ssl", 0.1, 2, None)]  # fmt: skip
    rows = aggregate.group_cells(cells, "test")
    assert [(r["init"], r["fraction"]) for r in rows] == [("ssl", 0.1), ("ssl", 1.0), ("random", 0.1)]
    assert rows[0]["seeds"] == [0, 1] and rows[0]["accuracy"]["mean"] == pytest.approx(0.55)
    assert rows[0]["accuracy_run_ci_mean"] == pytest.approx([0.45, 0.65])
    assert rows[0]["n_eval"] == [50]


# --------------------------------------------------------------------------------------------
# Fake run directories in the stages' formats


def png(path: Path) -> None:
    """A valid 2x2 grey PNG (no matplotlib needed)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    raw = b"".join(b"\x00" + bytes([128, 128]) for _ in range(2))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 0, 0, 0, 0)) + chunk(b"IDAT", zlib.compress(raw))
    write_bytes(path, b"\x89PNG\r\n\x1a\n" + body + chunk(b"IEND", b""))


def metrics(acc: float, n: int = 100) -> dict[str, Any]:
    k = round(acc * n)
    return {
        "n": n, "accuracy": acc, "balanced_accuracy": acc - 0.01, "macro_f1": acc - 0.02, "auroc": 0.9,
        "accuracy_ci": list(wilson_interval(k, n)), "ci_method": "wilson 95%",
        "per_class_recall": {c: acc for c in CLASSES}, "class_names": CLASSES,
        "confusion": [[k // 3, 0, 0], [0, k // 3, 0], [n - k, 0, k - 2 * (k // 3)]],
    }  # fmt: skip


def provenance(ids: list[str], n: int) -> dict[str, Any]:
    return {"datasets": ids, "splits": ["train"], "class_names": CLASSES, "n_images": n, "image_size": 32,
            "synthetic": {d: d.startswith("synthetic_") for d in ids}, "fingerprint": "f"}  # fmt: skip


def run_json(path: Path, stage: str, status: str = "finished", **extra: Any) -> None:
    info = {"stage": stage, "name": path.name, "status": status, "versions": VERSIONS,
            "recipe_hash": f"hash-{path.name[:6]}", "started": "2026-01-01T00:00:00", **extra}  # fmt: skip
    write_json(path / "run.json", info)


def make_pretrain(root: Path, name: str, status: str = "finished") -> Path:
    p = root / name
    write_yaml(p / "recipe.yaml", {"pretrain": {"epochs": 2, "batch_size": 32}})
    m = {
        "epochs": 2,
        "final_loss": 30.5,
        "first_epoch_loss": 40.0,
        "samples_per_s": 12.5,
        "train_time_s": 16.0,
    }
    extra = {"data": provenance(SYN, 99), "device": "cpu", "precision": "fp32"}
    run_json(
        p,
        "pretrain",
        status,
        metrics=m,
        **extra,
        **({"error": "loss diverged"} if status != "finished" else {}),
    )
    write_json(p / "metrics.json", m)
    png(p / "plots" / "loss.png")
    return p


def make_grid(
    root: Path, name: str, parent: Path, plan: dict[tuple[str, float, int], Any], test: bool = True
) -> Path:
    """plan: (init, fraction, seed) -> accuracy | "failed" | "absent" | ("val-only", acc) | ("leak", acc)."""
    g = root / name
    cells = []
    write_yaml(g / "recipe.yaml", {"finetune": {"head": "lbfgs", "modes": ["linear"], "c_grid": [0.1, 1.0]}})
    for i, ((init, fraction, seed), what) in enumerate(plan.items()):
        cname = f"{init}-linear-f{fraction:g}-s{seed}"
        cells.append(
            {"index": i, "name": cname, "init": init, "mode": "linear", "fraction": fraction, "seed": seed}
        )
        if what == "absent":
            continue
        c = g / "cells" / cname
        status = "failed" if what == "failed" else "finished"
        subset = {
            "n": max(3, round(99 * fraction)),
            "per_class": {},
            "requested": 1,
            "floor_raised": fraction < 0.05,
        }
        run_json(c, "finetune", status, kind="cell", grid=str(g), **cells[-1], subset=subset)
        if status == "failed":
            continue
        kind, acc = what if isinstance(what, tuple) else ("ok", what)
        m = {"cell": {**cells[-1], "n_train": subset["n"]}, "val": metrics(acc + 0.01, 30),
             "leakage_override": kind == "leak"}  # fmt: skip
        if test and kind != "val-only":
            m["test"] = metrics(acc)
            png(c / "plots" / "confusion_test.png")
        write_json(c / "metrics.json", m)
    done = sum(1 for w in plan.values() if w not in ("failed", "absent"))
    status = "finished" if done == len(plan) else "failed"
    data = {"root": "/data", "train": provenance(SYN, 99), "val": provenance(SYN, 30)}
    # no cells_finished / cells_total: a killed grid never writes them, the report counts the cells
    run_json(g, "finetune", status, kind="grid", parent=str(parent), cells=cells, data=data)
    return g


def make_knn(root: Path, name: str, parent: Path, ids: list[str]) -> Path:
    k = root / name
    run_json(k, "evaluate", kind="knn", split="test", parent=str(parent), probe={"k": 20},
             data={"root": "/data", "train": provenance(ids, 99), "test": provenance(ids, 66)})  # fmt: skip
    write_json(k / "metrics.json", {"test": metrics(0.42, 66), "leakage_override": False})
    png(k / "plots" / "confusion_test.png")
    return k


def make_tsne(root: Path, name: str, parent: Path) -> Path:
    t = root / name
    run_json(t, "tsne", split="test", parent=str(parent))
    b = {"features": {"silhouette_cosine": 0.123, "knn_loo_accuracy": 0.5},
         "embedding_2d": {"silhouette_euclidean": 0.2, "knn_loo_accuracy": 0.6}}  # fmt: skip
    write_json(t / "metrics.json", {
        "split": "test", "n": 66, "datasets": SYN, "synthetic": {d: True for d in SYN},
        "tsne": {"perplexity": 21.7}, "knn": {"k": 20}, "chance_accuracy": 1 / 11, "leakage_override": False,
        "backbones": [{"id": "ssl:x", "title": "Barlow Twins (x)", **b},
                      {"id": "random", "title": "Random init", **b}],
    })  # fmt: skip
    png(t / "plots" / "tsne.png")
    return t


PLAN = {
    ("ssl", 0.1, 0): 0.80, ("ssl", 0.1, 1): 0.85, ("ssl", 0.1, 2): 0.90,
    ("ssl", 1.0, 0): ("leak", 0.95), ("ssl", 1.0, 1): 0.95, ("ssl", 1.0, 2): 0.95,
    ("random", 0.1, 0): 0.40, ("random", 0.1, 1): "failed", ("random", 0.1, 2): 0.50,
    ("random", 1.0, 0): 0.60, ("random", 1.0, 1): "absent", ("random", 1.0, 2): ("val-only", 0.7),
}  # fmt: skip


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    root = tmp_path / "runs"
    pre = make_pretrain(root, "pretrain-a-20260101-000000")
    make_pretrain(root, "pretrain-broken-20260101-000001", status="failed")
    make_grid(root, "finetune-a-20260101-000100", pre, PLAN)
    make_knn(root, "evaluate-knn-20260101-000200", pre, ["organs_axial"])
    make_tsne(root, "tsne-a-20260101-000300", pre)
    (root / "junk").mkdir()  # a folder that is not a run: listed, not skipped
    (root / ".cache" / "features").mkdir(parents=True)  # hidden: never a run
    return root


def group(summary: dict[str, Any], init: str, fraction: float) -> dict[str, Any]:
    (grid,) = summary["grids"]
    return next(g for g in grid["groups"] if g["init"] == init and g["fraction"] == fraction)


def test_report_aggregates_test_metrics_and_lists_every_problem(runs_root: Path) -> None:
    out = report(runs_root=runs_root, name="t")
    assert out.parent == runs_root and out.name.startswith("report-t-")
    assert json.loads((out / "run.json").read_text())["status"] == "finished"
    summary = json.loads((out / "summary.json").read_text())
    g = group(summary, "ssl", 0.1)
    assert g["accuracy"]["mean"] == pytest.approx(0.85) and g["accuracy"]["std"] == pytest.approx(0.05)
    assert g["accuracy"]["ci"] == pytest.approx([0.85 - 0.1242069, 0.85 + 0.1242069], abs=1e-6)
    assert g["balanced_accuracy"]["mean"] == pytest.approx(0.84)
    r = group(summary, "random", 0.1)
    # two seeds: the t interval [-0.185, 1.085] reaches past [0, 1]: clipped, flagged, and starred
    assert r["seeds"] == [0, 2] and r["accuracy"]["ci"] == [0.0, 1.0] and r["accuracy"]["ci_clipped"]
    assert r["accuracy"]["ci_unclipped"] == pytest.approx([0.45 - 0.6353102, 0.45 + 0.6353102])
    assert "45.0 ± 7.1 [0.0, 100.0]*" in (out / "report.md").read_text()
    r1 = group(summary, "random", 1.0)  # seed 1 absent, seed 2 has val only: one test value, no CI
    assert r1["seeds"] == [0] and r1["accuracy"]["std"] is None and r1["accuracy"]["ci"] is None
    assert group(summary, "ssl", 1.0)["leakage_override"] is True
    assert summary["grids"][0]["split"] == "test" and summary["grids"][0]["fallback_to_val"] is False

    problems = {(p["where"], p["what"]) for p in summary["missing_or_failed"]}
    grid = "finetune-a-20260101-000100"
    assert (f"{grid}/cells/random-linear-f1-s1", "cell planned in the grid's run.json but absent") in problems
    assert (f"{grid}/cells/random-linear-f0.1-s1", "cell not finished") in problems
    assert (f"{grid}/cells/random-linear-f1-s2", "finished cell without test metrics") in problems
    assert (grid, "finetune grid not finished") in problems
    unfinished = [p for p in summary["missing_or_failed"] if p["what"] == "finetune grid not finished"]
    (detail,) = [p["detail"] for p in unfinished]
    done = sum(w not in ("failed", "absent") for w in PLAN.values())
    assert detail == f"{done} of {len(PLAN)} cells finished"  # from the cells: run.json has no totals
    assert ("pretrain-broken-20260101-000001", "pretrain run not finished") in problems
    assert any(w == "junk" for w, _ in problems)
    assert not any(".cache" in w for w, _ in problems)

    md = (out / "report.md").read_text()
    assert "linear: L-BFGS logistic regression, C from [0.1, 1.0] chosen on val" in md
    assert "SHARED SUBJECTS" in md  # two organ planes pooled: the same items, so per-run CIs are too narrow
    # rows with fewer seeds than planned say so, in the table itself
    assert "| 2 of 3 (0, 2) |" in md and "| 1 of 3 (0) |" in md and "INCOMPLETE: in 2 row(s)" in md
    missing = md[md.index("## Missing or failed") :]
    for name in ("random-linear-f1-s1", "random-linear-f0.1-s1", "random-linear-f1-s2", "pretrain-broken"):
        assert name in missing
    # every table row and caption that names a synthetic dataset marks it (the banner says it in words)
    lines = [line for line in md.splitlines() if not line.startswith("> **Warning:** SYNTHETIC DATA")]
    assert sum("synthetic_organs_axial" in line for line in lines if line.startswith("|")) >= 2
    assert sum("synthetic_organs_axial" in line for line in lines) >= 6
    for line in lines:
        for m in re.finditer(r"synthetic_organs_\w+", line):
            assert line[m.end() :].startswith(" (SYNTHETIC)"), line
    assert "organs_axial (SYNTHETIC)" not in md.replace("synthetic_organs_axial (SYNTHETIC)", "")
    assert "| Barlow Twins | linear | 10% | 10 | 3 (0, 1, 2) | 85.0 ± 5.0 [72.6, 97.4] |" in md
    assert "Barlow Twins [LEAKAGE OVERRIDE] | linear | 100%" in md
    leaks = md[md.index("### Leakage overrides") : md.index("## Missing or failed")]
    assert f"{grid}/cells/ssl-linear-f1-s0" in leaks
    protocol = md[md.index("## Protocol") : md.index("## Pretraining")]
    assert "splits train of synthetic_organs_axial (SYNTHETIC)" in protocol and "val only" in protocol
    for img in (
        "fraction_accuracy.png",
        "loss-pretrain-a-20260101-000000.png",
        "tsne-tsne-a-20260101-000300.png",
        f"confusion-{grid}-ssl-linear-f1-s0-test.png",
        f"confusion-{grid}-random-linear-f1-s0-test.png",
    ):
        assert (out / "plots" / img).is_file() and f"(plots/{img})" in md
    # a second report never collects the first one
    again = json.loads((report(runs_root=runs_root, name="t2") / "summary.json").read_text())
    assert not any("report-" in p["where"] for p in again["missing_or_failed"])


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []
        self.ids: set[str] = set()
        self.tags: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        for key, value in attrs:
            if key in ("src", "href", "srcset", "data", "poster", "action"):
                self.refs.append(value or "")
            if key == "id" and value:
                self.ids.add(value)


def test_html_is_self_contained(runs_root: Path, tmp_path: Path) -> None:
    out = report(runs_root=runs_root, out=tmp_path / "rep")
    assert not (out / "run.json").exists()  # --out: a plain folder, not a run
    text = (out / "report.html").read_text()
    parser = _Refs()
    parser.feed(text)
    assert parser.refs, "no references parsed at all"
    for ref in parser.refs:
        assert ref.startswith("data:") or ref.startswith("#"), ref
        if ref.startswith("#"):
            assert ref[1:] in parser.ids, f"dangling anchor {ref}"
    images = [r for r in parser.refs if r.startswith("data:image/png;base64,")]
    assert len(images) >= 5
    assert "link" not in parser.tags and "script" not in parser.tags
    assert "http://" not in text and "https://" not in text and "url(" not in text
    assert "NO TEST METRICS" not in text and "SYNTHETIC DATA" in text


def test_val_fallback_is_loud(tmp_path: Path) -> None:
    root = tmp_path / "runs"
    pre = make_pretrain(root, "pretrain-a-20260101-000000")
    make_grid(
        root, "finetune-b-20260101-000100", pre, {("ssl", 1.0, 0): 0.7, ("ssl", 1.0, 1): 0.8}, test=False
    )
    out = report(runs_root=root)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["grids"][0]["split"] == "val" and summary["grids"][0]["fallback_to_val"] is True
    assert group(summary, "ssl", 1.0)["accuracy"]["mean"] == pytest.approx(0.76)  # val = test + 0.01
    md = (out / "report.md").read_text()
    assert "> **Warning:** NO TEST METRICS: these are VALIDATION metrics" in md
    assert any("no cell has TEST metrics" in p["what"] for p in summary["missing_or_failed"])
    assert '<caption class="warning">NO TEST METRICS' in (out / "report.html").read_text()
    # no confusion PNG for val: drawn again from the stored matrix
    assert (out / "plots" / "confusion-finetune-b-20260101-000100-ssl-linear-f1-s0-val.png").is_file()


def test_from_grid_scope_and_errors(runs_root: Path, tmp_path: Path) -> None:
    pre = runs_root / "pretrain-a-20260101-000000"
    other = make_grid(runs_root, "finetune-z-20260101-000900", pre, {("ssl", 1.0, 0): 0.5})
    out = report(from_grid=runs_root / "finetune-a-20260101-000100", out=tmp_path / "one")
    summary = json.loads((out / "summary.json").read_text())
    assert [g["name"] for g in summary["grids"]] == ["finetune-a-20260101-000100"]
    assert [p["name"] for p in summary["pretrain"]] == [pre.name]
    assert [t["name"] for t in summary["tsne"]] == ["tsne-a-20260101-000300"]
    assert "pretrain-broken" not in (out / "report.md").read_text()
    # with two grids, the newest gets plots/fraction_accuracy.png and the other its own file
    both = report(runs_root=runs_root, out=tmp_path / "both")
    assert (both / "plots" / "fraction_accuracy.png").is_file()
    assert (both / "plots" / "fraction_accuracy-finetune-a-20260101-000100.png").is_file()
    assert other.name in (both / "report.md").read_text()
    with pytest.raises(UserError, match="not a finetune grid"):
        report(from_grid=pre, out=tmp_path / "x")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="Nothing to report"):
        report(runs_root=tmp_path / "empty")
    with pytest.raises(UserError, match="does not exist"):
        report(runs_root=tmp_path / "nope")


def test_commands_through_typer(runs_root: Path, tmp_path: Path) -> None:
    import typer
    from typer.testing import CliRunner

    from medssl_cli.commands import report as report_cmd
    from medssl_cli.commands import tsne as tsne_cmd

    app = typer.Typer()
    app.command("report")(report_cmd.report)
    app.command("tsne")(tsne_cmd.tsne)
    runner = CliRunner()
    res = runner.invoke(app, ["tsne", "--help"])
    assert res.exit_code == 0 and "--allow-leakage" in res.output and "--max-samples" in res.output
    res = runner.invoke(app, ["report", "--runs-root", str(runs_root), "--out", str(tmp_path / "cli")])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "cli" / "report.html").is_file() and (tmp_path / "cli" / "summary.json").is_file()
