import sys

from aifactory.cli.main import main

sys.exit(main())
