"""What the experiment scripts share and the library does not need: training runs as child processes
timed by their own CPU time (``cpu_jobs``), a CPU-time budget callback (``cpu_budget``), the sampler
comparison (``samplers``) and each script's run folder (``outputs``). Scripts run as files
(``python experiments/<study>/run.py``) put the repository root on ``sys.path`` to import it."""
