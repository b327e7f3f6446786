"""`medssl report`: collect runs (collect.py), aggregate over seeds (aggregate.py), draw the fraction plot
(figures.py), lay the report out as blocks (sections.py) and render them as Markdown and self-contained
HTML (render.py). The entry point is ``medssl_cli.stages.report.report``."""
