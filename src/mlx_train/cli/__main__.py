import sys

from mlx_train.cli.main import main

sys.exit(main())
