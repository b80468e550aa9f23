"""Sweeps (``sweep.py``: methods x stages into the results store, resumable) and reports (``data.py`` reads the
store, ``render.py`` writes Markdown / CSV / HTML, ``plots.py`` draws the PNGs)."""
