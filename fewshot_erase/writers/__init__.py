"""One module per output format; each writes into a staging path that `atomic` moves into place whole."""
