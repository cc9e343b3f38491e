"""The research room: the instruments behind the project's measurements, run by ``scripts/bench_*.py``.

Holds: :mod:`.benchmark` (every server strategy on one phantom stream over seeds, the many-task stream's
upload replay), :mod:`.centralized` (the pooled-data reference), :mod:`.learning_curve` (how fast one site
learns each organ task; the real trained tasks of the server and compression benchmarks), :mod:`.ws_pairs`
(W_s's calibration pairs) and :mod:`.targets` (the benchmark's target lines).

May import every other room but Flower (``results`` for evaluation, reports and job replay, ``data`` for the
phantom it writes); nothing in the package imports it: it is the notebook, not the house.
"""
