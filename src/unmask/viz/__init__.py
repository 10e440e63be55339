"""Seeing a run: PNG plots of ``metrics.jsonl`` and a self-contained HTML trace viewer.

Modules are imported on use (``unmask.viz.plots``, ``unmask.viz.trace_html``) so that neither
matplotlib nor torch is loaded before it is needed.
"""
