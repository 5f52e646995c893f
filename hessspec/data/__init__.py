"""Datasets (built-in, torchvision on-disk formats, factories) and how their batches reach the device."""
