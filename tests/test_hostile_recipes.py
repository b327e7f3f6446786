"""Hostile recipes and grids: YAML alias bombs, duplicate keys, fractions that name one cell."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from medssl_cli.errors import UserError, short
from medssl_cli.grids import plan_cells
from medssl_cli.recipe import FinetuneRecipe, read_recipe_file

BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
pretrain: {epochs: *h}
"""


def test_alias_bomb_in_a_recipe_is_refused_quickly_in_one_short_line(tmp_path: Path) -> None:
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="expands to more than 100,000 values") as exc:
        read_recipe_file(f)
    assert time.perf_counter() - t0 < 5 and len(exc.value.line()) < 300 and "\n" not in exc.value.line()


def test_small_aliases_are_fine(tmp_path: Path) -> None:
    f = tmp_path / "ok.yaml"
    f.write_text("x: &s [0.01, 0.1]\nfinetune: {fractions: *s}\n")
    assert read_recipe_file(f)["finetune"]["fractions"] == [0.01, 0.1]


def test_a_huge_value_in_an_error_message_is_bounded() -> None:
    from medssl_cli.recipe import Recipe, merge

    nested: list = [1]
    for _ in range(40):
        nested = [nested] * 10  # 10**40 leaves if expanded; short() must not expand it
    t0 = time.perf_counter()
    with pytest.raises(UserError) as exc:
        merge(Recipe(), {"pretrain": {"epochs": nested}})
    assert time.perf_counter() - t0 < 2 and len(exc.value.line()) < 400
    assert len(short("y" * 10_000)) <= 80
    assert len(UserError("z" * 10**6).line()) <= 2000


def test_duplicate_recipe_keys_are_refused(tmp_path: Path) -> None:
    f = tmp_path / "dup.yaml"
    f.write_text("pretrain:\n  epochs: 10\n  lr: 0.1\n  epochs: 20\n")
    with pytest.raises(UserError, match=r"gives the key 'epochs' twice \(second at line 4"):
        read_recipe_file(f)


def test_fractions_that_name_one_cell_are_refused() -> None:
    with pytest.raises(UserError, match="name the same cell"):
        plan_cells(FinetuneRecipe(fractions=[0.1, 0.1000001]))
    assert len(plan_cells(FinetuneRecipe(fractions=[0.1, 0.10001], seeds=[0, 1]))) == 4


def test_cli_duplicate_cell_fractions_one_line(tmp_path: Path, capsys, monkeypatch) -> None:
    from medssl_cli.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    with pytest.raises(SystemExit) as exc:
        main(
            [
                "finetune",
                "--init",
                "random",
                "--datasets",
                "x",
                "--fraction",
                "0.1,0.1000001",
                "--runs-root",
                str(tmp_path),
            ]
        )
    out = capsys.readouterr()
    lines = [x for x in (out.out + out.err).splitlines() if x.strip()]
    assert exc.value.code == 2 and len(lines) == 1 and "name the same cell" in lines[0], lines
