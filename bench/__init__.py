"""fastkd's benchmark suite: each loss against its peers (eager PyTorch, torch.compile, Liger-Kernel) and
fastkd's backends, checked for the same answer first, timed against the copy-bandwidth floor.

One idea per module: `cases` (losses, shapes, minimal bytes), `peers` (who is measured), `timing`
(events, memory, copy bandwidth), `suite` (check then time, rows), `results` (the CSV), `report`
(Markdown and plots), `__main__` (the command line). See bench/README.md.
"""
