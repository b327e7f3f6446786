"""Where and how a stage runs: the device and precision (``compute``), the launcher and its
environment (``launch``: torchrun, srun), the process group and DDP (``distributed``), resumable
training state (``checkpoint``) and stop signals (``preempt``)."""
