import sys

from mdtzoo.launch.cli import main

sys.exit(main())
