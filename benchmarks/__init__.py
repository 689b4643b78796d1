"""Benchmarks of T2Diff, SparCode and RecBole's built-in models; every script runs from the project root as
``python -m benchmarks.<script>`` (e.g. ``python -m benchmarks.batch benchmarks/plans/cpu.plan --report``).

The runner of studies, one table each (results/<out>/<dataset>.md from the rows of <dataset>.csv):

- ``run_benchmark``: one study's command line (CLI), its CSV rows and resume folders;
- ``batch``: the studies of a plan (benchmarks/plans/*.plan) through one pool of worker processes;
- ``variants``: the variant mini-language of --models and --search ("T2Diff-noDiff[n_steps=20]"), the search's choice;
- ``worker``: one (variant, seed) run in its own process, timed through hooks on RecBole's trainer;
- ``resume``: a run's state after its last validated epoch, to go on from after an interruption;
- ``report`` and ``plots``: the table (mean ± std, margins with Welch's p-values, cost) and its plots.

Single measurements, each writing its own table: ``epoch_time``, ``epoch_parts``, ``inference``, ``serving``,
``scaling`` (on ``make_synthetic``'s data), ``sparcode_index``, ``sparcode_codes``, ``xhat_diagnosis``; ``machine``
and ``cli`` hold what they share (the machine and command line written next to the numbers, the --key=value settings).
"""
