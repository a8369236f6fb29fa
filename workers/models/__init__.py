"""Model implementations over the paged KV cache."""
