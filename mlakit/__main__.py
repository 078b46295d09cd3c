import os
import sys

from mlakit.cli import main

code = main()
if "RANK" in os.environ:  # under torchrun: a rank that joined the job leaves as parallel.leave says
    from mlakit import parallel

    if parallel.joined():
        parallel.leave(code)
sys.exit(code)
