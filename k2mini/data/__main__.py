"""python -m k2mini.data fetch [NAME] [--root DIR] [--force]   (see k2mini/data/cli.py)"""

import sys

from .cli import main

sys.exit(main())
