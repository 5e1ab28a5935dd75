"""dynconv: config-driven training of dynamic-convolution networks.

Data flows one way: config -> build (backbone, convert, head) -> engine (loop + hooks) -> run directory.
"""

__version__ = "0.1.0"

# The Python API (docs/api.md). Imported lazily: `import dynconv` stays light for the scripts.
_API = ("create_model", "model_config", "count_macs", "profile", "load", "options", "init_from_static", "convert",
        "set_training_progress", "export")
__all__ = list(_API)


def __getattr__(name: str):
    if name in _API:
        from dynconv import api

        return getattr(api, name)
    raise AttributeError(f"module 'dynconv' has no attribute {name!r}")
