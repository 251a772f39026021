"""The controller: the process that owns one run from the command line to its last event.

Owns run resolution (`run`: flags, file, defaults -> one validated config), the launch plan
(`launch`: which process on which host with which arguments), the supervisor (`supervisor`:
starts, watches, stops and restarts the ranks; `watchdog`: which rank went quiet for too long),
the terminal view (`console`), `monitor`, `status` of this machine, and the measured trials
behind `optimize` (`tune`).

May import: the shared contracts, `mlx_train.rank` (to check inputs before launch), planning
and the fleet. Never the command line.
"""
