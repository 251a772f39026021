"""The fleet: the hosts of a cluster and everything that reaches them over ssh.

Owns the host type and the cluster file (`hosts`), every ssh command line (`ssh`), libmpi and
the mpirun environment (`mpi`), `configure --distributed`, `check-network`, per-host status and
`reset-distributed`.

May import: the shared contracts and `mlx_train.rank` (the pid-record format, BLAS facts).
Never the controller or planning.
"""
