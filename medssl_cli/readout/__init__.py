"""Reading out a backbone: which weights (``backbones``), its frozen features (``features``, cached),
linear heads (``probes``, ``lbfgs``), metrics with confidence intervals (``metrics``) and cluster
scores of an embedding (``clusters``). Used by the finetune, evaluate and tsne stages."""
