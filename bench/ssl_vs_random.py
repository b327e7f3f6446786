"""Does pretraining help? ``medssl pretrain`` vs a random (and ImageNet) backbone, on real images.

For every real-image source (``medssl_cli.data.real``: images that installed packages ship, written as
MIMeta datasets by the project's writer; nothing is downloaded) and image size, in one run:

1. ``medssl pretrain`` on the train split, once per ``--variant`` (default: the built-in defaults, with
   only epochs, batch size and image size set, as a CPU user would);
2. ``medssl finetune --mode linear`` with inits ssl and random (imagenet with ``--imagenet``) at K
   labelled images per class (stratified, one draw per seed) and with all labels;
3. ``medssl evaluate`` on the test split;

and prints one markdown table: mean test accuracy ± std over the draws per init, and SSL - random.

    python bench/ssl_vs_random.py --sources digits,textures --sizes 32,64 --epochs 50
    python bench/ssl_vs_random.py --sources digits --sizes 32 --epochs 50 \\
        --variant adam:pretrain.optimizer=adam,pretrain.lr=0.001

A variant is ``NAME:KEY=VALUE,KEY=VALUE`` of recipe keys (values parsed as YAML; lists in [a;b] form).
Pin one torch job per core on a small machine: ``taskset -c 1 ... --threads 1``.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from medssl_cli.data.real import SOURCES, write_real  # noqa: E402
from medssl_cli.recipe import resolve  # noqa: E402


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """'name:a.b=1,c.d=[0.3;1.0]' -> ('name', {'a.b': 1, 'c.d': [0.3, 1.0]}); 'defaults' -> no keys."""
    name, _, body = text.partition(":")
    sets: dict[str, Any] = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        sets[key.strip()] = yaml.safe_load(value.replace(";", ","))
    return name, sets


def labelled_fractions(labels_per_class: list[str], n_train: int, n_classes: int) -> dict[str, float]:
    """'5' -> the fraction that takes ~5 images of every class (per-class rounding); 'all' -> 1.0."""
    out = {}
    for k in labels_per_class:
        out[k] = 1.0 if k == "all" else min(1.0, int(k) * n_classes / n_train)
    return out


def run_source(
    source: str, size: int, work: Path, args: argparse.Namespace, variants: list[tuple[str, dict[str, Any]]]
) -> dict[str, Any]:
    from medssl_cli.stages.evaluate import evaluate
    from medssl_cli.stages.finetune import finetune
    from medssl_cli.stages.pretrain import pretrain

    data = work / "data"
    write_real(data, source, size=size, overwrite=True)
    ds = f"real_{source}"
    runs = work / "runs"
    base = {
        "data.datasets": [ds],
        "data.image_size": size,
        "pretrain.epochs": args.epochs,
        "pretrain.batch_size": args.batch_size,
        "compute.threads": args.threads,
        "pretrain.checkpoint_every": args.epochs,
    }
    out: dict[str, Any] = {"source": source, "size": size, "epochs": args.epochs, "variants": {}}
    for i, (name, sets) in enumerate(variants):
        # recipe.resolve: a variant that picks a method gets that method's defaults (METHOD_DEFAULTS)
        recipe = resolve(args.recipe, {**base, **sets})
        t0 = time.perf_counter()
        run = pretrain(recipe, data_dir=data, runs_root=runs, name=f"{source}{size}-{name}")
        pre_s = time.perf_counter() - t0
        n_train, n_classes = run.manifest["data"]["n_images"], len(run.manifest["data"]["class_names"])
        fracs = labelled_fractions(args.labels.split(","), n_train, n_classes)
        inits = ["ssl"] + (["random"] + (["imagenet"] if args.imagenet else []) if i == 0 else [])
        ft = {
            "finetune.inits": inits,
            "finetune.modes": ["linear"],
            "finetune.fractions": sorted(set(fracs.values())),
            "finetune.seeds": list(range(args.draws)),
            "compute.threads": args.threads,
        }
        grid = finetune(ft, from_run=run.path, runs_root=runs, data_dir=data, name=f"{source}{size}-{name}")
        summary = evaluate({}, from_run=grid.path, runs_root=runs, data_dir=data)
        for g in summary["groups"]:
            label = next(k for k, f in fracs.items() if abs(f - g["fraction"]) < 1e-9)
            key = name if g["init"] == "ssl" else g["init"]
            acc = g["accuracy"]
            out["variants"].setdefault(key, {})[label] = {
                "mean": acc["mean"],
                "std": acc.get("std"),
                "n_train": g.get("n_train"),
            }
        out["variants"][name]["pretrain_s"] = round(pre_s, 1)
        last = _history_last(run.path)
        out["variants"][name]["history_last"] = last
        print(f"# {source} {size}px {name}: {json.dumps(out['variants'][name])}", file=sys.stderr, flush=True)
    return out


def _history_last(path: Path) -> dict[str, Any]:
    lines = (path / "history.jsonl").read_text().splitlines()
    return json.loads(lines[-1]) if lines else {}


def table(results: list[dict[str, Any]], labels: list[str]) -> str:
    names = [f"{k}/class" if k != "all" else "all labels" for k in labels]
    head = "| source | size | row | " + " | ".join(names)
    head += " | minus random |\n|---|---|---|" + "---|" * (len(labels) + 1) + "\n"
    rows = []
    for r in results:
        rand = r["variants"].get("random", {})
        for name, accs in r["variants"].items():
            cells = []
            for k in labels:
                a = accs.get(k)
                cells.append("-" if a is None else f"{a['mean']:.3f} ± {a['std'] or 0:.3f}")
            if name == "random":
                delta = ""
            else:
                delta = " / ".join(
                    f"{accs[k]['mean'] - rand[k]['mean']:+.3f}" for k in labels if k in accs and k in rand
                )
            rows.append(f"| {r['source']} | {r['size']} px | {name} | " + " | ".join(cells) + f" | {delta} |")
    return head + "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sources", default="digits,textures", help=f"from {', '.join(SOURCES)}")
    ap.add_argument("--sizes", default="32")
    ap.add_argument("--epochs", type=int, default=50)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--labels", default="5,20,all", help="labelled images per class, or 'all'")
    ap.add_argument("--draws", type=int, default=5, help="label draws (finetune seeds) per fraction")
    ap.add_argument("--variant", action="append", default=[], help="NAME:KEY=VALUE,... (repeatable)")
    ap.add_argument(
        "--methods", default=None, help="pretrain each of these methods (e.g. barlow_twins,vicreg,simclr)"
    )
    ap.add_argument("--recipe", type=Path, default=None, help="base recipe file (default: built-ins)")
    ap.add_argument("--threads", type=int, default=0, help="compute.threads (0: torch's default)")
    ap.add_argument("--imagenet", action="store_true", help="add the ImageNet init (weights file needed)")
    ap.add_argument("--work", type=Path, default=None, help="keep data and runs here (default: temp dir)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    methods = [("barlow_twins" if m == "barlow_twins" else m, {"pretrain.method": m})
               for m in (args.methods.split(",") if args.methods else [])]  # fmt: skip
    variants = methods + [parse_variant(v) for v in args.variant] or [("defaults", {})]
    labels = args.labels.split(",")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        for source in args.sources.split(","):
            for size in (int(s) for s in args.sizes.split(",")):
                results.append(run_source(source, size, work / f"{source}{size}", args, variants))
                if args.json:  # after every source: a stopped run keeps what it measured
                    args.json.write_text(json.dumps({"argv": sys.argv, "results": results}, indent=1))
    cmd = "python " + " ".join(shlex.quote(a) for a in sys.argv)
    print(f"{table(results, labels)}\n\nCommand: `{cmd}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
