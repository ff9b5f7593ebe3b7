import sys

from dpokit.cli import main

sys.exit(main())
