"""Torch + transformers adapters (the ``hf`` extra): load models, export what each head
writes into an activation store, and scale heads at inference.

Nothing here is imported by ``somp_ref``; import the submodules you need.
"""
