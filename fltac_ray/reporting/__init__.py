"""The report of a run or a comparison: PNG figures and one self-contained HTML page.

runs.py reads run directories; projection.py maps adapters to 2-D (UMAP or PCA); figures.py draws
(matplotlib, no file IO); render.py writes the PNGs and report.html.
"""
