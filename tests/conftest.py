import torch

# The tests run many tiny tensor ops; on a small, busy CPU a second intra-op thread only adds contention
# (seen here: 0.3 ms per call on one thread, tens of ms on two under load).
torch.set_num_threads(1)
