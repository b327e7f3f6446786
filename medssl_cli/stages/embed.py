"""`medssl embed`: frozen-backbone features of one or more splits, in a file numpy opens in one line.

The backbone: a pretrain run's (``--from``, default the newest finished one) or ``--init imagenet`` /
``random``. Features come from the same code path as the probes (``readout.features.cached``: eval
mode, the backbone's own input normalisation, the feature cache), one row per image of every
requested split, in the pooled split order. Output: a new run ``<runs root>/embed-<name>-<stamp>/``
with ``features.npz``:

- ``features`` (N, 512) float32; ``label`` (N,) class index; ``split``, ``dataset`` (strings),
  ``row`` (the image's row in its dataset's ``images.hdf5``), ``index`` (position in its split),
  ``item`` (the organ planes' shared (CT volume, organ) item, else ""); ``class_names``;
- ``provenance``: one JSON string (run, init, backbone hash, recipe hash, image size, datasets).

``numpy.load(path)`` reads it (no pickle: every array is numeric or fixed-width unicode);
``pandas.DataFrame(dict(...))`` of the per-image arrays gives a table.
"""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path
from typing import Any

import numpy as np

from medssl_cli.data.leakage import item_id
from medssl_cli.data.pool import load_split
from medssl_cli.data.registry import data_root
from medssl_cli.data.splits import SPLITS
from medssl_cli.errors import UserError
from medssl_cli.io import write_bytes
from medssl_cli.lifecycle import recording
from medssl_cli.readout import backbones
from medssl_cli.readout.features import cached
from medssl_cli.recipe import resolve
from medssl_cli.runs import Run, check_name, create_run, feature_cache_dir, find_latest, resolve_run
from medssl_cli.runtime import compute

LOG = logging.getLogger("medssl")
EMBED_VERSION = 1


def embed(
    overrides: dict[str, Any],
    *,
    from_run: str | Path | None = None,
    init: str = "ssl",
    splits: list[str] | None = None,
    runs_root: Path | str = "runs",
    data_dir: Path | str | None = None,
    name: str | None = None,
    recipe_file: Path | None = None,
) -> Run:
    """Write the features of ``splits`` (default: train, val, test) for ``init``'s backbone."""
    check_name(name)
    runs_root = Path(runs_root)
    splits = list(splits or SPLITS)
    bad = [s for s in splits if s not in SPLITS] or ([s for s in splits if splits.count(s) > 1])
    if bad:
        raise UserError(
            f"--splits {','.join(splits)}: {bad[0]!r} is unknown or named twice.", "Use e.g. train,test."
        )
    if init not in backbones.INITS:
        raise UserError(f"Unknown init '{init}'.", f"Choose from {', '.join(backbones.INITS)}.")
    pre = None
    if init == "ssl":
        pre = resolve_run(from_run, runs_root, "pretrain") if from_run else find_latest(runs_root, "pretrain")
    elif from_run is not None:
        raise UserError(f"--from names a pretrain run, which --init {init} does not use.", "Drop --from.")
    recipe = resolve(recipe_file, overrides, pre.recipe() if pre else None, ("data", "model"))
    if pre is None and overrides.get("data.datasets") is None and recipe_file is None:
        raise UserError("--init imagenet/random needs --datasets.", "Pass e.g. --datasets axial.")
    root = data_root(data_dir, pre.manifest.get("data", {}).get("root") if pre else None)
    compute.configure_threads(recipe.compute.threads)
    pools = [load_split(recipe, root, s) for s in splits]
    lb = backbones.load(
        init,
        data_channels=pools[0].channels,
        gray_mode=recipe.model.gray_mode,
        pretrain_run=pre,
        seed=recipe.compute.seed,
    )
    device, bf16, channels_last = compute.settings_for(recipe.compute, pools[0].image_size)
    data = {"root": str(root), **{s: p.provenance() for s, p in zip(splits, pools, strict=True)}}
    extra = {"kind": "features", "init": init, "splits": splits, "backbone": lb.info, "data": data}
    run = create_run(runs_root, "embed", recipe, name=name or init, parent=pre, extra=extra)
    with recording(run):
        parts = []
        for split, pool in zip(splits, pools, strict=True):
            fs = cached(feature_cache_dir(runs_root), lb, pool, device=device, bf16=bf16,
                        channels_last=channels_last, desc=f"{split} features")  # fmt: skip
            ids = [pool.dataset_ids[int(d)] for d in pool.source_ds]
            parts.append({
                "features": fs.features.numpy().astype(np.float32),
                "label": pool.labels.astype(np.int64),
                "split": np.array([split] * len(pool)),
                "dataset": np.array(ids),
                "row": pool.source_idx.astype(np.int64),
                "index": np.arange(len(pool), dtype=np.int64),
                "item": np.array([item_id(d, int(r)) for d, r in zip(ids, pool.source_idx, strict=True)]),
            })  # fmt: skip
            LOG.info(f"{split}: {len(pool)} images ({'cache' if fs.hit else f'{fs.seconds:.1f} s'})")
        arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        provenance = {
            "version": EMBED_VERSION, "run": str(run.path), "init": init, "backbone_hash": lb.key,
            "pretrain_run": str(pre.path) if pre else None, "recipe_hash": recipe.hash(),
            "image_size": pools[0].image_size, "datasets": pools[0].dataset_ids, "splits": splits,
        }  # fmt: skip
        buf = io.BytesIO()
        np.savez(
            buf,
            **arrays,
            class_names=np.array(pools[0].class_names),
            provenance=np.array(json.dumps(provenance)),
        )
        write_bytes(run.file("features.npz"), buf.getvalue())
        run.set_status("finished", n=len(arrays["label"]), file="features.npz")
    LOG.info(f"Features of {len(arrays['label'])} images: {run.file('features.npz')}")
    return run
