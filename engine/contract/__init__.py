"""The contract between a run's ranks and its daemon: torch-free and Ray-free.

Both sides import it, so every name that crosses the process boundary is spelled once:
the run directory's layout, event kinds, run and attempt states, roles, exit codes,
environment variable names, the wire models (rank report, step record, fault request,
GPU snapshot) and the job config. Nothing here may import torch or ray (enforced by
import-linter in ``make test``): the daemon and the dashboard load it on machines that
have neither.
"""
