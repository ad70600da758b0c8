"""``gkt bench``: every layer gkt adds, measured side by side with what it wraps, printed as ratios.

Modules by role: ``report`` (lines, targets, PASS/MISS, JSON, machine facts), ``direct`` (llama.cpp called
without gkt: single-sequence decoding and raw batched decoding with ``llama_batch``), ``client`` (timed
HTTP streams against the edge and the cloud), ``suite`` (the measurements), ``cli`` (the command). Single
benchmarks: ``scheduler`` (the cloud's batch scheduler in process), ``load`` (the L1/L2 drivers) and
``load_cli`` (their command, ``gkt bench load``).
"""
