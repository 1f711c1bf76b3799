"""distsparse: distributed training of sparse neural networks."""

__version__ = "0.1.0"
