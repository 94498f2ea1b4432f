"""Draw FEC's growing clusters over images (paper Sec. 5.2, Fig. 3).

python visualize.py --checkpoint ckpt/fec_small --image a.jpg b.jpg --num-clusters 3 --out vis/
"""

import sys

from fec_jax import cli
from fec_jax.visualize import main

if __name__ == "__main__":
  with cli.interruptible():
    sys.exit(main())
