import sys

from larq_lipschitz.cli import main

sys.exit(main())
