import sys

from triogate.runtime.cli import main

sys.exit(main())
