"""The pure core: policy model, event parsing, image header checks and decisions.

Nothing here performs I/O or imports an adapter, so all of it is tested by tables.
"""
