"""`vlm-compress search`: the cheapest recipe that passes every gate.

This package owns the `search:` block of a recipe (which fields vary, how points are picked, what is minimized,
extra constraints: `config`), turning its points into plain recipes (`space`), running each point as one trial
through the normal pipeline against one shared baseline (`trial`), fanning trials out on Ray Tune — local Ray
started in-process, or an existing cluster by address — with its scheduling, retries of dead workers and
experiment state for `--resume` (`driver`), and the Pareto report, plot and `best.yaml` (`report`). It never
schedules anything itself and never changes how a run works: a trial folder is a normal run folder.
"""
