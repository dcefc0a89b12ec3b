"""One module per output format; each writes into a staging path that `atomic` moves into place whole."""

from . import delta, lora

# What `export` writes, and how `apply` reads each back into differences to add: a new format adds a line here.
EXPORT_READERS = {"delta": delta.read_differences, **{flavour: lora.reader(flavour) for flavour in lora.FLAVOURS}}
# `drop-in` writes whole encoders, not a patch: nothing to read back, the files are loaded as they are.
EXPORT_FORMATS = (*EXPORT_READERS, "drop-in")
