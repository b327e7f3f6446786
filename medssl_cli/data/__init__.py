"""Data layer: MIMeta discovery (through the real ``mimeta`` package), fast uint8 image access,
pooling, label fractions and the synthetic MIMeta writer."""
