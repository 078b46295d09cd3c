import sys

from mlakit.cli import main

sys.exit(main())
