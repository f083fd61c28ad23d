"""``python -m shardopt``: the same command line as the ``shardopt`` console script."""

from shardopt.cli import main

raise SystemExit(main())
