import sys

from triogate.cli import main

sys.exit(main())
