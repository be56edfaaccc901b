"""Robustness tools: common corruptions (CIFAR-10-C), group robustness (DFR)."""
