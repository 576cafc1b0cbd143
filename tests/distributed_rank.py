"""One rank of a torchrun job in tests/test_distributed.py: joins the job as `cnnkit train` does, trains
the tiny network with `start_run` (rank 0 writes RUN), and saves this rank's final weights beside RUN as
rank-R.safetensors, so that the test can compare the ranks with each other and with one process.

    torchrun --nproc-per-node 2 tests/distributed_rank.py SOURCE RUN EPOCHS
"""

import sys
from pathlib import Path

import torch
from conftest import TINY
from safetensors.torch import save_file

from cnnkit import distributed
from cnnkit.recipes import TrainConfig
from cnnkit.runs import start_run

# fp32 and no dropout, so that one process and two ranks compute the same function; 640 - 127 = 513
# training images leave a last batch of 1, which one rank trains on and the other has none of.
VALID_SIZE = 127


def config(epochs: int) -> TrainConfig:
    return TrainConfig(epochs=epochs, learning_rate=1e-3, dropout_rate=0.0, seed=3, precision="fp32")


def train(source, run_dir, epochs: int):
    """start_run of the tiny network, as every rank and the single process of the test run it."""
    return start_run(
        source,
        config(epochs),
        run_dir,
        valid_size=VALID_SIZE,
        architecture=TINY,
        device="cpu",
        log=lambda line: None,
        show_progress=False,
    )


if __name__ == "__main__":
    source, run_dir, epochs = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)
    with distributed.process_group(torch.device("cpu")):
        result = train(source, run_dir, epochs)
        weights = {name: t.contiguous() for name, t in result.model.state_dict().items()}
        save_file(weights, run_dir.parent / f"rank-{distributed.rank()}.safetensors")
