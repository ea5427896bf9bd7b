import sys

from mountd.main import main

sys.exit(main())
