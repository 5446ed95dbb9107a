"""The version of hf-prefalign, in a module of its own so that any submodule can import it without the package's
`__init__` (which registers the model with transformers) having to set it first."""

__version__ = "0.1.0.dev0"
