import sys

from l4lb.cli import main

sys.exit(main())
