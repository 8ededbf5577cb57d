"""bench-quality groups: one module per method family, each with NAME and run(ctx)."""
