"""`python -m distsparse ...`: the same as the `distsparse` command."""
import sys

from distsparse.cli import main

sys.exit(main())
