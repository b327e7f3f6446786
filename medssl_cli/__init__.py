"""medssl: label-efficient medical image classification with Barlow Twins on MIMeta datasets."""

__version__ = "0.1.0"
