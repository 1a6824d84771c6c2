"""One module per model family: what the suite knows about it, stated once, framework-free."""
