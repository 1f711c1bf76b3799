"""Distributed helpers: process groups, mask-sync verification, the masked-gradient all-reduce hook."""
