"""The device side: what a GPU is (catalog.py: models, capacities, kernels, CUDA context), which GPUs this
machine has (gpus.py: NVML), how PyTorch's caching allocator holds memory (allocator.py), and the device
models that turn a trace into what a device would report (models.py, with CUDA's own kernels in
cuda_kernels.py).

Nothing is imported here: ``memguard gpus`` reads the catalog and NVML without loading torch.
"""
