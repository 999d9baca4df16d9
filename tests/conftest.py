import torch

# One thread: tests share a small machine, and torch's default thread count made elementwise
# ops ~20x slower whenever another process held a core.
torch.set_num_threads(1)
