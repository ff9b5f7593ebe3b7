import os
import sys

from dpokit.cli import main

code = main()
if "RANK" in os.environ:
    # Under torchrun the run is complete here (final/ written, the process group ended after a barrier). At
    # interpreter teardown PyTorch's communication threads, still referenced by FSDP's device mesh, aborted a
    # rank now and then ("terminate called without an active exception": 1 run in 4 on a busy CPU), turning
    # a finished run into a failed one; leaving without the teardown ends every rank cleanly.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
