"""ann-mlp: run Transformer MLP layers through maximum-inner-product search.

Data flows one way: checkpoint -> per-layer MLP weights -> MIPS index per layer
-> index store on disk -> model with approximate MLPs -> report / service.
"""

__version__ = "0.1.0"
