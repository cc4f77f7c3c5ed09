import sys

from training.ray_entry import main

sys.exit(main())
