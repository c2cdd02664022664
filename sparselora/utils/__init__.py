"""The seed's import path of the Cerebras callback (:mod:`sparselora.utils.cerebras_sparse_callback`)."""

__all__: list[str] = []
