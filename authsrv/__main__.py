import sys

from authsrv.cli import main

sys.exit(main())
