"""dynconv: config-driven training of dynamic-convolution networks.

Data flows one way: config -> build (backbone, convert, head) -> engine (loop + hooks) -> run directory.
"""

__version__ = "0.1.0"
