"""The generation algorithms behind the ``generate`` stage, one module each, sharing one online filter."""
