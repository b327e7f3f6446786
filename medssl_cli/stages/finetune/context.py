"""What one process working on a finetune grid shares across its cells (``Context``): the recipe,
the grid, the train/val pools, the device, and each init's backbone and frozen features (loaded or
extracted once, through the feature cache). ``cell.py`` runs a cell with it; ``full_ft.py`` trains one.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import torch

from medssl_cli.data.pool import Pool
from medssl_cli.models import backbone_meta, save_weights
from medssl_cli.readout import backbones
from medssl_cli.readout.backbones import LoadedBackbone
from medssl_cli.readout.features import cached
from medssl_cli.readout.probes import LinearFit
from medssl_cli.recipe import Recipe
from medssl_cli.runs import Run, feature_cache_dir
from medssl_cli.runtime.launch import Dist
from medssl_cli.runtime.preempt import StopFlag

LOG = logging.getLogger("medssl")


@dataclass
class Context:
    recipe: Recipe
    grid: Run
    parent: Run | None
    train: Pool
    val: Pool
    device: torch.device
    bf16: bool
    channels_last: bool
    stop: StopFlag
    n_cells: int
    dist: Dist = field(default_factory=Dist)
    loaded: dict[str, LoadedBackbone] = field(default_factory=dict)
    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    fits: dict[tuple[str, bytes], LinearFit] = field(default_factory=dict)
    timings: dict[str, float] = field(
        default_factory=lambda: {"extraction_s": 0.0, "linear_fit_s": 0.0, "linear_fits": 0}
    )

    @property
    def cache_dir(self) -> Path:
        return feature_cache_dir(self.grid.path.parent)

    def backbone(self, init: str) -> LoadedBackbone:
        if init not in self.loaded:
            lb = backbones.load(
                init,
                data_channels=self.train.channels,
                gray_mode=self.recipe.model.gray_mode,
                pretrain_run=self.parent,
                seed=self.recipe.compute.seed,
            )
            if init == "random":  # saved, so that evaluate uses exactly these weights
                path = self.grid.file("backbones", f"random-seed{self.recipe.compute.seed}.safetensors")
                if self.dist.is_main and not path.exists():
                    gm = lb.info["gray_mode"]
                    meta = {**backbone_meta(self.train.channels, gm, self.train.image_size), **lb.metadata()}
                    save_weights(path, lb.module, meta)
                lb.info["source"] = str(path)
            LOG.info(f"Backbone '{init}': {lb.info.get('source')} ({lb.info.get('input')})")
            pretrained_at = lb.info.get("pretrain_image_size")
            if pretrained_at and pretrained_at != self.train.image_size:
                LOG.warning(
                    f"The ssl backbone was pretrained at {pretrained_at} px; fine-tuning at "
                    f"{self.train.image_size} px"
                )
            self.loaded[init] = lb
        return self.loaded[init]

    def features(self, init: str) -> tuple[torch.Tensor, torch.Tensor]:
        if init not in self.feats:
            lb = self.backbone(init)
            out = []
            for split, pool in (("train", self.train), ("val", self.val)):
                fs = cached(
                    self.cache_dir,
                    lb,
                    pool,
                    device=self.device,
                    bf16=self.bf16,
                    channels_last=self.channels_last,
                    batch_size=256,
                    desc=f"{init} {split} features",
                )
                how = "read from the cache" if fs.hit else f"extracted in {fs.seconds:.1f} s"
                LOG.info(f"{init} features, {split}: {len(pool)} images {how} ({fs.path.name})")
                if not fs.hit:
                    self.timings["extraction_s"] += fs.seconds
                out.append(fs.features)
            self.feats[init] = (out[0], out[1])
        return self.feats[init]
